"""Feature-cache format: ``meta.json``, the feature arrays, the caption shards, and the checks that a cache fits.

A feature cache stores the frozen vision tower's outputs ONCE PER IMAGE, however many captions the image has
(COCO: 5), and maps every caption to its image:

- ``cls.npy``      ``[N, V, D]``       CLS token after the final norm, for N images and V views each
- ``patches.npy``  ``[N, V, h, w, D]`` patch tokens after the final norm, registers dropped
- caption shards (the source shards' names): ``KEY.txt``, ``KEY.concepts.json`` (copied when present) and
  ``KEY.image`` (the image's row in the arrays, ASCII decimal); ``sizes.json`` counts their samples
- ``meta.json``: vision tower, image size, grid, dim, dtype, views, augmentation, seed, number of images and
  samples, the source shards and their fingerprint (size + mtime), and ``complete``

The arrays are plain ``.npy`` files (``np.save`` header + raw data, never pickled), so the reader memory-maps
them (``data.feature_cache_device: disk``) or loads them into pinned host RAM or GPU memory (``ram``, ``gpu``).
Storage dtype ``fp16`` or ``bf16`` (numpy has no bf16: stored as its uint16 bit pattern, the dtype is in
``meta.json``) or ``fp32``. Size: ``N * V * (1 + h*w) * D * 2`` bytes in fp16/bf16 (:func:`cache_nbytes`);
COCO train2017 with ViT-B/14 at 224 px: 118,287 x 257 x 768 x 2 B = 46.7 GB per view (docs/feature_cache.md).

An image's identity (which captions share one stored image) is its ``image_id`` from ``KEY.json`` when present
(COCO shards written by ``simzss shards``), else the SHA-256 of its encoded bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from simzss.config import ModelConfig

log = logging.getLogger(__name__)


CACHE_FORMAT = "simzss-feature-cache"
CACHE_VERSION = 2
META_FILE = "meta.json"
CLS_FILE = "cls.npy"
PATCHES_FILE = "patches.npy"
#: caption-shard member holding the row of the sample's image in the arrays
IMAGE_ROW_MEMBER = "image"
#: storage dtype name -> (numpy dtype of the .npy file, torch dtype of the features); bf16 is stored as its bits
DTYPES: Dict[str, tuple] = {
    "fp16": (np.dtype(np.float16), torch.float16),
    "bf16": (np.dtype(np.uint16), torch.bfloat16),
    "fp32": (np.dtype(np.float32), torch.float32),
}


class CacheError(ValueError):
    """A feature cache that is missing, incomplete, corrupt or made for another model."""


def load_meta_file(cache_dir: str | os.PathLike, fix: str) -> Optional[Dict[str, Any]]:
    """``meta.json`` of ``cache_dir`` parsed and checked to be a feature cache's; None when there is none.
    :class:`CacheError` (its message ending with ``fix``) when it is unreadable or another tool's file."""
    path = Path(cache_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"unreadable {path} ({e}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not a simzss feature-cache meta file; {fix}")
    return meta


def read_cache_meta(cache_dir: str | os.PathLike) -> Dict[str, Any]:
    """Load and sanity-check ``meta.json`` of a feature cache (clear :class:`CacheError` when unusable)."""
    path = Path(cache_dir) / META_FILE
    meta = load_meta_file(cache_dir, "rebuild it with `simzss cache-features --overwrite`")
    if meta is None:
        raise CacheError(f"{cache_dir} is not a feature cache (no {META_FILE}); "
                         "create one with `simzss cache-features`")
    if meta.get("version") != CACHE_VERSION:
        raise CacheError(f"{path}: cache version {meta.get('version')} not supported (expected {CACHE_VERSION}); "
                         "rebuild it with `simzss cache-features --overwrite`")
    missing = [k for k in ("vision", "image_size", "grid", "dim", "dtype", "views", "shards", "num_images")
               if k not in meta]
    if missing:
        raise CacheError(f"{path} lacks {missing}")
    if meta["dtype"] not in DTYPES:
        raise CacheError(f"{path}: unknown dtype {meta['dtype']!r} (expected one of {sorted(DTYPES)})")
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
    keys = ("image_size", "dtype", "views", "augment", "crop_scale", "interpolation", "decode", "seed")
    return {"tower": tower, **{k: meta.get(k) for k in keys}}


def feature_shapes(meta: Dict[str, Any]) -> Dict[str, tuple]:
    """The shapes of ``cls.npy`` and ``patches.npy`` that ``meta`` describes."""
    n, v, d = int(meta["num_images"]), int(meta["views"]), int(meta["dim"])
    h, w = (int(g) for g in meta["grid"])
    return {CLS_FILE: (n, v, d), PATCHES_FILE: (n, v, h, w, d)}


def cache_nbytes(num_images: int, views: int, grid: Sequence[int], dim: int, dtype: str = "fp16") -> int:
    """Bytes of a cache's feature arrays: ``num_images * views * (1 + h*w) * dim * itemsize``."""
    itemsize = DTYPES[dtype][0].itemsize
    return int(num_images) * int(views) * (1 + int(grid[0]) * int(grid[1])) * int(dim) * itemsize


def input_fingerprint(paths: Sequence[str]) -> Dict[str, List[int]]:
    """``{shard file name: [size, mtime_ns]}`` of the source shards: a rebuilt input changes it."""
    out: Dict[str, List[int]] = {}
    for p in paths:
        st = os.stat(p)
        out[os.path.basename(p)] = [int(st.st_size), int(st.st_mtime_ns)]
    return out


def image_identity(sample: Dict[str, Any], image_bytes: bytes) -> tuple:
    """``(kind, id)`` of a source sample's image: ``("image_id", ...)`` from ``KEY.json`` when it has one (COCO
    shards), else ``("sha256", hex digest of the encoded image)``. Captions with equal identities share one
    stored image."""
    raw = sample.get("json")
    if raw:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("image_id"), (int, str)) and str(doc["image_id"]).strip():
            return ("image_id", str(doc["image_id"]))
    return ("sha256", hashlib.sha256(image_bytes).hexdigest())
