"""Zero-shot prediction with any image-text model: class embeddings from prompts, sliding-window dense scores.

Protocol (GroupViT / TCL / CLIP-DINOiser, mmseg 0.x slide inference):

1. Resize so the short side is ``short_side`` (448), long side capped at ``max_long`` (2048), aspect kept
   (scale = min(short/min(H,W), max_long/max(H,W)); bilinear, no antialias, like mmcv's cv2 resize).
2. Slide ``crop`` x ``crop`` windows with ``stride`` (:func:`slide_windows`); the last window of each axis snaps to
   the border. An axis shorter than ``crop`` gets one window of the full axis length.
3. Each window's patch tokens (L2-normalised) are scored against the class embeddings (cosine), upsampled
   bilinearly from the patch grid to the window size, summed into a canvas and divided by the per-pixel window
   count. Windows whose size is not a multiple of the patch size (only when an axis is shorter than ``crop``, or
   ``crop`` itself is not a multiple) are zero-padded bottom/right (zero = the mean colour after normalisation)
   up to the next multiple; the logits of the padding are cropped away after upsampling.
4. The averaged cosine map is resized bilinearly to the original image size; probabilities =
   softmax(logit_scale * cosine) over classes; prediction = argmax.

Steps 3-4 are linear up to the softmax and act on the two axes separately, so :func:`assemble_windows` computes
them as two small matrix products per class from the windows' patch-level logits (:func:`slide_cosine` is the
direct canvas form; both agree to float rounding). :func:`segment_images` segments several images at once: their
windows share the vision tower's batches and the label maps never leave the device.

Background handling (``background``): ``"none"``; ``"threshold"`` (background wherever the highest foreground
probability is below ``bg_threshold``); ``"class"`` ("background" is embedded like any other class name).
Optional ``pamr=True`` (off by default): the probabilities are refined with PAMR (:mod:`simzss.models.pamr`, TCL's
10 iterations, dilations 1-24) on the resized image before step 4's resize, the threshold compared afterwards.
Dataset evaluation (defaults per benchmark, mIoU) is :mod:`simzss.eval.segmentation`.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from simzss.models.pamr import pamr as pamr_refine
from simzss.resources import resolve_templates

BACKGROUND_MODES = ("none", "threshold", "class")
FALLBACK_BG_THRESHOLD = 0.5


class ZeroShotModel(Protocol):
    """What the evaluations need from a model (``SimZSS`` satisfies it)."""

    def encode_image(self, images: Tensor) -> Tuple[Tensor, Tensor]:  # cls [B,D], patches [B,h,w,D], normalised
        ...

    def encode_texts(self, texts: List[str]) -> Tensor:  # [N,D] normalised
        ...


# ------------------------------------------------------------------------------------------- model bits


def model_device(model: Any) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a parameter-less model)."""
    if hasattr(model, "parameters"):
        t = next(itertools.chain(model.parameters(), model.buffers()), None)
        if t is not None:
            return t.device
    return torch.device("cpu")


def get_logit_scale(model: Any, default: float = 100.0) -> float:
    """The model's logit scale as a multiplier. ``model.logit_scale`` is stored in log space (CLIP-style) and
    clamped at ``model.logit_scale_max`` (log, default log 100) when present; a plain float is taken as is."""
    ls = getattr(model, "logit_scale", None)
    if ls is None:
        return default
    if isinstance(ls, Tensor):
        max_log = getattr(model, "logit_scale_max", math.log(100.0))
        return float(ls.detach().float().clamp(max=float(max_log)).exp())
    return float(ls)


def get_patch_size(model: Any) -> int:
    """Patch size of the vision tower (``model.vision.patch_size`` or ``model.patch_size``; 1 if unknown)."""
    for obj in (getattr(model, "vision", None), model):
        ps = getattr(obj, "patch_size", None) if obj is not None else None
        if ps is not None:
            return int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    return 1


def get_mean_std(model: Any) -> Tuple[Tensor, Tensor]:
    """Input normalisation of the vision tower (``model.vision.mean/std``; ImageNet if absent), as [3] tensors."""
    vision = getattr(model, "vision", None)
    mean = getattr(vision, "mean", None) if vision is not None else None
    std = getattr(vision, "std", None) if vision is not None else None
    mean = IMAGENET_DEFAULT_MEAN if mean is None else mean
    std = IMAGENET_DEFAULT_STD if std is None else std
    return torch.as_tensor(mean, dtype=torch.float32).flatten(), torch.as_tensor(std, dtype=torch.float32).flatten()


