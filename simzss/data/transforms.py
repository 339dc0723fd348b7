"""Image decoding and the train / eval transforms (torchvision v2), ImageNet mean/std.

DINOv2 was trained with ImageNet normalisation, so every image fed to the frozen vision tower goes
through :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (not CLIP's statistics). Every decode goes through
:func:`open_image`, which caps the pixels decoded (:data:`DEFAULT_MAX_IMAGE_PIXELS`, configurable).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import IO, Sequence, Tuple, Union

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

IMAGENET_MEAN: Tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
IMAGENET_STD: Tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]

# RandomResizedCrop's default aspect-ratio range; decode_min_size relies on it.
CROP_RATIO: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

#: Most pixels (width x height, after reduced-size JPEG decoding) any input image may be decoded to: 40 Mpx,
#: e.g. 8000 x 5000 (120 MB as RGB). JPEGs above it are decoded at 1/2, 1/4 or 1/8 scale when that fits;
#: other images above it are refused (:class:`ImageTooLargeError`). ``data.max_image_pixels`` (training) and
#: ``simzss segment --max-pixels`` change it; ``0`` disables the cap (Pillow's bomb check still applies).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

_JPEG_SCALES = (1, 2, 4, 8)  # what libjpeg can decode at reduced size


class ImageTooLargeError(ValueError):
    """An image larger than the decode cap (or Pillow's decompression-bomb limit)."""


INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """The torchvision mode of a config name (``bilinear`` | ``bicubic``); ValueError naming the choices."""
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}") from None


