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

Host syncs. The concept loss works on the fixed grid of concept slots with masks (see the section
above ``SlotClasses``): with the concept bank's size given it reads nothing back to the host on one
process; without it, sizing the class table to the present classes reads one count.
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
    "concept_loss",
    "ConceptLossStats",
    "SlotClasses",
    "slot_classes",
    "slot_prototypes",
    "slot_concept_loss",
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


def _global_mean(local_sum: Tensor, n_global: int | Tensor, global_sum: Tensor | None = None) -> Tensor:
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
    # the scale multiplies the logits, not the (frozen) image features: no gradient product for those
    logits_per_image = (img @ all_txt.T) * logit_scale
    logits_per_text = (txt @ all_img.T) * logit_scale
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


# ---------------------------------------------------------------------------------------------------------------
# The concept loss on the fixed grid of concept *slots* (a batch's [B, K] concept columns, flattened): every slot
# takes part, an empty one (label -1) with a zero weight, and the present classes are rows of a class table of a
# size fixed by the shapes (the concept bank's size) instead of a ``torch.unique``. No shape depends on the data, so
# nothing is read back to the host when the bank size is known. Absent classes get the dtype's lowest logit, whose
# ``exp`` is exactly 0: the softmax, argmax (classes stay in ascending label order, so ties resolve alike) and
# cross-entropy are those over the present classes only.


class SlotClasses(NamedTuple):
    """Class-table rows of every concept slot of the global batch (``slot_classes``)."""

    index: Tensor  # [S_global] row of each slot in the class table (row 0 for empty slots; their weight is 0)
    valid: Tensor  # [S_global] bool: the slot holds a concept
    size: int  # rows of the class table
    start: int  # this rank's first slot in the global order
    sizes: list[int]  # slots per rank

    @property
    def local(self) -> slice:
        """This rank's slots in the global order."""
        return slice(self.start, self.start + self.sizes[_dist_world()[0]])


def slot_classes(labels: Tensor, num_classes: int | None = None, *, equal_sizes: bool = False) -> SlotClasses:
    """Index the concept slots ``labels`` [S] (class id, or -1 for an empty slot) of all ranks into a class table.

    ``num_classes`` (the concept bank's size): one table row per class id, a slot's row is its label (labels must
    be < ``num_classes``; nothing is read back to the host). ``None``: one row per class present in the global
    batch, a slot's row is its label's rank among them (what ``torch.unique(return_inverse=True)`` gives); sizing
    that table reads the class count back to the host once. ``equal_sizes``: every rank holds the same number of
    slots, which skips the exchange of sizes under ``torch.distributed``.
    """
    if labels.ndim != 1:
        raise ValueError(f"concept slot labels must be [S], got {tuple(labels.shape)}")
    rank, world = _dist_world()
    labels = labels.long()
    known_sizes = [labels.shape[0]] * world if equal_sizes else None
    all_labels, sizes = _gather_varlen(labels, with_grad=False, sizes=known_sizes)
    valid = all_labels >= 0
    if num_classes is not None:
        if all_labels.device.type == "cpu" and all_labels.numel() and int(all_labels.max()) >= num_classes:
            # checked where it costs no device sync; on an accelerator an out-of-range id fails in index_add
            raise ValueError(f"concept label {int(all_labels.max())} is not below num_classes={num_classes} "
                             "(the concept bank's size)")
        return SlotClasses(all_labels.clamp(min=0), valid, max(int(num_classes), 1), sum(sizes[:rank]), sizes)
    # rank of each label among the present ones: sort (empty slots last), count the starts of runs of equal labels
    keyed = torch.where(valid, all_labels, torch.full_like(all_labels, torch.iinfo(torch.long).max))
    sorted_labels, order = torch.sort(keyed)
    run_start = torch.ones_like(sorted_labels, dtype=torch.bool)
    run_start[1:] = sorted_labels[1:] != sorted_labels[:-1]
    rank_of_sorted = torch.cumsum(run_start.long(), 0) - 1
    index = torch.empty_like(order).scatter_(0, order, rank_of_sorted)
    index = torch.where(valid, index, torch.zeros_like(index))
    present = int((run_start & (sorted_labels != torch.iinfo(torch.long).max)).sum())  # the one host read
    return SlotClasses(index, valid, max(present, 1), sum(sizes[:rank]), sizes)


