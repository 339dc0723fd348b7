"""Training from a feature cache: the image stream with cached CLS / patch tokens in place of images.

The trainer switches to :func:`build_cached_loader` when ``DataConfig.feature_cache`` is set: batches carry
``vision_cls``/``vision_patches`` and ``images=None``, so the vision tower never runs in the training loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from simzss.config import DataConfig
from simzss.data.features.format import CacheError, npy_load, read_cache_meta
from simzss.data.shards import SIZES_FILE, read_sizes
from simzss.data.stream import (
    Batch, SharedState, SkipStats, TrainLoader, TrainStream, batches_per_epoch, check_loader_args, sample_location,
)

log = logging.getLogger(__name__)


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
            cls, patches = npy_load(raw["cls.npy"]), npy_load(raw["patches.npy"])
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
