"""Fast training decode-and-crop on uint8 tensors, and its split for decoding on the GPU (``data.decode``).

Every crop box is drawn from the header alone (size and EXIF orientation) with the same torch RNG draws as
torchvision's ``RandomResizedCrop`` on the EXIF-oriented full-resolution image, so a sample's box depends only on
its seed, whether the pixels are then decoded on the CPU (:func:`decode_crop`) or on the device
(:func:`plan_crop` in the worker, :func:`simzss.data.device.decode_on_device` after the copy).

On the CPU, JPEGs are decoded with libjpeg's DCT scaling (1/2, 1/4, 1/8) whenever the crop box, at that scale,
still covers at least ``image_size`` pixels on its short side (so no crop is ever upsampled because of it),
then cropped and resized on the uint8 tensor (torchvision v2). Other formats are decoded by PIL at full size.
The EXIF orientation is applied everywhere (as ``load_image`` does for eval and segment).
"""

from __future__ import annotations

import io
from typing import Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from simzss.data.transforms import (
    CROP_RATIO,
    DEFAULT_MAX_IMAGE_PIXELS,
    _check_crop_scale,
    _to_rgb,
    interpolation_mode,
    open_image,
)

_EXIF_ORIENTATION = 0x0112
_JPEG_SCALES = (8, 4, 2)  # largest first


Box = Tuple[int, int, int, int]  # top, left, height, width


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8) of an opened image; 1 when absent or invalid."""
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # untrusted metadata: any parse error means "no orientation"
        return 1
    return value if 1 <= value <= 8 else 1


def oriented_size(width: int, height: int, orientation: int) -> Tuple[int, int]:
    """(width, height) of the image once its EXIF orientation is applied (5-8 swap the axes)."""
    return (height, width) if orientation >= 5 else (width, height)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF orientation ``orientation`` to a [..., C, H, W] tensor (what PIL's ``exif_transpose`` does)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


def crop_box(height: int, width: int, crop_scale: Sequence[float]) -> Box:
    """A random-resized-crop box of a ``height`` x ``width`` image, drawn from the torch RNG exactly as
    ``v2.RandomResizedCrop(scale=crop_scale, ratio=CROP_RATIO)`` draws it (no pixels needed)."""
    rrc = v2.RandomResizedCrop(1, scale=_check_crop_scale(crop_scale), ratio=CROP_RATIO)
    shape_only = torch.empty((1, 1, 1), dtype=torch.uint8).expand(3, height, width)
    p = rrc.make_params([shape_only])
    return int(p["top"]), int(p["left"]), int(p["height"]), int(p["width"])


def resized_crop(image: torch.Tensor, box: Box, size: int, interpolation: str) -> torch.Tensor:
    """Crop ``box`` out of a uint8 [3,H,W] tensor and resize it to ``size`` x ``size`` (antialiased), on
    whatever device the tensor is; uint8 in, uint8 out."""
    top, left, height, width = box
    return TF.resized_crop(image, top, left, height, width, [size, size],
                           interpolation=interpolation_mode(interpolation), antialias=True)


def _scaled_box(box: Box, scale: int, height: int, width: int) -> Box:
    """``box`` (full-resolution coordinates) on an image decoded at 1/``scale`` (``height`` x ``width``)."""
    top, left, h, w = box
    t, l = min(height - 1, top // scale), min(width - 1, left // scale)
    return t, l, max(1, min(height - t, round(h / scale))), max(1, min(width - l, round(w / scale)))


def _open(data: bytes, max_pixels: int, name: Optional[str], scale: int = 1) -> Image.Image:
    return open_image(io.BytesIO(data), max_pixels=max_pixels, name=name, scale=scale)


def decode_crop(
    data: bytes,
    image_size: int,
    crop_scale: Sequence[float] = (0.9, 1.0),
    interpolation: str = "bicubic",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    name: Optional[str] = None,
) -> torch.Tensor:
    """Decode image bytes and take a random resized crop: uint8 [3, image_size, image_size], EXIF applied.

    The box is :func:`crop_box` of the oriented full-resolution size (one draw from the torch RNG: seed it
    for a reproducible crop). Raises :class:`~simzss.data.transforms.ImageTooLargeError` over ``max_pixels``
    and PIL/torchvision errors on corrupt data (callers count and skip).
    """
    header = _open(data, max_pixels, name)
    width, height = header.size
    orientation = exif_orientation(header)
    box = crop_box(*reversed(oriented_size(width, height, orientation)), crop_scale)
    # the largest DCT scale that keeps the crop's short side >= image_size
    scale = next((s for s in _JPEG_SCALES if min(box[2], box[3]) // s >= image_size), 1)
    if header.format == "JPEG" and header.mode in ("RGB", "L") and scale == 1 and max_pixels_ok(header, max_pixels):
        header.close()
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    else:
        header.close()
        img = _open(data, max_pixels, name, scale=scale)  # the cap may ask for more reduction than we did
        img.load()
        pixels = TF.pil_to_tensor(_to_rgb(img))
    pixels = orient(pixels, orientation)
    factor = round(max(height, width) / max(pixels.shape[-2:]))  # 1, 2, 4 or 8 (libjpeg rounds sizes up)
    if factor > 1:
        box = _scaled_box(box, factor, pixels.shape[-2], pixels.shape[-1])
    return resized_crop(pixels, box, image_size, interpolation)


def max_pixels_ok(img: Image.Image, max_pixels: int) -> bool:
    """Whether ``img`` decodes at full size under the pixel cap (0: no cap)."""
    return max_pixels <= 0 or img.size[0] * img.size[1] <= max_pixels



def plan_crop(
    data: bytes,
    image_size: int,
    crop_scale: Sequence[float] = (0.9, 1.0),
    interpolation: str = "bicubic",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    name: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a worker ships for ``data.decode=gpu``: ``(payload, box)``.

    For a baseline/progressive RGB or greyscale JPEG that decodes at full size under the cap, ``payload`` is the
    encoded bytes (uint8 [N]) and ``box`` [5] long the crop box of :func:`crop_box` in the oriented
    full-resolution image plus the EXIF orientation, drawn with the same RNG draws as :func:`decode_crop`.
    Anything else (PNG, CMYK JPEG, an image over the cap) is decoded and cropped here: ``payload`` is then the
    uint8 [3, image_size, image_size] crop and ``box`` is all zeros. Corrupt data raises, as in decode_crop.
    """
    header = _open(data, max_pixels, name)
    if header.format != "JPEG" or header.mode not in ("RGB", "L") or not max_pixels_ok(header, max_pixels):
        header.close()
        return (decode_crop(data, image_size, crop_scale, interpolation, max_pixels, name),
                torch.zeros(5, dtype=torch.long))
    width, height = header.size
    orientation = exif_orientation(header)
    header.close()
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):  # nvJPEG fails the whole batch on a truncated file
        raise OSError("truncated JPEG (no end-of-image marker)")
    box = crop_box(*reversed(oriented_size(width, height, orientation)), crop_scale)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor([*box, orientation])


__all__ = [
    "Box",
    "crop_box",
    "decode_crop",
    "exif_orientation",
    "orient",
    "oriented_size",
    "plan_crop",
    "resized_crop",
]