def normalize_image(image_uint8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``uint8 [3,H,W]`` (or ``[B,3,H,W]``) -> float ``[B,3,H,W]`` in the model's normalised space."""
    x = image_uint8.float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    mean = mean.to(x.device).view(1, -1, 1, 1)
    std = std.to(x.device).view(1, -1, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------ text side


@torch.no_grad()
def text_classifier(
    model: ZeroShotModel, classnames: Sequence[str], templates: Union[str, Sequence[str]] = "single", batch_size: int = 512
) -> Tensor:
    """``[C, D]`` class embeddings: per class, the mean of its L2-normalised prompt embeddings, re-normalised."""
    temps = resolve_templates(templates)
    if not classnames:
        raise ValueError("no class names")
    prompts = [t.format(c) for c in classnames for t in temps]
    embs = []
    for s in range(0, len(prompts), batch_size):
        embs.append(F.normalize(model.encode_texts(prompts[s : s + batch_size]).float(), dim=-1))
    emb = torch.cat(embs).view(len(classnames), len(temps), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


# -------------------------------------------------------------------------------------------- windows


def slide_windows(h: int, w: int, crop: int = 448, stride: int = 224) -> List[Tuple[int, int, int, int]]:
    """Sliding windows ``(y1, y2, x1, x2)`` of mmseg slide inference; the last window on each axis snaps to the
    border, an axis shorter than ``crop`` gets one full-length window."""
    if h <= 0 or w <= 0 or crop <= 0 or stride <= 0:
        raise ValueError(f"invalid slide arguments h={h} w={w} crop={crop} stride={stride}")
    n_h = max(h - crop + stride - 1, 0) // stride + 1
    n_w = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n_h):
        for j in range(n_w):
            y2 = min(i * stride + crop, h)
            x2 = min(j * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def resized_shape(h: int, w: int, short_side: Optional[int], max_long: int = 2048) -> Tuple[int, int]:
    """Shape after the keep-ratio resize (mmseg Resize with img_scale=(max_long, short_side))."""
    if not short_side:
        return h, w
    scale = min(short_side / min(h, w), max_long / max(h, w))
    return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)


@torch.no_grad()
def slide_cosine(
    model: ZeroShotModel,
    image: Tensor,
    classifier: Tensor,
    *,
    crop: int = 448,
    stride: int = 224,
    window_batch: int = 16,
    patch_size: Optional[int] = None,
) -> Tensor:
    """Window-averaged cosine map ``[C, H, W]`` of a normalised ``[1,3,H,W]`` image (no resizing).

    The direct form of step 3: every window's logits upsampled to the window and summed into a canvas, divided by
    the per-pixel window count. :func:`segment_image` computes the same map in the separable form
    (:func:`assemble_windows`), which never materialises per-window full-resolution logits."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image [1,3,H,W], got {tuple(image.shape)}")
    _, _, h, w = image.shape
    p = patch_size or get_patch_size(model)
    windows = slide_windows(h, w, crop, stride)
    wh, ww = min(crop, h), min(crop, w)  # every window has this size
    ph, pw = math.ceil(wh / p) * p, math.ceil(ww / p) * p
    cls = classifier.to(image.device, torch.float32)
    canvas = image.new_zeros((cls.shape[0], h, w), dtype=torch.float32)
    count = image.new_zeros((1, h, w), dtype=torch.float32)
    for s in range(0, len(windows), window_batch):
        chunk = windows[s : s + window_batch]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        if (ph, pw) != (wh, ww):
            crops = F.pad(crops, (0, pw - ww, 0, ph - wh))
        _, patches = model.encode_image(crops)  # [b, gh, gw, D]
        with torch.autocast(device_type=image.device.type, enabled=False):  # scores in fp32 under mixed precision
            logits = torch.einsum("bhwd,cd->bchw", patches.float(), cls)
            logits = F.interpolate(logits, size=(ph, pw), mode="bilinear", align_corners=False)[:, :, :wh, :ww]
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            canvas[:, y1:y2, x1:x2] += logits[k]
            count[:, y1:y2, x1:x2] += 1
    return canvas / count


# --------------------------------------------------------------------------- the separable (fast) form


def interp_matrix(n_in: int, n_out: int) -> Tensor:
    """``[n_out, n_in]`` float64 weights of torch's 1-D bilinear resize (``align_corners=False``, no antialias),
    read off ``F.interpolate`` itself (each input position as a unit impulse), so they are exactly its weights."""
    if n_in == n_out:
        return torch.eye(n_in, dtype=torch.float64)
    eye = torch.eye(n_in, dtype=torch.float64).view(1, n_in, n_in, 1)  # channel c = impulse at row c
    return F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[0, :, :, 0].T


@dataclass(frozen=True)
class WindowPlan:
    """The sliding windows of one (resized) ``h`` x ``w`` image: window starts per axis (the windows are their
    product, row-major, as :func:`slide_windows`), the window size, its patch-padded size and its patch grid."""

    h: int
    w: int
    ys: Tuple[int, ...]
    xs: Tuple[int, ...]
    wh: int
    ww: int
    ph: int
    pw: int
    patch: int

    @property
    def grid(self) -> Tuple[int, int]:
        return self.ph // self.patch, self.pw // self.patch

    @property
    def windows(self) -> List[Tuple[int, int, int, int]]:
        return [(y, y + self.wh, x, x + self.ww) for y in self.ys for x in self.xs]


def plan_windows(h: int, w: int, crop: int, stride: int, patch: int) -> WindowPlan:
    """The :class:`WindowPlan` of an ``h`` x ``w`` image (same windows as :func:`slide_windows`)."""
    windows = slide_windows(h, w, crop, stride)
    ys = tuple(sorted({y1 for y1, _, _, _ in windows}))
    xs = tuple(sorted({x1 for _, _, x1, _ in windows}))
    wh, ww = min(crop, h), min(crop, w)
    return WindowPlan(h, w, ys, xs, wh, ww, math.ceil(wh / patch) * patch, math.ceil(ww / patch) * patch, patch)


@functools.lru_cache(maxsize=256)
def _axis_operator(starts: Tuple[int, ...], win: int, padded: int, grid: int, length: int, out_len: int) -> Tensor:
    """``[out_len, len(starts) * grid]`` float64: one axis of steps 3-4 as one matrix. Window i's patch logits
    are upsampled to the padded window (bilinear), cropped to the window, placed at ``starts[i]``, summed and
    divided by the number of windows covering each position, then resized from ``length`` to ``out_len``.
    Cached: a dataset's images share few sizes."""
    up = interp_matrix(grid, padded)[:win]  # [win, grid]
    op = torch.zeros(length, len(starts) * grid, dtype=torch.float64)
    count = torch.zeros(length, dtype=torch.float64)
    for i, s in enumerate(starts):
        op[s : s + win, i * grid : (i + 1) * grid] = up
        count[s : s + win] += 1
    op /= count[:, None]
    return op if out_len == length else interp_matrix(length, out_len) @ op


@functools.lru_cache(maxsize=64)
def _operators(plan: WindowPlan, size: Tuple[int, int], scale: float, device: torch.device) -> Tuple[Tensor, Tensor]:
    """The two axis operators of :func:`assemble_windows` in fp32 on ``device`` (``scale`` folded into the first),
    cached so that images of a size seen before cost no host-to-device copy."""
    gh, gw = plan.grid
    a_h = _axis_operator(plan.ys, plan.wh, plan.ph, gh, plan.h, size[0]) * scale
    a_w = _axis_operator(plan.xs, plan.ww, plan.pw, gw, plan.w, size[1])
    return a_h.to(device, torch.float32), a_w.to(device, torch.float32)


def assemble_windows(logits: Tensor, plan: WindowPlan, size: Tuple[int, int], scale: float = 1.0) -> Tensor:
    """``scale`` times the window-averaged cosine map of :func:`slide_cosine`, resized to ``size`` (step 4's
    resize), from the windows' patch-level logits ``[n_windows, C, gh, gw]`` (row-major, as ``plan.windows``):
    ``[C, *size]``.

    Upsampling, placement, overlap averaging and the final resize are linear and act on the two axes separately
    (the windows form a grid, so the window count is a product too), so the whole chain is ``A_h · L · A_wᵀ`` per
    class with two small matrices (the logit scale folded into ``A_h``): equal to the direct form up to float
    rounding, without its per-window ``C x crop x crop`` maps, canvas and extra full-resolution passes. The
    result is a ``[C, H, W]`` view of channels-last memory."""
    gh, gw = plan.grid
    ny, nx = len(plan.ys), len(plan.xs)
    c = logits.shape[1]
    grid = logits.float().view(ny, nx, c, gh, gw).permute(2, 0, 3, 1, 4).reshape(c, ny * gh, nx * gw)
    a_h, a_w = _operators(plan, (int(size[0]), int(size[1])), float(scale), logits.device)
    with torch.autocast(device_type=logits.device.type, enabled=False):  # fp32 under mixed precision
        # the cheaper order (the last product costs C*H*W*(inner size)); either way the result is laid out
        # [H, W, C], so that the per-pixel reductions over classes (softmax, argmax) read contiguous memory
        if a_h.shape[1] <= a_w.shape[1]:
            tmp = torch.matmul(grid, a_w.T).permute(1, 2, 0).reshape(ny * gh, -1)  # [gy, W*C]
            out = torch.matmul(a_h, tmp).view(size[0], size[1], c)
        else:
            tmp = torch.matmul(a_h, grid).permute(1, 2, 0)  # [H, gx, C]
            out = torch.matmul(a_w, tmp)  # [H, W, C]
        return out.permute(2, 0, 1)


def window_crops(image: Tensor, plan: WindowPlan) -> Tensor:
    """The windows of a normalised ``[1,3,h,w]`` image, zero-padded to the patch multiple: ``[n, 3, ph, pw]``."""
    crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in plan.windows])
    if (plan.ph, plan.pw) != (plan.wh, plan.ww):
        crops = F.pad(crops, (0, plan.pw - plan.ww, 0, plan.ph - plan.wh))
    return crops


