"""Training-free baselines (GEM, MaskCLIP on open_clip models) addressed by spec strings, loaded as zero-shot models
that the evaluations, ``simzss segment`` and ``simzss serve`` use exactly like SimZSS exports.

Spec syntax ``KIND:MODEL``:

==========================  ==========================================================================
``gem:ViT-B-16/openai``     GEM on an open_clip model + pretrained tag (open_clip downloads it once)
``maskclip:ViT-B-16/openai``  MaskCLIP as the authors' code computes it (value path + last block's residual/MLP)
``maskclip-nores:...``      the residual-free value path (what ClearCLIP builds on)
``gem:ViT-B-16@FILE``       a local open_clip weights file (``.bin`` / ``.pt`` / ``.safetensors``)
``gem:hf-hub:ORG/REPO``     open_clip's hub / ``local-dir:FOLDER`` schemas
``gem:CONFIG.json/random``  random init from an open_clip model-config file (tests and smoke runs)
``gem-dinov2:EXPORT_DIR``   EXPERIMENTAL: the GEM pathway over the frozen DINOv2 tower of a SimZSS export
==========================  ==========================================================================

An existing path always means a model folder, never a spec.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from simzss.baselines.gem import DEFAULT_ITERATIONS, DEFAULT_LAYERS, GemDinoVision, GemVision
from simzss.baselines.maskclip import MaskClipVision
from simzss.baselines.openclip import ClipZeroShot, load_open_clip, parse_clip_source
from simzss.models.pretrained import is_export
from simzss.models.simzss import SimZSS

KINDS: Dict[str, str] = {
    "gem": "GEM (self-self attention pathway) on an open_clip ViT",
    "maskclip": "MaskCLIP as its authors' code (last-block value path + residual + MLP) on an open_clip ViT",
    "maskclip-nores": "MaskCLIP's value path without the last block's residual and MLP, on an open_clip ViT",
    "gem-dinov2": "EXPERIMENTAL: GEM pathway over the frozen DINOv2 tower of a SimZSS export",
}


def split_spec(spec: str) -> tuple[str, str]:
    """``"gem:ViT-B-16/openai"`` -> ``("gem", "ViT-B-16/openai")``; ValueError for an unknown kind."""
    kind, sep, rest = str(spec).partition(":")
    if not sep or kind not in KINDS:
        raise ValueError(f"{spec!r} is not a baseline spec; use one of {', '.join(k + ':MODEL' for k in KINDS)}")
    if not rest.strip():
        raise ValueError(f"{spec!r}: missing model after '{kind}:', e.g. {kind}:ViT-B-16/openai")
    return kind, rest.strip()


def is_baseline_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a baseline (``gem:...``, ``maskclip:...``) rather than a model folder."""
    text = str(spec)
    kind, sep, _ = text.partition(":")
    return bool(sep) and kind in KINDS and not Path(text).exists()


def load_baseline(
    spec: str,
    device: str | torch.device = "cpu",
    *,
    gem_layers: int = DEFAULT_LAYERS,
    gem_iterations: int = DEFAULT_ITERATIONS,
    gem_temperature: Optional[float] = None,
) -> nn.Module:
    """The zero-shot model of a baseline spec, in eval mode on ``device``.

    ``gem_layers`` (last blocks with the GEM pathway), ``gem_iterations`` and ``gem_temperature`` (None: the
    adaptive one) set GEM's options. Bad specs raise ValueError / FileNotFoundError naming the fix.
    """
    kind, rest = split_spec(spec)
    gem_opts: Dict[str, Any] = dict(layers=gem_layers, iterations=gem_iterations, temperature=gem_temperature)
    if kind == "gem-dinov2":
        if not is_export(rest):
            raise FileNotFoundError(f"{spec}: {rest} is not a SimZSS export folder (simzss export)")
        model = SimZSS.from_pretrained(rest, device)
        if model.vision is None:
            raise ValueError(f"{spec}: the export has no vision tower")
        model.vision = GemDinoVision(model.vision, **gem_opts)
        return model.to(device).eval()
    src = parse_clip_source(rest)
    clip, tokenizer = load_open_clip(src, device)
    if kind == "gem":
        vision: nn.Module = GemVision(clip.visual, **gem_opts)
    else:
        vision = MaskClipVision(clip.visual, residual=(kind == "maskclip"))
    return ClipZeroShot(clip, tokenizer, vision, name=f"{kind}:{src}").to(device)


__all__ = ["KINDS", "split_spec", "is_baseline_spec", "load_baseline"]