def _check_crop_scale(crop_scale: Sequence[float]) -> Tuple[float, float]:
    lo, hi = (float(s) for s in crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
    return lo, hi


def train_transform(
    image_size: int, crop_scale: Sequence[float] = (0.9, 1.0), interpolation: str = "bilinear"
) -> v2.Compose:
    """Training augmentation: random resized crop to ``image_size``, float tensor, ImageNet-normalised."""
    scale = _check_crop_scale(crop_scale)
    mode = interpolation_mode(interpolation)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale, ratio=CROP_RATIO, interpolation=mode, antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def train_crop(
    image_size: int, crop_scale: Sequence[float] = (0.9, 1.0), interpolation: str = "bilinear"
) -> v2.Compose:
    """The per-image half of :func:`train_transform`: random resized crop to a uint8 [3,H,W] tensor.

    The training stream's ``pil`` decoder crops each image with this; whole batches are normalised on the device
    with :func:`normalize_batch` (same result as :func:`train_transform`).
    """
    scale = _check_crop_scale(crop_scale)
    mode = interpolation_mode(interpolation)
    return v2.Compose(
        [v2.RandomResizedCrop(image_size, scale=scale, ratio=CROP_RATIO, interpolation=mode, antialias=True), v2.ToImage()]
    )


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float32 scaled to [0, 1] and normalised (ToDtype + Normalize), on the images'
    device; ImageNet statistics by default."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    m = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(3, 1, 1).to(images.device)
    s = torch.tensor([float(v) for v in std], dtype=torch.float32).view(3, 1, 1).to(images.device)
    return images.to(torch.float32).div_(255.0).sub_(m).div_(s)


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


def open_image(
    fp: Union[str, "os.PathLike[str]", IO[bytes]],
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    min_size: int = 0,
    reduce: bool = True,
    name: str | None = None,
    scale: int = 1,
) -> Image.Image:
    """Open an image lazily (header only) and set up a decode that stays under ``max_pixels``.

    With ``reduce``, JPEGs use libjpeg's reduced-scale decoding (PIL draft mode, 1/2, 1/4 or 1/8): the
    largest scale that keeps the short side >= ``min_size`` (see :func:`decode_min_size`; ``0``: none), or
    ``scale`` when that is larger (a caller that knows its crop, :func:`decode_crop`), or a larger one when
    needed to fit under ``max_pixels``. An image that cannot fit (any format without ``reduce``; PNG, WebP...
    always) raises :class:`ImageTooLargeError` naming its size and the limit before any pixel is decoded.
    ``max_pixels <= 0`` disables the cap. ``name`` is used in messages.
    """
    where = name or (os.fspath(fp) if isinstance(fp, (str, os.PathLike)) else "image")
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{where}: {e}; downscale the image first (e.g. to under 40 Mpx)") from None
    scale = _decode_scale(img, where, max_pixels=max_pixels, min_size=min_size, reduce=reduce, scale=scale)
    if scale > 1:
        w, h = img.size
        # draft picks the largest scale f with f <= min(W // w', H // h'); (W // s, H // s) yields exactly s.
        img.draft("RGB", (max(1, w // scale), max(1, h // scale)))
    return img


def _decode_scale(img: Image.Image, where: str, *, max_pixels: int, min_size: int, reduce: bool, scale: int) -> int:
    """The reduced-size decoding factor of :func:`open_image` (1 = full size); raises ImageTooLargeError."""
    w, h = img.size
    jpeg = reduce and img.format == "JPEG"
    chosen = 1
    if jpeg:
        if min_size > 0:
            fit = min(w, h) // min_size
            chosen = max([s for s in _JPEG_SCALES if s <= fit] or [1])
        chosen = max(chosen, max(s for s in _JPEG_SCALES if s <= max(1, scale)))
    if max_pixels > 0 and math.ceil(w / chosen) * math.ceil(h / chosen) > max_pixels:
        fitting = [s for s in _JPEG_SCALES if s >= chosen and math.ceil(w / s) * math.ceil(h / s) <= max_pixels]
        if not jpeg or not fitting:
            img.close()
            raise ImageTooLargeError(
                f"{where}: {w}x{h} pixels ({w * h / 1e6:.1f} Mpx) is above the decode limit of "
                f"{max_pixels / 1e6:g} Mpx; downscale the image first or raise the limit "
                "(data.max_image_pixels / --max-pixels)"
            )
        chosen = fitting[0]
    return chosen


def decode_image(data: bytes, min_size: int = 0, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes (JPEG, PNG, WebP, ...) into an RGB PIL image, EXIF orientation applied (as everywhere).

    For JPEGs, libjpeg's reduced-scale decoding (PIL draft mode, 1/2, 1/4 or 1/8) is used whenever the
    result keeps a short side >= ``min_size`` (see :func:`decode_min_size`); this makes decoding large
    photos several times cheaper. ``min_size <= 0`` decodes at full resolution (unless the pixel cap needs
    less, see :func:`open_image`). An image over ``max_pixels`` raises :class:`ImageTooLargeError`; corrupt
    or truncated data raises (``PIL.UnidentifiedImageError`` / ``OSError`` / ``ValueError``); callers
    count and skip.
    """
    img = open_image(io.BytesIO(data), max_pixels=max_pixels, min_size=min_size)
    img.load()  # decode now so that truncated data fails here, not in the transform
    return _to_rgb(ImageOps.exif_transpose(img))


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CROP_RATIO",
    "INTERPOLATIONS",
    "interpolation_mode",
    "train_transform",
    "train_crop",
    "normalize_batch",
    "eval_transform",
    "decode_min_size",
    "decode_image",
    "open_image",
    "load_image",
    "image_to_tensor",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageTooLargeError",
]


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a picture as RGB with its EXIF orientation applied; a clear error if it is missing or unreadable.

    Decoded under the pixel cap (:func:`open_image`): a JPEG above ``max_pixels`` comes back at 1/2, 1/4 or
    1/8 scale, anything else above it raises :class:`ImageTooLargeError` (a ``ValueError``).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image file")
    try:
        with open_image(p, max_pixels=max_pixels) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except ImageTooLargeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{p}: cannot read the image ({e})") from None


def image_to_tensor(
    image: Image.Image, mean: Sequence[float] | torch.Tensor = IMAGENET_MEAN, std: Sequence[float] | torch.Tensor = IMAGENET_STD
) -> torch.Tensor:
    """A PIL picture as a float ``[1, 3, H, W]`` tensor normalised with ``mean``/``std`` (the vision tower's; ImageNet
    by default); no resizing: slide inference resizes."""
    x = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    return TF.normalize(x, mean=[float(m) for m in mean], std=[float(s) for s in std]).unsqueeze(0)
