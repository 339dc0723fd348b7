"""Feature-cache writer: runs a frozen vision encoder over prepared shards and writes the cache's shards.

The encoder is passed in (:class:`FeatureExtractor` wraps any tower returning ``(cls, patches)``), so this data-stage
module never builds a model; ``simzss cache-features`` (:mod:`simzss.cli.cache_features`) builds the DINOv2 tower.
Every output shard is written to a temporary file and renamed when complete, so an interrupted run leaves only
whole shards behind and a rerun continues where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import os
import queue
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torchvision.transforms import v2

from simzss.config import VisionConfig
from simzss.data.features.format import (
    CACHE_FORMAT, CACHE_VERSION, DTYPES, META_FILE, CacheError, meta_settings, npy_bytes, weights_fingerprint,
)
from simzss.data.shards import (
    IMAGE_EXTENSIONS, SIZES_FILE, ShardReadError, atomic_write_bytes, clean_stale_temps, expand_shards, iter_samples,
    read_sizes, write_shard, write_sizes,
)
from simzss.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, decode_image, decode_min_size, eval_transform, train_transform,
)
from simzss.logs import progress as progress_bar

log = logging.getLogger(__name__)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))



def _iter_shard(path: str, skipped: Counter) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard (``simzss.data.shards``: no pickle); a damaged shard is logged and counted,
    keeping the samples read before the damage."""
    try:
        yield from iter_samples(path, dropped=skipped)
    except ShardReadError as e:
        skipped["damaged_shard"] += 1
        log.error("%s", e)


def view_transform(
    image_size: int, augment: bool, crop_scale: Sequence[float]
) -> Tuple[Callable[[Any], torch.Tensor], bool]:
    """The cached view: the eval transform (resize + center crop) or the training augmentation.

    Returns ``(transform, normalise_on_device)``. When the transform ends in ``ToDtype(float, scale=True)`` +
    ``Normalize`` (ImageNet), those two steps are dropped so that workers ship uint8 images (4x less IPC and
    host-to-device traffic) and :class:`FeatureExtractor` normalises on the device, with the same arithmetic.
    """
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
                sample = {"__key__": key, "txt": c.texts[i], "cls.npy": npy_bytes(cls[i]),
                          "patches.npy": npy_bytes(patches[i])}
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

    def __init__(self, tower: torch.nn.Module, *, device: str | torch.device | None = None,
                 compile: bool = False) -> None:
        """``tower``: a frozen module mapping normalised images ``[N,3,S,S]`` to ``(cls [N,D], patches [N,h,w,D])``,
        with ``embed_dim`` and ``patch_size`` attributes (:class:`simzss.models.vision.FrozenVisionTower`)."""
        self.device = torch.device(device) if device is not None else _default_device()
        self.tower = tower.to(self.device)
        self.fingerprint = weights_fingerprint(self.tower)
        self.embed_dim, self.patch_size = int(self.tower.embed_dim), int(self.tower.patch_size)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._forward: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]] = self.tower
        if compile:
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


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")



def write_feature_cache(
    shards: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    extractor: FeatureExtractor,
    vision: VisionConfig,
    image_size: int,
    views: int = 1,
    augment: Optional[bool] = None,
    crop_scale: Tuple[float, float] = (0.9, 1.0),
    batch_size: int = 256,
    dtype: str = "fp16",
    workers: int = 4,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run ``extractor`` (the tower ``vision`` describes) over prepared ``shards`` and write the feature cache to
    ``out_dir``; returns meta.

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
    paths = expand_shards(shards, local_only=True)
    names = [os.path.basename(p) for p in paths]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ValueError(f"source shards share file names {dupes[:5]}: the cache keeps shard names, rename them")
    out = Path(out_dir)
    if any(Path(p).resolve().parent == out.resolve() for p in paths):
        raise ValueError(f"--out {out} holds the source shards; write the cache to another folder")
    out.mkdir(parents=True, exist_ok=True)
    grid = image_size // extractor.patch_size
    meta: Dict[str, Any] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "vision": {
            "name": vision.name, "pretrained": bool(vision.pretrained), "weights": vision.weights,
            "model_kwargs": dict(vision.model_kwargs or {}), "fingerprint": extractor.fingerprint,
            "denoiser": vision.denoiser, "denoiser_weights": vision.denoiser_weights,
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
        if meta_settings(previous) != meta_settings(meta) or not same_weights:
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

    bar = progress_bar(total=len(todo), unit="shard", enabled=progress, desc="cache-features")
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
