"""The training batch: what the data stage hands the model (pixels or cached features, tokens, concept spans)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

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
)


@dataclass
class Batch:
    """One training batch (see docs/CONTRACTS.md)."""

    images: Optional[Tensor]  # [B,3,H,W] float, ImageNet-normalised (None when features are cached)
    input_ids: Tensor  # [B,L] long
    attention_mask: Tensor  # [B,L] long
    concept_mask: Tensor  # [B,K,L] bool
    concept_labels: Tensor  # [B,K] long, -1 padding
    captions: List[str]
    keys: List[str]
    skipped: Dict[str, int] = field(default_factory=dict)  # samples skipped by reason since the worker's previous batch
    vision_cls: Optional[Tensor] = None  # [B,D] cached features (simzss.data.features)
    vision_patches: Optional[Tensor] = None  # [B,h,w,D]

    def _map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "Batch":
        changes = {name: fn(getattr(self, name)) for name in _TENSOR_FIELDS if getattr(self, name) is not None}
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Copy of the batch with every tensor on ``device``."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Copy with tensors in pinned memory (called by the DataLoader's pin-memory thread)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])
