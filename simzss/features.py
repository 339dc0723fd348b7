"""Frozen-feature cache: run the frozen vision tower once, train many times without it.

``simzss cache-features`` reads prepared image-caption shards, runs the frozen DINOv2 tower over every image
(a fixed resize + center crop, or ``--views N`` seeded augmented views with the training transform) and writes
new webdataset shards holding, per sample:

- ``KEY.cls.npy``      ``[V, D]``      CLS token after the final norm (``np.save``, fp16 by default)
- ``KEY.patches.npy``  ``[V, h, w, D]`` patch tokens after the final norm, registers dropped
- ``KEY.txt``          the caption (UTF-8)
- ``KEY.concepts.json`` copied from the prepared shard when present

plus ``sizes.json`` (samples per shard) and ``meta.json`` (vision tower, image size, grid, dim, dtype, views,
source shards). Size: ``h * w * D * 2`` bytes per image and view in fp16 (ViT-B/14 at 224 px: 393 KB, many
times a resized JPEG), so the cache suits COCO-scale data rather than web-scale. Arrays are written with
``np.save`` and read with ``np.load(allow_pickle=False)``; nothing is ever pickled. Every output shard is
written to a temporary file and renamed when complete, so an interrupted run leaves only whole shards behind
and a rerun continues where it stopped.

Training reads the cache with :func:`build_cached_loader` (the trainer switches to it when
``DataConfig.feature_cache`` is set): batches carry ``vision_cls``/``vision_patches`` and ``images=None``, so the
vision tower never runs in the training loop. :func:`check_cache_compatible` refuses a cache made with another
vision tower or image size.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import glob
import hashlib
import io
import json
import logging
import os
import queue
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from simzss.config import ConfigError, DataConfig, ModelConfig, TrainConfig, VisionConfig
from simzss.data.shards import (
    IMAGE_EXTENSIONS, SIZES_FILE, ShardReadError, atomic_write_bytes, clean_stale_temps, expand_urls, iter_samples,
    read_sizes, write_shard, write_sizes,
)
from simzss.data.stream import (
    Batch, SharedState, SkipStats, TrainLoader, TrainStream, batches_per_epoch, check_loader_args, sample_location,
)
from simzss.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

CACHE_FORMAT = "simzss-feature-cache"
CACHE_VERSION = 1
META_FILE = "meta.json"
DTYPES: Dict[str, np.dtype] = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}


class CacheError(ValueError):
    """A feature cache that is missing, incomplete, corrupt or made for another model."""


# ----------------------------------------------------------------------------------------------------------
# small I/O helpers
# ----------------------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    """Decode an ``np.save`` member; object arrays (which would need pickle) raise ``ValueError``."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def expand_shards(specs: Sequence[str]) -> List[str]:
    """Expand shard specs (brace patterns, ``::`` lists, globs, folders of ``*.tar``) into local shard paths.

    The cache is a local preprocessing step, so only local files are accepted; a missing shard is an error.
    """
    paths: List[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(glob.glob(os.path.join(spec, "*.tar")))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in folder {spec}")
            paths += found
            continue
        for item in expand_urls(spec):
            matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
            if not matches or not all(os.path.isfile(m) for m in matches):
                raise FileNotFoundError(f"shard not found: {item}")
            paths += matches
    if not paths:
        raise FileNotFoundError("no shards given")
    return paths


def _iter_shard(path: str, skipped: Counter) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard (``simzss.data.shards``: no pickle); a damaged shard is logged and counted,
    keeping the samples read before the damage."""
    try:
        yield from iter_samples(path, dropped=skipped)
    except ShardReadError as e:
        skipped["damaged_shard"] += 1
        log.error("%s", e)


# ----------------------------------------------------------------------------------------------------------
# compatibility
# ----------------------------------------------------------------------------------------------------------


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
    local weights file name) and, when given, the fingerprint of the tower's weights (:func:`weights_fingerprint`).
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
    cached_src = _weights_source(vis.get("pretrained", True), vis.get("weights"))
    model_src = _weights_source(want.pretrained, want.weights)
    if cached_src != model_src:
        problems.append(f"vision weights {cached_src} != model's {model_src} "
                        "(model.vision.pretrained / model.vision.weights)")
    elif fingerprint is not None and vis.get("fingerprint") not in (None, fingerprint):
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


def _weights_source(pretrained: bool, weights: Optional[str]) -> str:
    if weights:
        return f"file:{os.path.basename(str(weights))}"
    return "pretrained" if pretrained else "random-init"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short SHA-256 over a module's parameters and buffers (names, shapes, bytes): identifies its weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# transforms (one per view, seeded per sample so the cache is reproducible whatever the worker count)
# ----------------------------------------------------------------------------------------------------------


def view_transform(
    image_size: int, augment: bool, crop_scale: Sequence[float]
) -> Tuple[Callable[[Any], torch.Tensor], bool]:
    """The cached view: the eval transform (resize + center crop) or the training augmentation.

    Returns ``(transform, normalise_on_device)``. When the transform ends in ``ToDtype(float, scale=True)`` +
    ``Normalize`` (ImageNet), those two steps are dropped so that workers ship uint8 images (4x less IPC and
    host-to-device traffic) and :class:`FeatureExtractor` normalises on the device, with the same arithmetic.
    """
    from torchvision.transforms import v2

    from simzss.data.transforms import eval_transform, train_transform

    tf = train_transform(image_size, crop_scale=crop_scale) if augment else eval_transform(image_size)
    steps = list(getattr(tf, "transforms", []))
    if (
        len(steps) >= 2
        and isinstance(steps[-2], v2.ToDtype) and getattr(steps[-2], "scale", False)
        and isinstance(steps[-1], v2.Normalize)
        and tuple(steps[-1].mean) == tuple(IMAGENET_MEAN) and tuple(steps[-1].std) == tuple(IMAGENET_STD)
    ):
        return v2.Compose(steps[:-2]), True
    return tf, False


def _sample_seed(seed: int, key: str) -> int:
    return zlib.crc32(f"{seed}/{key}".encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------------------
# extraction
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Up to ``chunk`` images of one source shard, transformed; ``last`` closes the shard."""

    shard: str
    keys: List[str] = field(default_factory=list)
    images: Optional[torch.Tensor] = None  # [n, V, 3, S, S], uint8 (or float if normalised in the worker)
    texts: List[bytes] = field(default_factory=list)
    concepts: List[Optional[bytes]] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)
    last: bool = False

    def pin_memory(self) -> "_Chunk":
        """Called by the DataLoader's pin-memory thread: page-locked images make the device copy asynchronous."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class _SourceShards(torch.utils.data.IterableDataset):
    """Decodes and transforms the images of whole source shards; DataLoader workers split the shard list."""

    def __init__(self, paths: Sequence[str], *, image_size: int, views: int, augment: bool,
                 crop_scale: Tuple[float, float], seed: int, chunk: int) -> None:
        super().__init__()
        self.paths, self.image_size, self.views, self.augment = list(paths), image_size, views, augment
        self.crop_scale, self.seed, self.chunk = tuple(crop_scale), seed, chunk

    def __iter__(self) -> Iterator[_Chunk]:
        from simzss.data.transforms import decode_image, decode_min_size

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        tf, _ = view_transform(self.image_size, self.augment, self.crop_scale)
        min_size = decode_min_size(self.image_size, self.crop_scale) if self.augment else self.image_size
        for path in self.paths[wid::nw]:
            shard = os.path.basename(path)
            cur = _Chunk(shard)
            imgs: List[torch.Tensor] = []
            skipped: Counter[str] = Counter()
            for sample in _iter_shard(path, skipped):
                key = sample["__key__"]
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                if ext is None:
                    skipped["no_image"] += 1
                    continue
                text = sample.get("txt")
                if not text or not text.decode("utf-8", "replace").strip():
                    skipped["no_caption"] += 1
                    continue
                try:
                    im = decode_image(sample[ext], min_size=min_size)
                    # a per-sample seed: identical views whatever the worker count or shard order
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(_sample_seed(self.seed, key))
                        views = torch.stack([tf(im) for _ in range(self.views)])
                except Exception as e:  # PIL raises many types for corrupt files
                    skipped["bad_image"] += 1
                    log.warning("skipping %s/%s: undecodable image (%s)", shard, key, e)
                    continue
                cur.keys.append(key)
                imgs.append(views)
                cur.texts.append(text)
                cur.concepts.append(sample.get("concepts.json"))
                if len(cur.keys) == self.chunk:
                    cur.images, cur.skipped = torch.stack(imgs), dict(skipped)
                    yield cur
                    cur, imgs, skipped = _Chunk(shard), [], Counter()
            cur.images = torch.stack(imgs) if imgs else None
            cur.skipped, cur.last = dict(skipped), True
            yield cur


class _ShardWriter:
    """Streams one output shard through :func:`simzss.data.shards.write_shard` in a writer thread.

    The write is atomic (temp file, then rename when the shard is complete); encoding the arrays happens in
    the thread, overlapping the next forward pass. A bounded queue keeps memory flat.
    """

    _END = object()

    def __init__(self, path: Path, pool: concurrent.futures.Executor) -> None:
        self.path = path
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.future = pool.submit(write_shard, path, self._samples())

    def _samples(self) -> Iterator[Dict[str, Any]]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item  # write_shard then removes the temporary file
            c, cls, patches = item
            for i, key in enumerate(c.keys):
                sample = {"__key__": key, "txt": c.texts[i], "cls.npy": _npy_bytes(cls[i]),
                          "patches.npy": _npy_bytes(patches[i])}
                if c.concepts[i] is not None:
                    sample["concepts.json"] = c.concepts[i]
                yield sample

    def put(self, item: Any) -> None:
        while True:  # never block forever on a writer that died (disk full, ...)
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                if self.future.done():
                    self.future.result()
                    raise RuntimeError(f"writer of {self.path} stopped early")

    def close(self) -> int:
        self.put(self._END)
        return int(self.future.result())

    def abort(self) -> None:
        try:
            self.queue.put_nowait(InterruptedError("cache-features aborted"))
        except queue.Full:
            pass
        try:
            self.future.result(timeout=60)
        except BaseException:
            pass


class FeatureExtractor:
    """The frozen vision tower set up for throughput: inference mode (the tower itself autocasts to bf16 on
    CUDA), pinned non-blocking host-to-device copies, optional ``torch.compile``."""

    def __init__(self, vision: VisionConfig, image_size: int, *, device: str | torch.device | None = None,
                 compile: Optional[bool] = None) -> None:
        self.device = torch.device(device) if device is not None else _default_device()
        self.tower = build_vision_tower(vision).to(self.device)
        self.fingerprint = weights_fingerprint(self.tower)
        self.embed_dim, self.patch_size = int(self.tower.embed_dim), int(self.tower.patch_size)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._forward: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]] = self.tower
        if vision.compile if compile is None else compile:
            self._forward = torch.compile(self.tower)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``images [N,3,S,S]`` (uint8, or float already normalised) -> ``cls [N,D]``, ``patches [N,h,w,D]``
        (float32, on the device)."""
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # ToDtype(scale=True) + Normalize, as in simzss.data.transforms
            x = (x.float() / 255.0 - self.mean) / self.std
        cls, patches = self._forward(x)
        return cls.float(), patches.float()