def slot_prototypes(
    text_concepts: Tensor, classes: SlotClasses, *, normalize_members: bool = True
) -> tuple[Tensor, Tensor]:
    """Class prototypes over the global batch: ``(table [P, D], present [P] bool)``.

    ``text_concepts`` [S, D] are this rank's slots (gathered from all ranks with gradient); empty slots add
    nothing. Row i is h_i = normalize(Σ_{slots j of class i} normalize(c_t,j)); ``normalize_members=False`` sums
    the concepts as they are (the official release: a concept pooled as a sum of k unit tokens weighs up to k
    times more). Rows of absent classes are zero and ``present`` is False there.
    """
    all_text, _ = _gather_varlen(text_concepts, with_grad=True, sizes=classes.sizes)
    members = F.normalize(all_text, dim=-1) if normalize_members else all_text
    members = torch.where(classes.valid.unsqueeze(-1), members, members.new_zeros(()))
    table = members.new_zeros((classes.size, all_text.shape[-1])).index_add(0, classes.index, members)
    counts = torch.zeros(classes.size, dtype=torch.long, device=table.device).index_add(
        0, classes.index, classes.valid.long())
    return F.normalize(table, dim=-1), counts > 0


class ConceptLossStats(NamedTuple):
    """The concept loss and statistics of the global batch (detached 0-d tensors: read them when logging)."""

    loss: Tensor
    accuracy: Tensor  # argmax == true label over all concepts of the global batch; nan when none
    num_concepts: Tensor  # concepts in the global batch
    num_classes: Tensor  # classes present in the global batch


def slot_concept_loss(
    visual_concepts: Tensor,
    classes: SlotClasses,
    prototypes: Tensor,
    present: Tensor,
    scale: Tensor | float = 1 / 0.07,
    target: str = "label",
) -> ConceptLossStats:
    """SimZSS concept loss L_l over the global batch, from this rank's slots.

    ``visual_concepts`` [S, D] (this rank's slots), ``prototypes`` / ``present`` from ``slot_prototypes``:
    logits = scale · normalize(c_v) · hᵀ over the present classes; cross-entropy against the true class
    (``target="label"``, the paper) or the logits' own argmax (``target="argmax"``, the official release),
    averaged over the concepts of the global batch (see the module docstring for the distributed value and
    gradients). No concept on any rank: a zero loss still connected to the graph, and a nan accuracy.
    """
    if target not in ("label", "argmax"):
        raise ValueError(f"concept target must be 'label' or 'argmax', got {target!r}")
    valid, index = classes.valid[classes.local], classes.index[classes.local]
    if visual_concepts.ndim != 2 or visual_concepts.shape[0] != valid.shape[0]:
        raise ValueError(f"concept loss expects [S, D] visual concepts for {valid.shape[0]} slots, "
                         f"got {tuple(visual_concepts.shape)}")
    logits = scale * F.normalize(visual_concepts, dim=-1) @ prototypes.T  # [S, P]
    logits = logits.masked_fill(~present, torch.finfo(logits.dtype).min)
    pred = logits.detach().argmax(dim=-1)
    per_slot = F.cross_entropy(logits, pred if target == "argmax" else index, reduction="none")
    # `prototypes.sum() * 0` keeps the gathered tensor in this rank's graph even without a local slot, so every
    # rank takes part in the all_gather backward (a missing participant would deadlock).
    local_sum = torch.where(valid, per_slot, per_slot.new_zeros(())).sum() + prototypes.sum() * 0
    correct = (valid & (pred == index)).sum()
    # loss value, accuracy count and concept count reduced over ranks in one collective
    # at least float32 whatever the autocast dtype: counts in bf16 would round beyond 256
    stats_dtype = torch.promote_types(local_sum.dtype, torch.float32)
    loss_sum, correct, n_global = _all_reduce_sum(
        torch.stack([local_sum.detach().to(stats_dtype), correct.to(stats_dtype), valid.sum().to(stats_dtype)])
    ).unbind()
    loss = _global_mean(local_sum, n_global.clamp(min=1), global_sum=loss_sum)
    return ConceptLossStats(loss, correct / n_global, classes.valid.sum(), present.sum())


def concept_loss(
    text_concepts: Tensor,
    visual_concepts: Tensor,
    labels: Tensor,
    scale: Tensor | float = 1 / 0.07,
    target: str = "label",
    *,
    num_classes: int | None = None,
    normalize_members: bool = True,
) -> ConceptLossStats:
    """The concept loss of ``text_concepts`` / ``visual_concepts`` [n, D] with class ``labels`` [n] (-1: no concept):
    ``slot_classes`` + ``slot_prototypes`` + ``slot_concept_loss`` in one call."""
    if (text_concepts.ndim != 2 or text_concepts.shape != visual_concepts.shape
            or labels.shape != text_concepts.shape[:1]):
        raise ValueError(f"concept_loss expects [n,D], [n,D], [n]; got {tuple(text_concepts.shape)}, "
                         f"{tuple(visual_concepts.shape)}, {tuple(labels.shape)}")
    classes = slot_classes(labels, num_classes)
    prototypes, present = slot_prototypes(text_concepts, classes, normalize_members=normalize_members)
    return slot_concept_loss(visual_concepts, classes, prototypes, present, scale, target)
