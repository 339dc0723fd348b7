"""``simzss cache-features``: build the frozen DINOv2 tower from a config and write a feature cache with it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from simzss.config import ConfigError, DataConfig, ModelConfig, TrainConfig, VisionConfig, load_config
from simzss.data.features.format import DTYPES, CacheError
from simzss.data.features.writer import FeatureExtractor, write_feature_cache
from simzss.models.vision import build_vision_tower
from simzss.helpformat import HelpFormatter
from simzss.logs import setup_logging

log = logging.getLogger(__name__)


def cache_features(
    shards: List[str] | Tuple[str, ...],
    out_dir: str | os.PathLike,
    *,
    vision: VisionConfig,
    image_size: int,
    device: str | torch.device | None = None,
    compile: Optional[bool] = None,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Build the frozen tower of ``vision`` and write the feature cache of ``shards`` to ``out_dir``; returns meta.

    The other keyword arguments go to :func:`simzss.data.features.writer.write_feature_cache`.
    """
    if not vision.pretrained and not vision.weights:
        log.warning("caching features of a random-init vision tower: keep its weights (fingerprint in meta.json) "
                    "if the trained model is to be evaluated with the same tower")
    extractor = FeatureExtractor(build_vision_tower(vision), device=device,
                                 compile=vision.compile if compile is None else compile)
    return write_feature_cache(shards, out_dir, extractor=extractor, vision=vision, image_size=image_size, **kwargs)


def _load_vision_config(path: str) -> Tuple[VisionConfig, Optional[int], Optional[Tuple[float, float]]]:
    """Vision config, plus the training image size and crop scale when ``path`` is a train YAML (else None)."""
    raw = OmegaConf.to_container(OmegaConf.load(path))
    if isinstance(raw, dict) and ("model" in raw or "data" in raw):
        cfg = load_config(TrainConfig, path)
        return cfg.model.vision, cfg.data.image_size, tuple(cfg.data.crop_scale)  # type: ignore[return-value]
    return load_config(ModelConfig, path).vision, None, None


def main(argv: Optional[List[str]] = None) -> int:
    """``simzss cache-features``: precompute frozen vision features of prepared shards."""
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
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
    p.add_argument("--batch-size", type=int, default=256, help="images per vision-tower forward pass")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="storage dtype of the features")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmented views")
    p.add_argument("--compile", action="store_true", help="torch.compile the vision tower")
    p.add_argument("--overwrite", action="store_true", help="discard an existing cache in --out")
    args = p.parse_args(argv)
    setup_logging()

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