def build_vision_tower(vision: VisionConfig) -> torch.nn.Module:
    """The frozen tower exactly as ``SimZSS.from_config`` builds it (default position-embedding grid, interpolated
    to the input size), so cached features equal the model's own."""
    from simzss.models.vision import FrozenVisionTower

    return FrozenVisionTower(vision.name, pretrained=vision.pretrained, weights=vision.weights,
                             model_kwargs=dict(vision.model_kwargs or {}))


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _meta_settings(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The part of ``meta.json`` that must agree for a rerun to continue an existing cache."""
    vis = meta.get("vision") or {}
    tower = (vis.get("name"), vis.get("model_kwargs"), _weights_source(vis.get("pretrained", True), vis.get("weights")))
    keys = ("image_size", "dtype", "views", "augment", "crop_scale", "seed")
    return {"tower": tower, **{k: meta.get(k) for k in keys}}


def cache_features(
    shards: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    vision: VisionConfig,
    image_size: int,
    views: int = 1,
    augment: Optional[bool] = None,
    crop_scale: Tuple[float, float] = (0.9, 1.0),
    batch_size: int = 256,
    dtype: str = "fp16",
    device: str | torch.device | None = None,
    workers: int = 4,
    seed: int = 0,
    compile: Optional[bool] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run the frozen tower over prepared ``shards`` and write the feature cache to ``out_dir``; returns meta.

    ``views == 1`` without ``augment`` stores the fixed resize + center-crop view; ``augment`` (the default when
    ``views > 1``) stores ``views`` seeded draws of the training transform per image; the cached loader picks one
    per epoch. Output shards keep the source names; shards already present in ``out_dir`` from an interrupted run
    with the same settings are kept (``overwrite`` starts over).
    """
    if views < 1:
        raise ValueError("views must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (numpy has no bf16), got {dtype!r}")
    augment = views > 1 if augment is None else augment
    paths = expand_shards(shards)
    names = [os.path.basename(p) for p in paths]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ValueError(f"source shards share file names {dupes[:5]}: the cache keeps shard names, rename them")
    out = Path(out_dir)
    if any(Path(p).resolve().parent == out.resolve() for p in paths):
        raise ValueError(f"--out {out} holds the source shards; write the cache to another folder")
    out.mkdir(parents=True, exist_ok=True)
    if not vision.pretrained and not vision.weights:
        log.warning("caching features of a random-init vision tower: keep its weights (fingerprint in meta.json) "
                    "if the trained model is to be evaluated with the same tower")
    extractor = FeatureExtractor(vision, image_size, device=device, compile=compile)
    grid = image_size // extractor.patch_size
    meta: Dict[str, Any] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "vision": {
            "name": vision.name, "pretrained": bool(vision.pretrained), "weights": vision.weights,
            "model_kwargs": dict(vision.model_kwargs or {}), "fingerprint": extractor.fingerprint,
        },
        "image_size": int(image_size),
        "patch_size": extractor.patch_size,
        "grid": [grid, grid],
        "dim": extractor.embed_dim,
        "dtype": dtype,
        "views": int(views),
        "augment": bool(augment),
        "crop_scale": [float(crop_scale[0]), float(crop_scale[1])] if augment else None,
        "seed": int(seed),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "transform": "train_transform" if augment else "eval_transform",
        "source_shards": [os.path.abspath(p) for p in paths],
        "shards": names,
        "complete": False,
    }

    sizes: Dict[str, int] = {}
    previous: Dict[str, Any] = {}
    if (out / META_FILE).exists() and not overwrite:
        try:
            previous = json.loads((out / META_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CacheError(f"{out}: unreadable {META_FILE} ({e}); pass --overwrite to start over") from None
        same_weights = previous.get("vision", {}).get("fingerprint") == extractor.fingerprint
        if _meta_settings(previous) != _meta_settings(meta) or not same_weights:
            raise CacheError(f"{out} holds a cache made with other settings; pass --overwrite or another --out")
        sizes = {k: v for k, v in read_sizes(out).items() if k in names and (out / k).is_file()}
    elif overwrite:
        for n in [*names, SIZES_FILE, META_FILE]:
            (out / n).unlink(missing_ok=True)
    clean_stale_temps(out)
    _atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    todo = [p for p, n in zip(paths, names) if n not in sizes]
    if sizes:
        log.info("continuing %s: %d of %d shards already cached", out, len(sizes), len(names))

    skipped: Counter[str] = Counter(previous.get("skipped") or {}) if sizes else Counter()
    dataset = _SourceShards(todo, image_size=image_size, views=views, augment=augment, crop_scale=crop_scale,
                            seed=seed, chunk=max(1, batch_size // views))
    n_workers = min(workers, len(todo))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=n_workers, pin_memory=extractor.device.type == "cuda",
        prefetch_factor=4 if n_workers > 0 else None,
    )
    # one writer thread per open output shard (at most one per decoding worker)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, n_workers), thread_name_prefix="cache-writer")
    writers: Dict[str, _ShardWriter] = {}
    store_dtype = torch.float16 if dtype == "fp16" else torch.float32

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="shard", disable=not progress, desc="cache-features")
    t0, n_images = time.perf_counter(), 0
    try:
        for c in loader:
            skipped.update(c.skipped)
            w = writers.get(c.shard) or writers.setdefault(c.shard, _ShardWriter(out / c.shard, pool))
            if c.images is not None:
                n, v = c.images.shape[:2]
                cls, patches = extractor(c.images.flatten(0, 1))
                if not (torch.isfinite(cls).all() and torch.isfinite(patches).all()):
                    raise FloatingPointError(f"non-finite features in shard {c.shard} (keys {c.keys[:3]}...)")
                # cast on the device (fp16 halves the device-to-host copy); the writer thread only serialises
                cls_np = cls.to(store_dtype).cpu().numpy().reshape(n, v, -1)
                patches_np = patches.to(store_dtype).cpu().numpy().reshape(n, v, *patches.shape[1:])
                w.put((c, cls_np, patches_np))
                n_images += n
            if c.last:
                sizes[c.shard] = writers.pop(c.shard).close()
                write_sizes(out, sizes)  # progress record: a rerun continues from here
                bar.update(1)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()

    elapsed = time.perf_counter() - t0
    meta.update(
        complete=True,
        num_samples=int(sum(sizes.values())),
        skipped=dict(skipped),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    write_sizes(out, sizes)
    _atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    if skipped:
        log.warning("cache-features skipped samples: %s", dict(skipped))
    log.info("cached %d images in %.1fs (%.1f img/s); %d samples in %s", n_images, elapsed,
             n_images / max(elapsed, 1e-9), meta["num_samples"], out)
    return meta


# ----------------------------------------------------------------------------------------------------------
# training from the cache
# ----------------------------------------------------------------------------------------------------------


def _pick_view(seed: int, epoch: int, key: str, views: int) -> int:
    """The augmented view used for ``key`` this epoch: deterministic, redrawn every epoch."""
    return 0 if views == 1 else random.Random(f"{seed}/{epoch}/{key}").randrange(views)


class _CachedFeatureStream(TrainStream):
    """The image training stream (``simzss.data.stream.TrainStream``) with cached features in place of images.

    Inherited: shard splitting by rank and worker, shuffling, equal epochs on every rank, resume, caption and
    concept decoding (``decode_text``), on-the-fly concept extraction and tokenisation (``text_fields``).
    Overridden through the stream's extension points: ``decode_sample`` (arrays instead of an image) and
    ``collate`` (features instead of pixels).
    """

    def __init__(self, *args: Any, meta: Dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.views, self.dim = int(meta["views"]), int(meta["dim"])
        self.grid = tuple(int(g) for g in meta["grid"])

    def decode_sample(self, raw: Dict[str, Any], stats: SkipStats) -> Optional[Dict[str, Any]]:
        """Caption, concepts and this epoch's view of the cached arrays; None (counted) if unusable."""
        if "cls.npy" not in raw or "patches.npy" not in raw:
            stats.skip("missing_features", sample_location(raw))
            return None
        sample = self.decode_text(raw, stats)
        if sample is None:
            return None
        try:  # np.load refuses object arrays (pickle) with ValueError
            cls, patches = _npy_load(raw["cls.npy"]), _npy_load(raw["patches.npy"])
        except (ValueError, OSError, EOFError) as exc:
            stats.skip("corrupt_features", f"{sample_location(raw)}: {exc}"[:500])
            return None
        if cls.shape != (self.views, self.dim) or patches.shape != (self.views, *self.grid, self.dim):
            stats.skip("feature_shape", f"{sample_location(raw)}: {cls.shape}, {patches.shape} do not match meta.json")
            return None
        v = _pick_view(self.stream_seed, self.epoch, sample["key"], self.views)
        sample.update(cls=torch.from_numpy(cls[v]), patches=torch.from_numpy(patches[v]))
        return sample

    def collate(self, samples: List[Dict[str, Any]], stats: SkipStats) -> Batch:
        """Tokenised captions (as the image stream) with the stacked features in place of images.

        Features stay in the stored dtype (fp16 halves host->device traffic); the model casts them to fp32.
        """
        return Batch(
            images=None,
            skipped=stats.drain(),
            vision_cls=torch.stack([s["cls"] for s in samples]),
            vision_patches=torch.stack([s["patches"] for s in samples]),
            **self.text_fields(samples),
        )


def build_cached_loader(cfg: DataConfig, tokenizer: Any, bank: Any, *, batch_size: int, context_length: int,
                        rank: int = 0, world_size: int = 1, seed: int = 0) -> TrainLoader:
    """The trainer's loader when ``cfg.feature_cache`` is set: a ``TrainLoader`` over the cache's shards
    (``cfg.shards`` and ``cfg.image_size`` are ignored; the cache fixes both), yielding ``Batch`` es with
    ``images=None``, ``vision_cls [B,D]`` and ``vision_patches [B,h,w,D]`` (fp16 as stored).

    ``len()`` = ``num_samples // (batch_size * world_size)`` on every rank; ``num_samples`` is
    ``cfg.num_samples`` or the cache's ``sizes.json`` total. The loader's ``meta`` attribute holds ``meta.json``;
    the trainer should pass it to :func:`check_cache_compatible`.
    """
    if not cfg.feature_cache:
        raise ValueError("DataConfig.feature_cache is not set")
    check_loader_args(batch_size=batch_size, context_length=context_length, rank=rank, world_size=world_size,
                      workers=cfg.workers)
    cache = Path(cfg.feature_cache)
    meta = read_cache_meta(cache)
    if not meta.get("complete", False):
        raise CacheError(f"feature cache {cache} is incomplete (interrupted?); rerun `simzss cache-features` with "
                         "the same arguments to finish it")
    try:
        sizes = read_sizes(cache, missing_ok=False)
    except (OSError, ValueError) as e:
        raise CacheError(f"feature cache {cache}: unreadable {SIZES_FILE} ({e})") from None
    names = [n for n in meta["shards"] if sizes.get(n, 0) > 0]
    missing = [n for n in names if not (cache / n).is_file()]
    if missing:
        raise CacheError(f"feature cache {cache}: {len(missing)} shard(s) listed but missing, e.g. {missing[:3]}")
    num_samples = cfg.num_samples if cfg.num_samples is not None else int(sum(sizes[n] for n in names))
    num_batches = batches_per_epoch(num_samples, batch_size, world_size)
    if num_batches < 1:
        raise CacheError(f"feature cache {cache}: {num_samples} samples are fewer than one global batch "
                         f"({batch_size} x {world_size} ranks)")
    if cfg.workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    urls = [str(cache / n) for n in names]
    data_cfg = dataclasses.replace(cfg, shards=urls, image_size=int(meta["image_size"]))
    dataset = _CachedFeatureStream(
        urls, data_cfg, tokenizer, bank, batch_size=batch_size, context_length=context_length, rank=rank,
        world_size=world_size, num_batches=num_batches, state=SharedState(cfg.workers, seed=seed), meta=meta,
    )
    log.info("feature-cache stream: %s, %d shards, %d samples/epoch, %d batches/epoch/rank (%d views)",
             cache, len(urls), num_samples, num_batches, dataset.views)
    loader = TrainLoader(dataset, num_samples=num_samples, num_workers=cfg.workers, seed=seed)
    loader.meta = meta  # type: ignore[attr-defined]
    return loader


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _load_vision_config(path: str) -> Tuple[VisionConfig, Optional[int], Optional[Tuple[float, float]]]:
    """Vision config, plus the training image size and crop scale when ``path`` is a train YAML (else None)."""
    from omegaconf import OmegaConf

    from simzss.config import load_config

    raw = OmegaConf.to_container(OmegaConf.load(path))
    if isinstance(raw, dict) and ("model" in raw or "data" in raw):
        cfg = load_config(TrainConfig, path)
        return cfg.model.vision, cfg.data.image_size, tuple(cfg.data.crop_scale)  # type: ignore[return-value]
    return load_config(ModelConfig, path).vision, None, None


def main(argv: Optional[List[str]] = None) -> int:
    """``simzss cache-features``: precompute frozen vision features of prepared shards."""
    p = argparse.ArgumentParser(
        prog="simzss cache-features",
        description="Run the frozen vision tower once over prepared shards and store CLS + patch tokens "
        "(fp16 .npy), captions and concepts in new shards for training without the tower.",
    )
    p.add_argument("shards", nargs="+", help="prepared shards: paths, brace patterns, globs or folders")
    p.add_argument("--out", required=True, help="output folder (feature shards, sizes.json, meta.json)")
    p.add_argument("--model-config", help="train or model YAML: the vision tower (and data.image_size) to use")
    p.add_argument("--vision", help="timm model name (instead of --model-config)")
    p.add_argument("--vision-kwargs", default=None,
                   help="extra timm.create_model kwargs as JSON, e.g. '{\"depth\": 4}'")
    p.add_argument("--weights", default=None, help="local weights file for the vision tower")
    p.add_argument("--no-pretrained", action="store_true", help="random-init tower (tests only)")
    p.add_argument("--image-size", type=int, help="training image size (default: the config's data.image_size)")
    p.add_argument("--views", type=int, default=1, help="views per image (> 1: seeded augmented views)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="use the training augmentation (default: when --views > 1)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=None, help="RandomResizedCrop scale (augmented views)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="storage dtype of the features")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the vision tower")
    p.add_argument("--overwrite", action="store_true", help="discard an existing cache in --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.model_config:
            if args.vision:
                p.error("give --model-config or --vision, not both")
            vision, cfg_size, cfg_scale = _load_vision_config(args.model_config)
        elif args.vision:
            vision, cfg_size, cfg_scale = VisionConfig(name=args.vision), None, None
        else:
            p.error("give --model-config or --vision")
        if args.vision_kwargs:
            kw = json.loads(args.vision_kwargs)
            if not isinstance(kw, dict):
                p.error("--vision-kwargs must be a JSON object")
            vision.model_kwargs = {**dict(vision.model_kwargs or {}), **kw}
        if args.weights:
            vision.weights = args.weights
        if args.no_pretrained:
            vision.pretrained, vision.weights = False, None
        image_size = args.image_size or cfg_size
        if not image_size:
            p.error("--image-size is required with --vision or a model-only YAML")
        cache_features(
            args.shards, args.out, vision=vision, image_size=image_size, views=args.views, augment=args.augment,
            crop_scale=tuple(args.crop_scale or cfg_scale or DataConfig().crop_scale), batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device, workers=args.workers, seed=args.seed, compile=args.compile or None,
            overwrite=args.overwrite,
        )
    except (ConfigError, CacheError, FileNotFoundError, ValueError) as e:
        print(f"simzss cache-features: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "CacheError",
    "FeatureExtractor",
    "build_cached_loader",
    "cache_features",
    "check_cache_compatible",
    "expand_shards",
    "read_cache_meta",
    "weights_fingerprint",
    "main",
]
