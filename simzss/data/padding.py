"""Dynamic text padding: trim a batch's right padding to its longest caption, rounded up to a multiple.

Option ``data.dynamic_padding``. Called on the CPU batch (before it is copied to the device), so the length is read
without a device sync. Right padding only: the dropped columns are padding in every row, so EOS/CLS/mean pooling,
concept spans and every loss are unchanged (a causal tower's real tokens never see the right padding; a
bidirectional tower masks it; learned absolute positions of the real tokens stay where they were).
"""

from __future__ import annotations

import dataclasses

import torch

from simzss.data.batch import Batch

__all__ = ["trim_padding", "padded_length"]


def padded_length(longest: int, full: int, multiple: int = 8) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, at most ``full`` (and at least 1 when ``full`` is)."""
    if multiple < 1:
        raise ValueError(f"the padding multiple must be >= 1, got {multiple}")
    return min(full, max(1, -(-longest // multiple) * multiple)) if full else 0


def trim_padding(batch: Batch, multiple: int = 8, *, pad_id: int | None = None, max_length: int | None = None) -> Batch:
    """The batch with ``input_ids``, ``attention_mask`` and ``concept_mask`` fitted to the longest caption rounded
    up to ``multiple`` tokens: cut (views, no copy), or, with ``pad_id`` given, also padded up to it (at most
    ``max_length``, the text tower's context), so that every batch has an aligned length whether its tokenizer
    padded to the context or to the longest caption. A batch with padding on the left, or with a concept span
    over the dropped columns, is returned unchanged, as nothing could be trimmed without changing it.
    """
    mask = batch.attention_mask
    if mask.ndim != 2 or mask.shape[1] == 0:
        return batch
    real = mask != 0
    used = real.any(0)
    longest = int(used.nonzero().max()) + 1 if bool(used.any()) else 0  # on the CPU batch: no device sync
    if pad_id is None:
        cap = mask.shape[1]
    else:  # padding up is allowed, to at most the context (but a batch already longer is only cut)
        cap = max(mask.shape[1], max_length) if max_length is not None else longest + multiple
    length = padded_length(longest, cap, multiple)
    if length > mask.shape[1]:
        return _pad_to(batch, length, pad_id)  # type: ignore[arg-type]
    if length == mask.shape[1]:
        return batch
    if bool(batch.concept_mask[..., length:].any()):
        return batch
    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids[:, :length],
        attention_mask=mask[:, :length],
        concept_mask=batch.concept_mask[..., :length],
    )


def _pad_to(batch: Batch, length: int, pad_id: int) -> Batch:
    """Right-pad the token fields to ``length`` columns (ids with ``pad_id``, masks with 0 / False)."""
    extra = length - batch.input_ids.shape[1]

    def pad(t: torch.Tensor, value: int | bool) -> torch.Tensor:  # along the last dim
        return torch.cat([t, t.new_full((*t.shape[:-1], extra), value)], dim=-1)

    return dataclasses.replace(batch, input_ids=pad(batch.input_ids, pad_id), attention_mask=pad(batch.attention_mask, 0),
                               concept_mask=pad(batch.concept_mask, False))
