"""Feature-cache format: ``meta.json``, the ``.npy`` members, and the checks that a cache fits a model.

A feature cache holds the frozen vision tower's outputs for prepared image-caption shards, per sample:

- ``KEY.cls.npy``      ``[V, D]``      CLS token after the final norm (``np.save``, fp16 by default)
- ``KEY.patches.npy``  ``[V, h, w, D]`` patch tokens after the final norm, registers dropped
- ``KEY.txt``          the caption (UTF-8)
- ``KEY.concepts.json`` copied from the prepared shard when present

plus ``sizes.json`` (samples per shard) and ``meta.json`` (vision tower, image size, grid, dim, dtype, views,
source shards). Size: ``h * w * D * 2`` bytes per image and view in fp16 (ViT-B/14 at 224 px: 393 KB, many
times a resized JPEG), so the cache suits COCO-scale data rather than web-scale. Arrays are written with
``np.save`` and read with ``np.load(allow_pickle=False)``; nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from simzss.config import ModelConfig

log = logging.getLogger(__name__)


CACHE_FORMAT = "simzss-feature-cache"
CACHE_VERSION = 1
META_FILE = "meta.json"
DTYPES: Dict[str, np.dtype] = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}


class CacheError(ValueError):
    """A feature cache that is missing, incomplete, corrupt or made for another model."""


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    """Decode an ``np.save`` member; object arrays (which would need pickle) raise ``ValueError``."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_cache_meta(cache_dir: str | os.PathLike) -> Dict[str, Any]:
    """Load and sanity-check ``meta.json`` of a feature cache (clear :class:`CacheError` when unusable)."""
    path = Path(cache_dir) / META_FILE
    if not path.is_file():
        raise CacheError(f"{cache_dir} is not a feature cache (no {META_FILE}); "
                         "create one with `simzss cache-features`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"unreadable {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not a simzss feature-cache meta file")
    if meta.get("version") != CACHE_VERSION:
        raise CacheError(f"{path}: cache version {meta.get('version')} not supported (expected {CACHE_VERSION})")
    missing = [k for k in ("vision", "image_size", "grid", "dim", "dtype", "views", "shards") if k not in meta]
    if missing:
        raise CacheError(f"{path} lacks {missing}")
    return meta


def check_cache_compatible(
    meta: Dict[str, Any], model_cfg: ModelConfig, image_size: int, *, fingerprint: Optional[str] = None
) -> None:
    """Refuse (``CacheError``) a cache whose features were not made by the model's vision tower at ``image_size``.

    Compared: timm model name, extra timm kwargs (depth, ...), image size, the weights source (pretrained flag and
    local weights file name), the denoiser (kind and weights file name) and, when given, the fingerprint of the
    tower's weights (:func:`weights_fingerprint`).
    The message names the mismatching config field. A cache made with a random-init tower only matches a model
    config that also asks for a random-init tower, and only the fingerprint shows whether the weights are the same;
    without one a warning says so.
    """
    vis = meta.get("vision", {})
    want = model_cfg.vision
    problems: List[str] = []
    hints: List[str] = []
    if vis.get("name") != want.name:
        problems.append(f"vision tower {vis.get('name')!r} != model's {want.name!r} (model.vision.name)")
    if int(meta.get("image_size", -1)) != int(image_size):
        problems.append(f"image size {meta.get('image_size')} != training image size {image_size} (data.image_size)")
    if dict(vis.get("model_kwargs") or {}) != dict(want.model_kwargs or {}):
        problems.append(f"vision model_kwargs {vis.get('model_kwargs')} != model's {dict(want.model_kwargs or {})} "
                        "(model.vision.model_kwargs)")
    cached_den = denoiser_source(vis.get("denoiser", "none"), vis.get("denoiser_weights"))
    model_den = denoiser_source(want.denoiser, want.denoiser_weights)
    if cached_den != model_den:
        problems.append(f"vision denoiser {cached_den} != model's {model_den} "
                        "(model.vision.denoiser / model.vision.denoiser_weights)")
    cached_src = weights_source(vis.get("pretrained", True), vis.get("weights"))
    model_src = weights_source(want.pretrained, want.weights)
    if cached_src != model_src:
        problems.append(f"vision weights {cached_src} != model's {model_src} "
                        "(model.vision.pretrained / model.vision.weights)")
    elif cached_den == model_den and fingerprint is not None and vis.get("fingerprint") not in (None, fingerprint):
        problems.append(f"vision weights fingerprint {vis.get('fingerprint')} != model's {fingerprint} "
                        "(same architecture and weights source, different weights)")
        if cached_src == "random-init":
            hints.append("A random-init tower depends on the seed: save one tower's weights to a file and pass "
                         "it to both (`simzss cache-features --weights FILE`, model.vision.weights=FILE), or use "
                         "pretrained weights")
        else:
            hints.append("Point model.vision.weights at the checkpoint the cache was built from")
    if problems:
        raise CacheError(
            "feature cache does not match the model config: "
            + "; ".join(problems)
            + ". "
            + "".join(h + ". " for h in hints)
            + "Rebuild the cache from this model's vision tower (`simzss cache-features --model-config ...`) "
            "or unset data.feature_cache."
        )
    if cached_src == "random-init" and fingerprint is None:
        log.warning("feature cache was made with a random-init vision tower (only useful for tests); its weights "
                    "are verified only against a fingerprint")


def weights_source(pretrained: bool, weights: Optional[str]) -> str:
    if weights:
        return f"file:{os.path.basename(str(weights))}"
    return "pretrained" if pretrained else "random-init"


def denoiser_source(denoiser: Optional[str], weights: Optional[str]) -> str:
    """The denoiser setting as caches record it (caches from before denoisers existed have none)."""
    if not denoiser or denoiser == "none":
        return "none"
    return f"{denoiser} (file:{os.path.basename(str(weights))})" if weights else f"{denoiser} (random-init)"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short SHA-256 over a module's parameters and buffers (names, shapes, bytes): identifies its weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]



def meta_settings(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The part of ``meta.json`` that must agree for a rerun to continue an existing cache."""
    vis = meta.get("vision") or {}
    tower = (vis.get("name"), vis.get("model_kwargs"), weights_source(vis.get("pretrained", True), vis.get("weights")),
             denoiser_source(vis.get("denoiser", "none"), vis.get("denoiser_weights")))
    keys = ("image_size", "dtype", "views", "augment", "crop_scale", "seed")
    return {"tower": tower, **{k: meta.get(k) for k in keys}}

