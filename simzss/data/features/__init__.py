"""The frozen-feature cache: run the frozen vision tower once per image, train many times without it.

:mod:`~simzss.data.features.format` (``meta.json``, the feature arrays, compatibility checks),
:mod:`~simzss.data.features.writer` (writing a cache with a given encoder) and
:mod:`~simzss.data.features.reader` (the training stream over a cache, served from disk, RAM or GPU memory).
The command is ``simzss cache-features`` (:mod:`simzss.cli.cache_features`); docs/feature_cache.md describes it.
"""

from simzss.data.features.format import (
    CacheError,
    cache_nbytes,
    check_cache_compatible,
    read_cache_meta,
    weights_fingerprint,
)
from simzss.data.features.reader import (
    FEATURE_CACHE_DEVICES,
    CachedTrainLoader,
    FeatureStore,
    build_cached_loader,
    epoch_view,
)
from simzss.data.features.writer import FeatureExtractor, write_feature_cache

__all__ = [
    "FEATURE_CACHE_DEVICES",
    "CacheError",
    "CachedTrainLoader",
    "FeatureExtractor",
    "FeatureStore",
    "build_cached_loader",
    "cache_nbytes",
    "check_cache_compatible",
    "epoch_view",
    "read_cache_meta",
    "weights_fingerprint",
    "write_feature_cache",
]
