"""The training batch: what the data stage hands the model (pixels or cached features, tokens, concept spans).

Images cross process boundaries as uint8 crops (or, with ``data.decode=gpu``, as the encoded JPEGs plus their crop
boxes, :class:`EncodedImages`); :func:`simzss.data.device.to_device` turns them into normalised float images on the
training device. Workers hand over pieces of batches; :meth:`Batch.cat` joins them into exactly what tokenising the
whole batch at once would have given.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

_TENSOR_FIELDS = (
    "images",
    "input_ids",
    "attention_mask",
    "concept_mask",
    "concept_labels",
    "vision_cls",
    "vision_patches",
    "feature_rows",
)


@dataclass
class EncodedImages:
    """Encoded JPEGs still to be decoded and cropped on the training device (``data.decode=gpu``).

    ``boxes`` [B,5] long holds, per image, the random-resized-crop box ``top, left, height, width`` in the
    EXIF-oriented full-resolution image, and the EXIF orientation (1-8) to apply after decoding; they are drawn on
    the CPU with the same per-sample seeds as the CPU path (:func:`simzss.data.transforms.crop_box`).
    """

    data: List[Tensor]  # B x uint8 [N] encoded bytes (stay on the CPU: nvJPEG reads host memory)
    boxes: Tensor  # [B,5] long
    size: int  # output side (data.image_size)
    interpolation: str  # bicubic | bilinear

    def __len__(self) -> int:
        return len(self.data)

    @staticmethod
    def cat(parts: Sequence["EncodedImages"]) -> "EncodedImages":
        """The images of ``parts`` in order (all with the same size and interpolation)."""
        return EncodedImages([d for p in parts for d in p.data], torch.cat([p.boxes for p in parts]),
                             parts[0].size, parts[0].interpolation)

    def rows(self, start: int, stop: int) -> "EncodedImages":
        return EncodedImages(self.data[start:stop], self.boxes[start:stop], self.size, self.interpolation)


@dataclass
class Batch:
    """One training batch (see docs/CONTRACTS.md)."""

    # [B,3,H,W]: uint8 crops from the training stream (normalised on the device by simzss.data.device.to_device)
    # or float, ImageNet-normalised (after to_device, and in tests); None when features are cached or JPEGs are
    # decoded on the device (``encoded``)
    images: Optional[Tensor]
    input_ids: Tensor  # [B,L] long
    attention_mask: Tensor  # [B,L] long
    concept_mask: Tensor  # [B,K,L] bool
    concept_labels: Tensor  # [B,K] long, -1 padding
    captions: List[str]
    keys: List[str]
    skipped: Dict[str, int] = field(default_factory=dict)  # samples skipped by reason since the worker's previous batch
    vision_cls: Optional[Tensor] = None  # [B,D] cached features (simzss.data.features)
    vision_patches: Optional[Tensor] = None  # [B,h,w,D]
    encoded: Optional[EncodedImages] = None  # data.decode=gpu: decoded + cropped by to_device
    # [B] long: rows (image * views + view) of a feature cache served from ram/gpu, set by the data workers and
    # replaced by vision_cls/vision_patches in the main process (simzss.data.features.reader.CachedTrainLoader)
    feature_rows: Optional[Tensor] = None

    def _map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "Batch":
        changes = {name: fn(getattr(self, name)) for name in _TENSOR_FIELDS if getattr(self, name) is not None}
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Copy of the batch with every tensor on ``device`` (``encoded`` JPEGs stay on the host; see to_device)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Copy with tensors in pinned memory (called by the DataLoader's pin-memory thread)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, start: int, stop: int) -> "Batch":
        """Samples ``start:stop`` (views of the tensors; ``skipped`` is not split and stays with the caller)."""
        out = self._map_tensors(lambda t: t[start:stop])
        return dataclasses.replace(
            out, captions=self.captions[start:stop], keys=self.keys[start:stop], skipped={},
            encoded=None if self.encoded is None else self.encoded.rows(start, stop),
        )

    @staticmethod
    def cat(parts: Sequence["Batch"], pad_id: int, pin_memory: bool = False) -> "Batch":
        """The samples of ``parts`` as one batch, exactly as ``tokenize_batch`` over all their captions gives it.

        Token fields are right-padded (``input_ids`` with ``pad_id``, masks with 0/False, labels with -1) to the
        longest caption and the most concepts of the joined rows, and trimmed to them (a piece cut out of a larger
        tokenised group may carry extra padding); ``skipped`` counts are summed. With ``pin_memory`` the result is
        in pinned memory (the images are joined straight into a pinned buffer: one copy, for non-blocking copies).
        """
        if not parts:
            raise ValueError("Batch.cat needs at least one part")
        length = max(_used(p.attention_mask != 0) for p in parts)
        concepts = max(_used(p.concept_labels >= 0) for p in parts)

        def fit(t: Tensor, dim: int, size: int, value: float | int | bool) -> Tensor:
            if t.shape[dim] >= size:
                return t.narrow(dim, 0, size)
            pad_shape = list(t.shape)
            pad_shape[dim] = size - t.shape[dim]
            return torch.cat([t, t.new_full(pad_shape, value)], dim=dim)

        def cat_optional(name: str) -> Optional[Tensor]:
            values = [getattr(p, name) for p in parts]
            if values[0] is None:
                return None
            if not pin_memory:
                return torch.cat(values)
            out = torch.empty((sum(len(v) for v in values), *values[0].shape[1:]), dtype=values[0].dtype,
                              pin_memory=True)
            return torch.cat(values, out=out)

        skipped: Counter[str] = Counter()
        for p in parts:
            skipped.update(p.skipped)
        batch = Batch(
            images=cat_optional("images"),
            input_ids=torch.cat([fit(p.input_ids, 1, length, pad_id) for p in parts]),
            attention_mask=torch.cat([fit(p.attention_mask, 1, length, 0) for p in parts]),
            concept_mask=torch.cat([fit(fit(p.concept_mask, 2, length, False), 1, concepts, False) for p in parts]),
            concept_labels=torch.cat([fit(p.concept_labels, 1, concepts, -1) for p in parts]),
            captions=[c for p in parts for c in p.captions],
            keys=[k for p in parts for k in p.keys],
            skipped=dict(skipped),
            vision_cls=cat_optional("vision_cls"),
            vision_patches=cat_optional("vision_patches"),
            feature_rows=cat_optional("feature_rows"),
            encoded=None if parts[0].encoded is None else EncodedImages.cat([p.encoded for p in parts]),  # type: ignore[misc]
        )
        if not pin_memory:
            return batch
        small = {name: getattr(batch, name).pin_memory() for name in ("input_ids", "attention_mask", "concept_mask",
                                                                       "concept_labels")}
        return dataclasses.replace(batch, **small)


def _used(valid: Tensor) -> int:
    """Columns up to the last True of any row of a [B, N] bool tensor (0 if none)."""
    if valid.numel() == 0:
        return 0
    cols = valid.any(dim=0).nonzero()
    return int(cols[-1]) + 1 if len(cols) else 0
