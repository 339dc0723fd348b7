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

Background handling (``background``): ``"none"``; ``"threshold"`` (background wherever the highest foreground
probability is below ``bg_threshold``); ``"class"`` ("background" is embedded like any other class name).
Optional ``pamr=True`` (off by default): the probabilities are refined with PAMR (:mod:`simzss.models.pamr`, TCL's
10 iterations, dilations 1-24) on the resized image before step 4's resize, the threshold compared afterwards.
Dataset evaluation (defaults per benchmark, mIoU) is :mod:`simzss.eval.segmentation`.
"""

from __future__ import annotations

import itertools
import math
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
    """Window-averaged cosine map ``[C, H, W]`` of a normalised ``[1,3,H,W]`` image (no resizing)."""
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
    _, _, h, w = image.shape
    nh, nw = resized_shape(h, w, short_side, max_long)
    x = image if (nh, nw) == (h, w) else F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False)
    cos = slide_cosine(model, x, classifier, crop=crop, stride=stride, window_batch=window_batch)
    scale = get_logit_scale(model) if logit_scale is None else logit_scale
    if pamr:
        probs = pamr_refine(x, torch.softmax(cos * scale, dim=0).unsqueeze(0))
        if (nh, nw) != (h, w):
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        probs = probs[0]
    else:
        if (nh, nw) != (h, w):
            cos = F.interpolate(cos.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False)[0]
        probs = torch.softmax(cos * scale, dim=0)
    if background == "threshold":
        thr = FALLBACK_BG_THRESHOLD if bg_threshold is None else float(bg_threshold)
        probs = torch.cat([probs.new_full((1, h, w), thr), probs])
    return probs


