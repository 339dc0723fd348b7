"""The frozen-feature cache: run the frozen vision tower once, train many times without it.

:mod:`~simzss.data.features.format` (``meta.json``, ``.npy`` members, compatibility checks),
:mod:`~simzss.data.features.writer` (writing a cache with a given encoder) and
:mod:`~simzss.data.features.reader` (the training stream over a cache). The command is ``simzss cache-features``
(:mod:`simzss.cli.cache_features`).
"""

from simzss.data.features.format import (
    CacheError,
    check_cache_compatible,
    read_cache_meta,
    weights_fingerprint,
)
from simzss.data.features.reader import build_cached_loader
from simzss.data.features.writer import FeatureExtractor, write_feature_cache

__all__ = [
    "CacheError",
    "FeatureExtractor",
    "build_cached_loader",
    "check_cache_compatible",
    "read_cache_meta",
    "weights_fingerprint",
    "write_feature_cache",
]
