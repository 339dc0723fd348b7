"""One entry point for every model a command can take: an export folder or a trainer checkpoint."""

from __future__ import annotations

import os

import torch

from simzss.baselines import is_baseline_spec, load_baseline
from simzss.io.checkpoint import load_checkpoint
from simzss.models.pretrained import is_export
from simzss.models.simzss import SimZSS


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", *, build_vision: bool = True) -> SimZSS:
    """An export folder as an eval-mode model (:meth:`SimZSS.from_pretrained`)."""
    return SimZSS.from_pretrained(path, device, build_vision=build_vision)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> SimZSS:
    """Load either an export folder or a trainer checkpoint (run folder, checkpoints folder or step folder), or
    a training-free baseline spec such as ``gem:ViT-B-16/openai`` (:func:`simzss.baselines.load_baseline`)."""
    if is_baseline_spec(path):
        return load_baseline(str(path), device)
    if is_export(path):
        return load_pretrained(path, device)
    return load_checkpoint(path, device)
