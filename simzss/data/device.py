"""Moving a training batch to the device: uint8 crops become normalised float images there, and with
``data.decode=gpu`` the encoded JPEGs are decoded (nvJPEG through ``torchvision.io.decode_jpeg``) and cropped there.

The trainer calls :func:`to_device` once per batch, ideally one step ahead (the copies are non-blocking from
pinned memory). Normalising on the device gives the numbers of the former float pipeline
(``ToDtype(scale=True)`` + ``Normalize``) up to float rounding, at a quarter of the bytes copied.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import List, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from simzss.data.batch import Batch, EncodedImages
from simzss.data.decode import orient, resized_crop
from simzss.data.transforms import normalize_batch

logger = logging.getLogger(__name__)


def decode_on_device(encoded: EncodedImages, device: torch.device) -> torch.Tensor:
    """uint8 [B,3,S,S] crops of ``encoded`` on ``device``: JPEGs decoded there (one batched nvJPEG call on CUDA),
    oriented and cropped with their boxes; payloads already cropped by the worker are copied as they are.

    A JPEG that fails to decode on the device (the worker checked its header and end marker) is decoded again
    on the CPU; if that fails too it becomes a zero crop, logged as a warning (the batch size is fixed by now).
    """
    jpeg_rows = [i for i, d in enumerate(encoded.data) if d.dim() == 1]
    out: List[torch.Tensor] = [d.to(device, non_blocking=True) if d.dim() == 3 else d for d in encoded.data]
    if jpeg_rows:
        payloads = [encoded.data[i] for i in jpeg_rows]
        try:
            decoded = decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(p, device) for p in payloads]
        boxes = encoded.boxes.tolist()
        for i, image in zip(jpeg_rows, decoded):
            top, left, height, width, orientation = boxes[i]
            if image is None:
                out[i] = torch.zeros(3, encoded.size, encoded.size, dtype=torch.uint8, device=device)
                continue
            out[i] = resized_crop(orient(image, orientation), (top, left, height, width), encoded.size,
                                  encoded.interpolation)
    return torch.stack(out)


def _decode_one(payload: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    for where in (device, torch.device("cpu")):
        try:
            return decode_jpeg(payload, mode=ImageReadMode.RGB, device=where).to(device)
        except RuntimeError as exc:
            last = exc
    logger.warning("a JPEG failed to decode on %s and on the CPU (%s); it is replaced by a black crop", device, last)
    return None


def to_device(
    batch: Batch,
    device: torch.device | str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    non_blocking: bool = True,
) -> Batch:
    """``batch`` on ``device`` with float images normalised by ``mean``/``std`` (the vision tower's statistics).

    uint8 ``images`` [B,3,H,W] are copied as uint8 and converted and normalised on the device; ``encoded`` JPEGs
    (``data.decode=gpu``) are decoded and cropped there first; float images (already normalised, e.g. tests) and
    cached features are only moved. Copies are non-blocking (asynchronous from pinned memory on CUDA).
    """
    device = torch.device(device)
    moved = batch.to(device, non_blocking=non_blocking)
    if batch.encoded is not None:
        moved = dataclasses.replace(moved, images=decode_on_device(batch.encoded, device), encoded=None)
    if moved.images is not None and moved.images.dtype == torch.uint8:
        moved = dataclasses.replace(moved, images=normalize_batch(moved.images, mean, std))
    return moved


__all__ = ["to_device", "decode_on_device"]