@torch.no_grad()
def window_logits(model: ZeroShotModel, crops: Sequence[Tensor], classifier: Tensor, window_batch: int = 16) -> List[Tensor]:
    """Patch-level logits ``[n_i, C, gh, gw]`` of each image's window crops (``crops[i]``: ``[n_i, 3, ph, pw]``).

    Windows of all the images go through the vision tower together, ``window_batch`` at a time (windows of one
    padded size per forward), so small images still fill the batch."""
    cls = classifier.float()
    groups: dict = {}
    for i, c in enumerate(crops):
        for k in range(c.shape[0]):
            groups.setdefault(tuple(c.shape[-2:]), []).append((i, k))
    out: List[List[Optional[Tensor]]] = [[None] * c.shape[0] for c in crops]
    for members in groups.values():
        for s in range(0, len(members), window_batch):
            chunk = members[s : s + window_batch]
            batch = torch.stack([crops[i][k] for i, k in chunk])
            _, patches = model.encode_image(batch)  # [b, gh, gw, D]
            with torch.autocast(device_type=batch.device.type, enabled=False):  # scores in fp32 under mixed precision
                logits = torch.einsum("bhwd,cd->bchw", patches.float(), cls.to(batch.device))
            for (i, k), lg in zip(chunk, logits):
                out[i][k] = lg
    return [torch.stack(o) for o in out]  # type: ignore[arg-type]


