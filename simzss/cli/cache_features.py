"""``simzss cache-features``: build the frozen DINOv2 tower from a config and write a feature cache with it.

Light at import time (``--help`` never loads torch): the heavy modules are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from simzss.cli.options import (
    EXIT_FAILED, add_device, add_no_progress, add_overwrite, command_parser, fail, missing_inputs, os_error_line,
    unwritable, usage_error,
)

log = logging.getLogger(__name__)

NAME = "cache-features"
DTYPE_CHOICES = ("bf16", "fp16", "fp32")  # simzss.data.features.format.DTYPES (checked by the writer)


def cache_features(
    shards: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    vision: Any,
    image_size: int,
    device: Any = None,
    compile: Optional[bool] = None,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Build the frozen tower of ``vision`` (a :class:`simzss.config.VisionConfig`) and write the feature cache of
    ``shards`` to ``out_dir``; returns meta.

    ``device``: a torch device or name (None: the first GPU if any, else the CPU). The other keyword arguments
    go to :func:`simzss.data.features.writer.write_feature_cache`.
    """
    from simzss.data.features.writer import FeatureExtractor, write_feature_cache
    from simzss.models.vision import build_vision_tower

    if not vision.pretrained and not vision.weights:
        log.warning("caching features of a random-init vision tower: keep its weights (fingerprint in meta.json) "
                    "if the trained model is to be evaluated with the same tower")
    extractor = FeatureExtractor(build_vision_tower(vision), device=device,
                                 compile=vision.compile if compile is None else compile)
    return write_feature_cache(shards, out_dir, extractor=extractor, vision=vision, image_size=image_size, **kwargs)


def _load_config(path: str) -> Tuple[Any, Optional[Any]]:
    """``(VisionConfig, DataConfig or None)``: the vision tower of a train or model YAML, and its data settings
    (image size, crop scale, interpolation, decoder, pixel cap) when it is a train YAML."""
    from omegaconf import OmegaConf

    from simzss.config import ModelConfig, TrainConfig, load_config

    raw = OmegaConf.to_container(OmegaConf.load(path))
    if isinstance(raw, dict) and ("model" in raw or "data" in raw):
        cfg = load_config(TrainConfig, path)
        return cfg.model.vision, cfg.data
    return load_config(ModelConfig, path).vision, None


