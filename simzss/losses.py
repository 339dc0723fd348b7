"""SimZSS losses: the global image-text InfoNCE and the local concept loss.

All functions are pure (no module state) and work on one process or under ``torch.distributed``.

Distributed scheme (both losses). Each rank computes its *local* rows against features gathered
from all ranks with a gradient-carrying ``all_gather`` (whose backward sums the gradients of every
rank's loss into the owner's features), exactly open_clip's ``local_loss=True, gather_with_grad=True``.
The tensor returned on every rank has

* the **value** of the single-process loss on the concatenated global batch (the per-row sums are
  ``all_reduce``-d, detached), so logs agree across ranks and with a 1-process run, and
* the **gradient** of ``world_size * sum(local per-row losses) / n_global``. DDP averages gradients
  over ranks, giving ``(1/W) * sum_r W * dL_r/dθ / n_global = d(global mean)/dθ``: the averaged
  gradients equal the single-process gradients, also when ranks hold different numbers of rows
  (concept counts differ per rank, and a rank may hold none).

This is done with ``loss = grad_part + (value - grad_part).detach()``.

Host syncs. The concept loss needs the concept count and the present classes on the host (shapes
depend on them); ``concept_targets`` reads them with one device->host copy (plus the size exchange
under ``torch.distributed``), and a caller that computes it early (``SimZSS`` does, before the towers
run) leaves ``class_prototypes`` / ``concept_loss`` with no host sync at all.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gather_with_grad",
    "contrastive_loss",
    "pool_visual_concepts",
    "class_prototypes",
    "concept_loss",
    "concept_accuracy",
    "concept_targets",
    "ConceptLossStats",
    "ConceptTargets",
]


def _dist_world() -> tuple[int, int]:
    """(rank, world_size) of the default group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_varlen(x: Tensor, *, with_grad: bool, sizes: list[int] | None = None) -> tuple[Tensor, list[int]]:
    """Concatenate ``x`` from all ranks along dim 0, allowing a different dim-0 size per rank.

    Sizes are gathered first (one small collective and one host sync) unless the caller knows them
    (``sizes``, identical on every rank); each rank pads to the largest size, gathers, and the
    padding is stripped. Returns the concatenation and the per-rank sizes (``[len(x)]`` when not
    distributed).
    """
    rank, world = _dist_world()
    if world == 1:
        return x, [x.shape[0]]
    if sizes is None:
        size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes_t = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes_t, size)
        sizes = [int(s) for s in torch.cat(sizes_t).tolist()]  # one host sync for all ranks' sizes
    elif len(sizes) != world or sizes[rank] != x.shape[0]:
        raise ValueError(f"sizes {sizes} do not match world size {world} / local size {x.shape[0]} on rank {rank}")
    max_size = max(sizes)
    if max_size == 0:  # every rank is empty: same decision on all ranks, so no collective is skipped unevenly
        return x, sizes
    padded = x
    if x.shape[0] < max_size:
        padded = torch.cat([x, x.new_zeros((max_size - x.shape[0], *x.shape[1:]))], dim=0)
    if with_grad:
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad

        # Recent torch marks this function deprecated with a FutureWarning on every call (every step, per rank);
        # it still works and its backward is the one we need, so silence only that warning here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*distributed\.nn\.functional\.all_gather", category=FutureWarning)
            parts = list(all_gather_with_grad(padded.contiguous()))
        parts[rank] = padded  # the local slice keeps its direct autograd path
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    if all(s == max_size for s in sizes):
        return torch.cat(parts, dim=0), sizes
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0), sizes


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` [n_r, ...] over ranks into [Σ n_r, ...] with gradient; identity on one process.

    The backward pass sums every rank's gradient into the owner's slice (then DDP averages). Each
    rank may hold a different first-dimension size (including 0).
    """
    return _gather_varlen(x, with_grad=True)[0]


def _all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of a detached tensor over ranks (a copy; identity on one process)."""
    t = t.detach().clone()
    if _dist_world()[1] > 1:
        dist.all_reduce(t)
    return t


def _global_mean(local_sum: Tensor, n_global: int, global_sum: Tensor | None = None) -> Tensor:
    """Loss with the single-process value and DDP-correct gradients (see the module docstring).

    ``global_sum``: ``local_sum`` already summed over ranks (detached), when the caller reduced it
    together with other statistics in one collective.
    """
    world = _dist_world()[1]
    grad_part = local_sum * (world / n_global)
    value = (_all_reduce_sum(local_sum) if global_sum is None else global_sum) / n_global
    return grad_part + (value - grad_part).detach()


def contrastive_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, *, equal_sizes: bool = False
) -> Tensor:
    """Symmetric InfoNCE between paired image and text features ([n, D] each; normalized inside).

    ``logit_scale`` is the already-exponentiated (and clamped) temperature, e.g. ``exp(s).clamp``-ed
    ``1/0.07``. Under ``torch.distributed`` the local rows are scored against all ranks' features
    (negatives from the global batch); the value equals the single-process loss on the concatenated
    batch and DDP-averaged gradients equal the single-process ones. Image and text features travel
    in one gradient-carrying all-gather. ``equal_sizes=True`` promises that every rank holds the same
    number of rows (a training stream of full batches), which skips the exchange of sizes and its
    host sync; a broken promise makes the collective fail or hang, so leave it off when unsure.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"contrastive_loss expects two [n, D] tensors of the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    rank, world = _dist_world()
    n, d = img.shape
    if world == 1:
        all_img, all_txt, sizes = img, txt, [n]
    else:
        both = torch.cat([img, txt.to(img.dtype)], dim=1)  # one collective for both modalities
        gathered, sizes = _gather_varlen(both, with_grad=True, sizes=[n] * world if equal_sizes else None)
        all_img, all_txt = gathered[:, :d], gathered[:, d:]
    n_global = sum(sizes)
    if n_global == 0:
        raise ValueError("contrastive_loss got an empty batch on every rank")
    labels = torch.arange(n, device=img.device) + sum(sizes[:rank])
    logits_per_image = logit_scale * img @ all_txt.T
    logits_per_text = logit_scale * txt @ all_img.T
    local_sum = 0.5 * (
        F.cross_entropy(logits_per_image, labels, reduction="sum")
        + F.cross_entropy(logits_per_text, labels, reduction="sum")
    )
    return _global_mean(local_sum, n_global)


def pool_visual_concepts(patch_tokens: Tensor, queries: Tensor, tau: float = 0.1) -> Tensor:
    """Visual concepts: per query, attention-pool an image's patch tokens.

    ``patch_tokens`` [B, N, D], ``queries`` [B, K, D] -> [B, K, D]: s = softmax over patches of
    cos(patch, query) / tau; c_v = normalize(Σ s · normalize(patch)).
    """
    if patch_tokens.ndim != 3 or queries.ndim != 3 or patch_tokens.shape[0] != queries.shape[0]:
        raise ValueError(
            f"pool_visual_concepts expects [B,N,D] patches and [B,K,D] queries, got "
            f"{tuple(patch_tokens.shape)} and {tuple(queries.shape)}"
        )
    z = F.normalize(patch_tokens, dim=-1)
    q = F.normalize(queries, dim=-1)
    attn = torch.softmax(q @ z.transpose(1, 2) / tau, dim=-1)  # [B, K, N]
    return F.normalize(attn @ z, dim=-1)


class ConceptTargets(NamedTuple):
    """Where each concept of the global batch sits among the present classes (``concept_targets``)."""

    classes: Tensor  # [C] sorted class ids present in the global batch (on the target device)
    global_index: Tensor  # [n_global] row in ``classes`` of every concept, ranks concatenated in order
    local_index: Tensor  # [n] this rank's slice of ``global_index``
    sizes: list[int]  # concepts per rank (``[n]`` on one process)

    @property
    def num_global(self) -> int:
        """Concepts in the global batch."""
        return sum(self.sizes)


def concept_targets(labels: Tensor, device: torch.device | str | None = None) -> ConceptTargets:
    """Gather ``labels`` [n] (class ids >= 0) from all ranks and index them among the present classes.

    The only place of the concept loss that needs values on the host: one device->host copy (none
    for CPU labels) plus, under ``torch.distributed``, the size exchange. Every rank checks the same
    gathered labels, so bad labels raise on all ranks alike (no rank is left waiting in a
    collective). Results are put on ``device`` (default: the labels' device).
    """
    if labels.ndim != 1:
        raise ValueError(f"concept labels must be [n], got {tuple(labels.shape)}")
    device = torch.device(device) if device is not None else labels.device
    rank, world = _dist_world()
    if world == 1:
        all_labels, sizes = labels.long().cpu(), [labels.shape[0]]
    else:
        gathered, sizes = _gather_varlen(labels.long().to(device), with_grad=False)
        all_labels = gathered.cpu()
    if all_labels.numel() and int(all_labels.min()) < 0:
        raise ValueError("concept_loss labels must be >= 0 (drop padding concepts before calling)")
    classes, inverse = torch.unique(all_labels, sorted=True, return_inverse=True)
    # one host->device copy; non_blocking: from a host tensor nothing writes to, it needs no stream sync
    both = torch.cat([classes, inverse.reshape(-1)]).to(device, non_blocking=True)
    classes, inverse = both[: classes.numel()], both[classes.numel() :]
    start = sum(sizes[:rank])
    return ConceptTargets(classes, inverse, inverse[start : start + sizes[rank]], sizes)


def class_prototypes(
    text_concepts: Tensor,
    labels: Tensor,
    *,
    targets: ConceptTargets | None = None,
    normalize_members: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Class prototypes over the global batch for the classes present.

    Gathers ``text_concepts`` [n, D] (with gradient) and ``labels`` [n] from all ranks and returns
    ``(prototypes [C, D], classes [C], local_index [n])``: h_i = normalize(Σ_{j: q_j = i}
    normalize(c_t,j)) for the C sorted present classes, and each local concept's row in it.
    ``normalize_members=False`` sums the concepts as they are (the official release; a concept
    pooled as a sum of k unit tokens then weighs up to k times more). ``targets``
    (``concept_targets(labels)``, computed earlier) avoids any host sync here.
    """
    if targets is None:
        targets = concept_targets(labels, text_concepts.device)
    all_text, _ = _gather_varlen(text_concepts, with_grad=True, sizes=targets.sizes)
    members = F.normalize(all_text, dim=-1) if normalize_members else all_text
    protos = all_text.new_zeros((targets.classes.numel(), all_text.shape[-1]))
    protos = F.normalize(protos.index_add(0, targets.global_index, members), dim=-1)
    return protos, targets.classes, targets.local_index


class ConceptLossStats(NamedTuple):
    """``concept_loss(..., return_stats=True)``: loss plus global-batch statistics (detached)."""

    loss: Tensor
    accuracy: Tensor  # argmax == true label over all concepts of the global batch; nan when none
    num_concepts: int  # global
    num_classes: int  # classes present in the global batch


def concept_loss(
    text_concepts: Tensor,
    visual_concepts: Tensor,
    labels: Tensor,
    scale: Tensor | float = 1 / 0.07,
    target: str = "label",
    *,
    return_stats: bool = False,
    targets: ConceptTargets | None = None,
    normalize_members: bool = True,
) -> Tensor | ConceptLossStats:
    """SimZSS concept loss L_l over the global batch.

    ``text_concepts`` [n, D] (projected, any norm), ``visual_concepts`` [n, D], ``labels`` [n] class
    ids (>= 0). Prototypes are built from the text concepts of all ranks (``class_prototypes``);
    logits = scale · normalize(visual) · prototypesᵀ over the present classes only; cross-entropy
    against the true labels (``target="label"``) or against the logits' own argmax
    (``target="argmax"``, the official release), averaged over the global number of concepts (see
    the module docstring for the distributed value/gradient scheme). No concept on any rank gives a
    zero loss that is still connected to the inputs' graph. ``return_stats=True`` returns a
    ``ConceptLossStats`` with the accuracy and the global concept / class counts. ``targets``
    (``concept_targets(labels)``, computed before the forward pass) leaves no host sync in here.
    ``normalize_members``: see ``class_prototypes``.
    """
    if target not in ("label", "argmax"):
        raise ValueError(f"concept target must be 'label' or 'argmax', got {target!r}")
    n = labels.shape[0]
    if text_concepts.ndim != 2 or text_concepts.shape != visual_concepts.shape or text_concepts.shape[0] != n:
        raise ValueError(
            f"concept_loss expects [n,D], [n,D], [n]; got {tuple(text_concepts.shape)}, "
            f"{tuple(visual_concepts.shape)}, {tuple(labels.shape)}"
        )
    if targets is None:
        targets = concept_targets(labels, text_concepts.device)
    elif targets.local_index.shape[0] != n:
        raise ValueError(f"concept targets are for {targets.local_index.shape[0]} concepts, got {n}")
    zero = text_concepts.sum() * 0 + visual_concepts.sum() * 0
    n_global = targets.num_global
    if n_global == 0:
        nan = torch.full((), float("nan"), device=zero.device)
        return ConceptLossStats(zero, nan, 0, 0) if return_stats else zero

    protos, classes, local_target = class_prototypes(
        text_concepts, labels, targets=targets, normalize_members=normalize_members
    )
    logits = scale * F.normalize(visual_concepts, dim=-1) @ protos.T  # [n, C]
    pred = logits.detach().argmax(dim=-1)
    tgt = pred if target == "argmax" else local_target
    # `protos.sum() * 0` keeps the gathered tensor in this rank's graph even with n == 0 locally, so
    # every rank takes part in the all_gather backward (a missing participant would deadlock).
    local_sum = F.cross_entropy(logits, tgt, reduction="sum") + zero + protos.sum() * 0
    if not return_stats:
        return _global_mean(local_sum, n_global)
    # loss value and accuracy count reduced over ranks in one collective
    correct = (pred == local_target).sum().to(local_sum.dtype)
    loss_sum, correct = _all_reduce_sum(torch.stack([local_sum.detach(), correct])).unbind()
    loss = _global_mean(local_sum, n_global, global_sum=loss_sum)
    return ConceptLossStats(loss, correct / n_global, n_global, int(classes.numel()))


def concept_accuracy(text_concepts: Tensor, visual_concepts: Tensor, labels: Tensor) -> Tensor:
    """Fraction of concepts (global batch) whose visual concept is nearest its own class prototype."""
    with torch.no_grad():
        return concept_loss(text_concepts, visual_concepts, labels, return_stats=True).accuracy  # type: ignore[union-attr]
