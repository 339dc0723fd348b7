"""Image decoding and the train / eval transforms (torchvision v2), ImageNet mean/std.

DINOv2 was trained with ImageNet normalisation, so every image fed to the frozen vision tower goes
through :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (not CLIP's statistics).
"""

from __future__ import annotations

import io
import math
from typing import Sequence, Tuple

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

IMAGENET_MEAN: Tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
IMAGENET_STD: Tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]

# RandomResizedCrop's default aspect-ratio range; decode_min_size relies on it.
CROP_RATIO: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


def _check_crop_scale(crop_scale: Sequence[float]) -> Tuple[float, float]:
    lo, hi = (float(s) for s in crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
    return lo, hi


def train_transform(image_size: int, crop_scale: Sequence[float] = (0.9, 1.0)) -> v2.Compose:
    """Training augmentation: random resized crop to ``image_size``, float tensor, ImageNet-normalised."""
    scale = _check_crop_scale(crop_scale)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale, ratio=CROP_RATIO, antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def train_crop(image_size: int, crop_scale: Sequence[float] = (0.9, 1.0)) -> v2.Compose:
    """The per-image half of :func:`train_transform`: random resized crop to a uint8 [3,H,W] tensor.

    The training stream crops each image with this and normalises whole batches with
    :func:`normalize_batch` (same result, about half the per-image cost of float conversion).
    """
    scale = _check_crop_scale(crop_scale)
    return v2.Compose([v2.RandomResizedCrop(image_size, scale=scale, ratio=CROP_RATIO, antialias=True), v2.ToImage()])


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float32 scaled to [0, 1] and ImageNet-normalised (ToDtype + Normalize)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def eval_transform(
    image_size: int, interpolation: v2.InterpolationMode = v2.InterpolationMode.BICUBIC
) -> v2.Compose:
    """Evaluation transform: resize the short side to ``image_size``, center crop, ImageNet-normalised."""
    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def decode_min_size(image_size: int, crop_scale: Sequence[float] = (0.9, 1.0)) -> int:
    """Smallest short side a decoded training image may have so that no crop is ever upsampled.

    RandomResizedCrop takes a crop of area ``s * W * H`` (s >= scale_min) with aspect ratio r in
    [3/4, 4/3]; its shorter side is ``sqrt(s * W * H * min(r, 1/r)) >= short_side * sqrt(scale_min * 3/4)``
    because ``W * H >= short_side**2``. Requiring that bound to be >= image_size gives the value below;
    it also covers the centre-crop fallback (crop side ~ short side). Only then may JPEG draft mode shrink
    the image: the crop box is sampled relative to the image, so the augmentation distribution is
    unchanged up to resampling, and every crop is still downsampled (never upsampled) to image_size.
    """
    lo, _ = _check_crop_scale(crop_scale)
    return math.ceil(image_size / math.sqrt(lo * min(CROP_RATIO[0], 1.0 / CROP_RATIO[1])))


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img``; transparent pixels are composited onto white instead of losing alpha blindly."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit-depth greyscale: scale to 8 bit rather than clipping everything to white.
        img = img.convert("F")
        lo, hi = img.getextrema()
        span = (hi - lo) or 1.0
        img = img.point(lambda v: (v - lo) * 255.0 / span).convert("L")
    return img.convert("RGB")  # L, CMYK, YCbCr, 1, ...


def decode_image(data: bytes, min_size: int = 0) -> Image.Image:
    """Decode image bytes (JPEG, PNG, WebP, ...) into an RGB PIL image.

    For JPEGs, libjpeg's reduced-scale decoding (PIL draft mode, 1/2, 1/4 or 1/8) is used whenever the
    result keeps a short side >= ``min_size`` (see :func:`decode_min_size`); this makes decoding large
    photos several times cheaper. ``min_size <= 0`` decodes at full resolution. Corrupt or truncated
    data raises (``PIL.UnidentifiedImageError`` / ``OSError`` / ``ValueError``); callers count and skip.
    """
    img = Image.open(io.BytesIO(data))
    if min_size > 0 and img.format == "JPEG" and min(img.size) >= 2 * min_size:
        # draft picks the largest power-of-two factor f <= min(W // min_size, H // min_size),
        # so the decoded short side stays >= min_size.
        img.draft("RGB", (min_size, min_size))
    img.load()  # decode now so that truncated data fails here, not in the transform
    return _to_rgb(img)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CROP_RATIO",
    "train_transform",
    "train_crop",
    "normalize_batch",
    "eval_transform",
    "decode_min_size",
    "decode_image",
]