def build_parser() -> Any:
    p = command_parser(
        NAME,
        "Run the frozen vision tower once per image of prepared shards and store its CLS and patch tokens "
        "(K views per image, fp16/bf16) with every caption mapped to its image, for training without the tower "
        "(data.feature_cache=DIR).",
        [
            "simzss cache-features data/coco/prepared --out data/coco/feats --model-config configs/coco_vitb14.yaml "
            "--views 4",
            "simzss cache-features 'shards/{000000..000009}.tar' --out feats --vision vit_base_patch14_reg4_dinov2 "
            "--image-size 224 --dtype bf16 --device cuda",
        ],
    )
    p.add_argument("shards", nargs="+", help="prepared shards: paths, brace patterns, globs or folders")
    p.add_argument("--out", required=True, help="output folder (feature arrays, caption shards, sizes.json, meta.json)")
    p.add_argument("--model-config", help="train or model YAML: the vision tower (and data.image_size, crop scale) to use")
    p.add_argument("--vision", help="timm model name (instead of --model-config)")
    p.add_argument("--vision-kwargs", default=None,
                   help="extra timm.create_model kwargs as JSON, e.g. '{\"depth\": 4}'")
    p.add_argument("--weights", default=None, help="local weights file for the vision tower")
    p.add_argument("--no-pretrained", action="store_true", help="random-init tower (tests only)")
    p.add_argument("--image-size", type=int, help="training image size (default: the config's data.image_size)")
    p.add_argument("--views", type=int, default=1,
                   help="views stored per image; > 1: random resized crops of the training recipe, one per epoch")
    p.add_argument("--augment", action="store_true", default=None,
                   help="random resized crops even with --views 1 (default: only when --views > 1)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="the fixed resize + center crop (only with --views 1)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="RandomResizedCrop scale of augmented views (default: the config's data.crop_scale)")
    p.add_argument("--interpolation", choices=("bicubic", "bilinear"), default=None,
                   help="resampling of augmented crops (default: the config's data.interpolation)")
    p.add_argument("--batch-size", type=int, default=256, help="images per vision-tower forward pass")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp16", help="storage dtype of the features")
    add_device(p)
    p.add_argument("--workers", type=int, default=4, help="image decoding processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmented views (per image)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse input images with more pixels than this (default: the config's data.max_image_pixels)")
    p.add_argument("--compile", action="store_true", help="torch.compile the vision tower")
    add_overwrite(p, "an existing cache in --out (made from other input or settings)")
    add_no_progress(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``simzss cache-features``: precompute frozen vision features of prepared shards."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.model_config and args.vision:
        p.error("give --model-config or --vision, not both")
    if not args.model_config and not args.vision:
        p.error("give --model-config or --vision")
    if args.views < 1 or args.batch_size < 1 or args.workers < 0:
        p.error("--views and --batch-size must be >= 1 and --workers >= 0")
    if args.augment is False and args.views > 1:
        p.error("--no-augment stores one fixed view: use it with --views 1")
    missing = missing_inputs([s for s in args.shards if not any(c in s for c in "*?[{")])  # patterns: later
    if missing is not None:
        return usage_error(NAME, f"{missing}: no such file or folder (give prepared shards or their folder)")
    problem = unwritable(args.out, folder=True)  # a failed run (exit 1), found before the tower is built
    if problem:
        return fail(NAME, problem, EXIT_FAILED)
    from simzss.cli.options import DeviceError, resolve_device

    try:
        resolve_device(args.device)  # --device cuda without CUDA: a usage error, not torch's driver message
    except DeviceError as e:
        return usage_error(NAME, str(e))
    kw: Dict[str, Any] = {}
    if args.vision_kwargs:
        try:
            kw = json.loads(args.vision_kwargs)
        except json.JSONDecodeError as e:
            p.error(f"--vision-kwargs is not JSON ({e})")
        if not isinstance(kw, dict):
            p.error("--vision-kwargs must be a JSON object")

    from simzss.logs import setup_logging

    setup_logging()
    from simzss.config import ConfigError, DataConfig, VisionConfig
    from simzss.data.features.format import CacheError

    try:
        if args.model_config:
            vision, data_cfg = _load_config(args.model_config)
        else:
            vision, data_cfg = VisionConfig(name=args.vision), None
    except (ConfigError, OSError, ValueError) as e:
        return usage_error(NAME, f"--model-config {args.model_config}: {e}")
    data = data_cfg or DataConfig()
    if kw:
        vision.model_kwargs = {**dict(vision.model_kwargs or {}), **kw}
    if args.weights:
        vision.weights = args.weights
    if args.no_pretrained:
        vision.pretrained, vision.weights = False, None
    image_size = args.image_size or (data_cfg.image_size if data_cfg is not None else None)
    if not image_size:
        p.error("--image-size is required with --vision or a model-only YAML")
    try:
        cache_features(
            args.shards, args.out, vision=vision, image_size=image_size, views=args.views, augment=args.augment,
            crop_scale=tuple(args.crop_scale or data.crop_scale), interpolation=args.interpolation or data.interpolation,
            decode=data.decode,
            batch_size=args.batch_size, dtype=args.dtype, device=None if args.device == "auto" else args.device,
            workers=args.workers, seed=args.seed, compile=args.compile or None,
            max_pixels=args.max_pixels if args.max_pixels is not None else data.max_image_pixels,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (ConfigError, CacheError, FileNotFoundError, ValueError) as e:
        return usage_error(NAME, str(e))
    except OSError as e:  # a full or read-only disk mid-run
        return fail(NAME, os_error_line(e), EXIT_FAILED)
    except (RuntimeError, FloatingPointError) as e:
        return fail(NAME, f"{type(e).__name__}: {e}", EXIT_FAILED)
    return 0