def _resize_for_windows(image: Tensor, short_side: Optional[int], max_long: int) -> Tensor:
    """Step 1: the keep-ratio bilinear resize (no antialias), on the image's device."""
    _, _, h, w = image.shape
    nh, nw = resized_shape(h, w, short_side, max_long)
    return image if (nh, nw) == (h, w) else F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False)


def _probabilities(x: Tensor, logits: Tensor, plan: WindowPlan, size: Tuple[int, int], scale: float) -> Tensor:
    """Steps 3-4 with PAMR: probabilities on the resized grid, refined by PAMR, resized to ``size``: ``[C, *size]``."""
    probs = pamr_refine(x, torch.softmax(assemble_windows(logits, plan, (plan.h, plan.w), scale), dim=0).unsqueeze(0))
    if (plan.h, plan.w) != tuple(size):
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    return probs[0]


@torch.no_grad()
def segment_image(
    model: ZeroShotModel,
    image: Tensor,
    classifier: Tensor,
    *,
    short_side: Optional[int] = 448,
    crop: int = 448,
    stride: int = 224,
    window_batch: int = 16,
    background: str = "none",
    bg_threshold: Optional[float] = None,
    max_long: int = 2048,
    logit_scale: Optional[float] = None,
    pamr: bool = False,
) -> Tensor:
    """Class probabilities ``[C', H, W]`` at the original size of a normalised ``[1,3,H,W]`` image.

    ``classifier`` holds the class embeddings ``[C, D]`` (:func:`text_classifier`). With ``background="threshold"``
    it holds the foreground classes only and the output gets a leading background channel equal to
    ``bg_threshold`` (C' = C + 1), so that argmax gives background exactly where no foreground probability
    reaches the threshold (ties go to background). ``"none"`` and ``"class"`` return C channels.
    ``pamr=True`` refines the probabilities with PAMR guided by the (resized) image, at the sliding-window
    resolution, and then resizes them to the original size (without it: the cosine map is resized, then softmax).
    """
    if background not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {background!r}")
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image [1,3,H,W], got {tuple(image.shape)}")
    _, _, h, w = image.shape
    x = _resize_for_windows(image, short_side, max_long)
    plan = plan_windows(x.shape[-2], x.shape[-1], crop, stride, get_patch_size(model))
    (logits,) = window_logits(model, [window_crops(x, plan)], classifier.to(image.device), window_batch)
    scale = get_logit_scale(model) if logit_scale is None else logit_scale
    if pamr:
        probs = _probabilities(x, logits, plan, (h, w), scale)
    else:
        probs = torch.softmax(assemble_windows(logits, plan, (h, w), scale), dim=0)
    if background == "threshold":
        thr = FALLBACK_BG_THRESHOLD if bg_threshold is None else float(bg_threshold)
        probs = torch.cat([probs.new_full((1, h, w), thr), probs])
    return probs


