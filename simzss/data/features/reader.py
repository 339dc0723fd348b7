"""Training from a feature cache: the caption stream with each caption's cached image features in place of pixels.

The trainer switches to :func:`build_cached_loader` when ``DataConfig.feature_cache`` is set: batches carry
``vision_cls``/``vision_patches`` and ``images=None``, so the vision tower never runs in the training loop and the
loss code is the image path's.

The caption shards go through :class:`~simzss.data.stream.TrainStream` (rank/worker split, shuffling, equal
epochs, exact resume, tokenisation); each caption names its image's row, and the view served is a function of
(seed, epoch, row) only (:func:`epoch_view`), so every epoch shows each image in another stored view and a
resumed run sees the same views. Where the features are served from (``data.feature_cache_device``):

- ``disk``: the ``.npy`` arrays memory-mapped in each data worker, rows gathered there (the OS page cache keeps
  hot rows in RAM);
- ``ram``: both arrays loaded once into host memory (pinned when CUDA is available), rows gathered in the main
  process into pinned buffers and copied to the GPU asynchronously;
- ``gpu``: both arrays loaded once into GPU memory, rows gathered there (no host-to-device feature traffic).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from simzss.config import DataConfig
from simzss.data.batch import Batch
from simzss.data.features.format import (
    CLS_FILE, DTYPES, IMAGE_ROW_MEMBER, PATCHES_FILE, CacheError, cache_nbytes, feature_shapes, read_cache_meta,
)
from simzss.data.loader import resolve_workers
from simzss.data.sampling import SharedState, batches_per_epoch
from simzss.data.shard_index import log_index_coverage
from simzss.data.shards import SIZES_FILE, read_sizes
from simzss.data.stream import SkipStats, TrainLoader, TrainStream, check_loader_args, sample_location

log = logging.getLogger(__name__)

#: where the cached features are served from (``data.feature_cache_device``)
FEATURE_CACHE_DEVICES = ("disk", "ram", "gpu")
#: share of the GPU's memory left free for the training step when ``gpu`` serving checks the fit
GPU_STEP_SHARE = 0.25


def epoch_view(seed: int, epoch: int, row: int, views: int) -> int:
    """The stored view of image ``row`` served in ``epoch``: a per-image offset plus the epoch, modulo ``views``,
    so consecutive epochs never repeat a view (``views > 1``) and every view is used once in ``views`` epochs."""
    if views == 1:
        return 0
    return (zlib.crc32(f"{seed}/{row}".encode()) + epoch) % views


def _to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A host array in storage layout as a torch tensor of the feature dtype (bf16 from its bits)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.view(torch.int16).view(torch.bfloat16) if dtype == "bf16" else t


def open_feature_arrays(cache: str | os.PathLike, meta: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """``cls.npy`` and ``patches.npy`` memory-mapped read-only, flattened to ``[N*V, D]`` / ``[N*V, h, w, D]``
    rows (row ``image * V + view``); CacheError if missing or not what ``meta.json`` says."""
    shapes = feature_shapes(meta)
    out = []
    for name in (CLS_FILE, PATCHES_FILE):
        path = Path(cache) / name
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheError(f"feature cache {cache}: unreadable {name} ({e}); rebuild it with "
                             "`simzss cache-features --overwrite`") from None
        if arr.shape != shapes[name] or arr.dtype != DTYPES[meta["dtype"]][0]:
            raise CacheError(f"feature cache {cache}: {name} is {arr.dtype}{list(arr.shape)}, meta.json says "
                             f"{meta['dtype']}{list(shapes[name])}; rebuild it with `simzss cache-features --overwrite`")
        out.append(arr.reshape(-1, *arr.shape[2:]))
    return out[0], out[1]


class _CachedFeatureStream(TrainStream):
    """The caption stream (``simzss.data.stream.TrainStream``) with each caption's image row and view.

    Inherited: shard splitting by rank and worker, shuffling, equal epochs on every rank, resume, caption and
    concept decoding (``decode_text``), on-the-fly concept extraction and tokenisation (``text_fields``).
    Overridden through the stream's extension points: ``decode_sample`` (the image row instead of an image) and
    ``collate`` (features, or their rows, instead of pixels).
    """

    def __init__(self, *args: Any, meta: Dict[str, Any], cache_dir: str, gather_in_worker: bool,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meta, self.cache_dir, self.gather_in_worker = meta, cache_dir, gather_in_worker
        self.views, self.num_images = int(meta["views"]), int(meta["num_images"])
        self._arrays: Optional[Tuple[np.ndarray, np.ndarray]] = None  # memory maps, opened in each worker

    def decode_sample(self, raw: Dict[str, Any], stats: SkipStats) -> Optional[Dict[str, Any]]:
        """Caption, concepts and the flattened feature row of this epoch's view; None (counted) if unusable."""
        data = raw.get(IMAGE_ROW_MEMBER)
        if data is None:
            stats.skip("missing_image_row", sample_location(raw))
            return None
        try:
            row = int(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            row = -1
        if not 0 <= row < self.num_images:
            stats.skip("bad_image_row", f"{sample_location(raw)}: {data[:20]!r} (cache has {self.num_images} images)")
            return None
        sample = self.decode_text(raw, stats)
        if sample is None:
            return None
        sample["row"] = row * self.views + epoch_view(self.stream_seed, self.epoch, row, self.views)
        return sample

    def collate(self, samples: List[Dict[str, Any]], stats: SkipStats) -> Batch:
        """Tokenised captions (as the image stream) with the features of their images (``disk``: gathered here
        from the memory maps) or their rows (``ram``/``gpu``: gathered by the loader)."""
        rows = np.fromiter((s["row"] for s in samples), dtype=np.int64, count=len(samples))
        text = self.text_fields(samples)
        if not self.gather_in_worker:
            # ram/gpu: the features live in the main process; CachedTrainLoader gathers feature_rows there
            return Batch(images=None, skipped=stats.drain(), feature_rows=torch.from_numpy(rows), **text)
        if self._arrays is None:
            self._arrays = open_feature_arrays(self.cache_dir, self.meta)
        cls, patches = self._arrays
        dtype = self.meta["dtype"]
        # features stay in the stored dtype (fp16/bf16 halve host->device traffic); the model casts to fp32
        return Batch(images=None, skipped=stats.drain(), vision_cls=_to_torch(cls[rows], dtype),
                     vision_patches=_to_torch(patches[rows], dtype), **text)


def _host_available_bytes() -> int:
    """Memory the OS can still give this process (``MemAvailable``; free pages where /proc is missing)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class FeatureStore:
    """A cache's feature arrays held in host RAM (pinned when CUDA is available) or GPU memory, flattened to rows
    ``image * V + view``; :meth:`gather` returns the rows of a batch on ``device``."""

    def __init__(self, cache: str | os.PathLike, meta: Dict[str, Any], *, where: str,
                 device: Optional[torch.device] = None) -> None:
        if where not in ("ram", "gpu"):
            raise ValueError(f"FeatureStore holds features in ram or gpu, not {where!r}")
        need = cache_nbytes(meta["num_images"], meta["views"], meta["grid"], meta["dim"], meta["dtype"])
        gb = f"{need / 1e9:.2f} GB"
        cuda = torch.cuda.is_available()
        if where == "gpu":
            if not cuda:
                raise CacheError("data.feature_cache_device=gpu needs a CUDA GPU and none is available; "
                                 "use data.feature_cache_device=ram or disk")
            device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
            if device.type != "cuda":
                raise CacheError(f"data.feature_cache_device=gpu needs a CUDA device, got {device}")
            free, total = torch.cuda.mem_get_info(device)
            if need > free - GPU_STEP_SHARE * total:
                raise CacheError(f"data.feature_cache_device=gpu: the cache's features need {gb} but {device} has "
                                 f"{free / 1e9:.2f} GB free (keeping {GPU_STEP_SHARE:.0%} of {total / 1e9:.0f} GB for "
                                 "the training step); use data.feature_cache_device=ram or disk")
            home = device
        else:
            avail = _host_available_bytes()
            if need > avail:
                raise CacheError(f"data.feature_cache_device=ram: the cache's features need {gb} of host RAM but "
                                 f"{avail / 1e9:.2f} GB are available; use data.feature_cache_device=disk")
            home = torch.device("cpu")
            device = torch.device(device) if device is not None else None
        self.where, self.device, self.dtype = where, device, meta["dtype"]
        self.pinned = where == "ram" and cuda
        cls_mm, patches_mm = open_feature_arrays(cache, meta)
        self.cls = self._load(cls_mm, home)
        self.patches = self._load(patches_mm, home)
        log.info("feature cache %s: %s of features loaded into %s%s", cache, gb, where,
                 " (pinned)" if self.pinned else "")

    def _load(self, array: np.ndarray, home: torch.device) -> torch.Tensor:
        """Copy a memory-mapped array to ``home`` in slices of about 256 MB (bounded extra host memory)."""
        dst = torch.empty(array.shape, dtype=DTYPES[self.dtype][1], device=home, pin_memory=self.pinned)
        step = max(1, (256 << 20) // max(1, array[0].nbytes))
        for i in range(0, array.shape[0], step):
            dst[i:i + step].copy_(_to_torch(np.array(array[i:i + step]), self.dtype))  # read-only map: copy
        return dst

    def gather(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cls [B,D], patches [B,h,w,D])`` of flattened ``rows``, on the serving device (``gpu``), or in
        pinned host memory copied asynchronously to ``device`` (``ram`` with a CUDA ``device``), else on the
        host."""
        if self.where == "gpu":
            rows = rows.to(self.cls.device, non_blocking=True)
            return self.cls.index_select(0, rows), self.patches.index_select(0, rows)
        out = []
        for src in (self.cls, self.patches):
            buf = torch.empty((rows.numel(), *src.shape[1:]), dtype=src.dtype, pin_memory=self.pinned)
            torch.index_select(src, 0, rows, out=buf)
            if self.device is not None and self.device.type == "cuda":
                buf = buf.to(self.device, non_blocking=True)
            out.append(buf)
        return out[0], out[1]

    @property
    def nbytes(self) -> int:
        """Bytes of features held (both arrays), for logs and the fit checks' tests."""
        return int(self.cls.numel() * self.cls.element_size() + self.patches.numel() * self.patches.element_size())


class CachedTrainLoader(TrainLoader):
    """The :class:`~simzss.data.stream.TrainLoader` of a feature cache: the same epochs, ``len()``, ``set_epoch``
    and resume state; with ``ram``/``gpu`` serving it gathers each batch's features from its
    :class:`FeatureStore` (the workers send the rows, ``image * V + view``, in ``Batch.feature_rows``). ``meta`` holds
    the cache's ``meta.json``."""

    def __init__(self, dataset: _CachedFeatureStream, *, num_samples: int, num_workers: int, seed: int,
                 meta: Dict[str, Any], store: Optional[FeatureStore]) -> None:
        super().__init__(dataset, num_samples=num_samples, num_workers=num_workers, seed=seed)
        self.meta, self.store = meta, store

    def __iter__(self) -> Iterator[Batch]:
        for batch in super().__iter__():
            if self.store is not None:
                cls, patches = self.store.gather(batch.feature_rows)
                batch = dataclasses.replace(batch, vision_cls=cls, vision_patches=patches, feature_rows=None)
            yield batch


def build_cached_loader(cfg: DataConfig, tokenizer: Any, bank: Any, *, batch_size: int, context_length: int,
                        rank: int = 0, world_size: int = 1, seed: int = 0,
                        device: str | torch.device | None = None) -> CachedTrainLoader:
    """The trainer's loader when ``cfg.feature_cache`` is set: a ``TrainLoader`` over the cache's caption shards
    (``cfg.shards`` and ``cfg.image_size`` are ignored; the cache fixes both), yielding ``Batch`` es with
    ``images=None``, ``vision_cls [B,D]`` and ``vision_patches [B,h,w,D]`` in the stored dtype, served as
    ``cfg.feature_cache_device`` says (``disk``, ``ram`` or ``gpu``; ``device``: where ``gpu`` holds the
    features and where ``ram`` copies batches to, default the current CUDA device for ``gpu``, the host for
    ``ram``).

    ``len()`` = ``num_samples // (batch_size * world_size)`` on every rank; ``num_samples`` is
    ``cfg.num_samples`` or the cache's ``sizes.json`` total (captions, not images). The loader's ``meta``
    attribute holds ``meta.json``; the trainer should pass it to :func:`check_cache_compatible`.
    """
    if not cfg.feature_cache:
        raise ValueError("DataConfig.feature_cache is not set")
    cfg = dataclasses.replace(cfg, workers=resolve_workers(cfg.workers))
    where = cfg.feature_cache_device
    if where not in FEATURE_CACHE_DEVICES:
        raise CacheError(f"data.feature_cache_device must be one of {', '.join(FEATURE_CACHE_DEVICES)}, got {where!r}")
    check_loader_args(batch_size=batch_size, context_length=context_length, rank=rank, world_size=world_size,
                      workers=cfg.workers)
    cache = Path(cfg.feature_cache)
    meta = read_cache_meta(cache)
    if not meta.get("complete", False):
        raise CacheError(f"feature cache {cache} is incomplete (interrupted?); rerun `simzss cache-features` with "
                         "the same arguments to rebuild it")
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
    # checks the arrays against meta.json up front (shape, dtype), whatever the serving mode
    open_feature_arrays(cache, meta)
    store = None if where == "disk" else FeatureStore(cache, meta, where=where, device=device)
    if cfg.workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    urls = [str(cache / n) for n in names]
    log_index_coverage(urls)
    data_cfg = dataclasses.replace(cfg, shards=urls, image_size=int(meta["image_size"]))
    dataset = _CachedFeatureStream(
        urls, data_cfg, tokenizer, bank, batch_size=batch_size, context_length=context_length, rank=rank,
        world_size=world_size, num_batches=num_batches, state=SharedState(cfg.workers, seed=seed),
        meta=meta, cache_dir=str(cache), gather_in_worker=store is None,
    )
    log.info("feature-cache stream: %s, %d shards, %d captions of %d images/epoch, %d batches/epoch/rank "
             "(%d views, served from %s)", cache, len(urls), num_samples, meta["num_images"], num_batches,
             dataset.views, where)
    return CachedTrainLoader(dataset, num_samples=num_samples, num_workers=cfg.workers, seed=seed, meta=meta,
                             store=store)