def labels_from_probs(probs: Tensor, background: str, bg_threshold: Optional[float]) -> Tensor:
    """The label map ``[H, W]`` (int64) that ``segment_image(...).argmax(0)`` gives, from the class probabilities
    ``[C, H, W]`` *without* the background channel: with ``"threshold"``, 0 where no class probability exceeds the
    threshold (ties go to background), else 1 + the first most probable class; otherwise the first most
    probable class."""
    if background != "threshold":
        return probs.argmax(dim=0)
    thr = FALLBACK_BG_THRESHOLD if bg_threshold is None else float(bg_threshold)
    best, idx = probs.max(dim=0)
    return torch.where(best > thr, idx + 1, torch.zeros_like(idx))


def labels_from_scores(scores: Tensor, background: str, bg_threshold: Optional[float]) -> Tensor:
    """:func:`labels_from_probs` of ``softmax(scores)`` without materialising the probabilities: the softmax keeps
    the order of the classes, and the top probability is ``1 / sum(exp(scores - max))``, as softmax computes it."""
    if background != "threshold":
        return scores.argmax(dim=0)
    thr = FALLBACK_BG_THRESHOLD if bg_threshold is None else float(bg_threshold)
    best, idx = scores.max(dim=0)
    top = 1.0 / torch.exp(scores - best).sum(dim=0)
    return torch.where(top > thr, idx + 1, torch.zeros_like(idx))


@torch.no_grad()
def segment_images(
    model: ZeroShotModel,
    images: Sequence[Tensor],
    classifier: Tensor,
    *,
    short_side: Optional[int] = 448,
    crop: int = 448,
    stride: int = 224,
    window_batch: int = 16,
    background: str = "none",
    bg_threshold: Optional[float] = None,
    max_long: int = 2048,
    logit_scale: Optional[float] = None,
    pamr: bool = False,
) -> List[Tensor]:
    """Label maps ``[H_i, W_i]`` (int64, on the images' device) of several normalised ``[1,3,H_i,W_i]`` images,
    equal to ``segment_image(...).argmax(0)`` for each: the windows of all images share the vision tower's
    batches, and nothing leaves the device (no host sync)."""
    if background not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {background!r}")
    if not images:
        return []
    resized = [_resize_for_windows(im, short_side, max_long) for im in images]
    patch = get_patch_size(model)
    plans = [plan_windows(x.shape[-2], x.shape[-1], crop, stride, patch) for x in resized]
    logits = window_logits(model, [window_crops(x, pl) for x, pl in zip(resized, plans)],
                           classifier.to(images[0].device), window_batch)
    scale = get_logit_scale(model) if logit_scale is None else logit_scale
    out = []
    for im, x, pl, lg in zip(images, resized, plans, logits):
        size = (int(im.shape[-2]), int(im.shape[-1]))
        if pamr:
            out.append(labels_from_probs(_probabilities(x, lg, pl, size, scale), background, bg_threshold))
        else:
            out.append(labels_from_scores(assemble_windows(lg, pl, size, scale), background, bg_threshold))
    return out


def model_variant(model: Any) -> str:
    """What produced the predictions, recorded with every result: the model's (or its vision tower's) ``variant``
    (baselines name their pathway and options, e.g. ``maskclip`` vs ``maskclip-nores``), else its class name."""
    for obj in (model, getattr(model, "vision", None)):
        v = getattr(obj, "variant", None) if obj is not None else None
        if isinstance(v, str) and v:
            return v
    return type(model).__name__
