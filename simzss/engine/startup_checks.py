"""What the trainer checks before it trains, so that a run fails in its first second, not after hours: settings it
cannot honour, evaluation datasets that are missing, a feature cache the model would not have produced, and a
launch whose processes disagree. Each refusal is one line naming the setting (:class:`ConfigError`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from simzss.config import ConfigError, TrainConfig
from simzss.data.features import CacheError, check_cache_compatible, read_cache_meta, weights_fingerprint
from simzss.engine.tracking import REPORT_TO

log = logging.getLogger(__name__)

MIXED_PRECISION = ("auto", "bf16", "fp16", "no")


def validate_config(cfg: TrainConfig) -> None:
    """Reject settings the trainer cannot honour, naming the field (raises :class:`ConfigError`)."""
    if cfg.grad_accum != 1:
        raise ConfigError(
            f"grad_accum={cfg.grad_accum} is not supported: accumulating micro-batches would shrink the contrastive "
            "negatives to one micro-batch (SimZSS needs the global batch). Use more GPUs or a smaller batch_size "
            "with grad_accum: 1."
        )
    checks = [
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.max_steps is not None or cfg.epochs >= 1, f"epochs must be >= 1 (or set max_steps), got {cfg.epochs}"),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"max_steps must be >= 1 or null, got {cfg.max_steps}"),
        (cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = only at the end), got {cfg.checkpoint_every}"),
        (cfg.log_every >= 1, f"log_every must be >= 1, got {cfg.log_every}"),
        (cfg.max_nonfinite >= 1, f"max_nonfinite must be >= 1, got {cfg.max_nonfinite}"),
        (cfg.report_to in REPORT_TO, f"report_to must be one of {REPORT_TO}, got {cfg.report_to!r}"),
        (cfg.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}, got {cfg.mixed_precision!r}"),
        (0.0 <= cfg.optim.warmup < 1.0, f"optim.warmup is a fraction in [0, 1), got {cfg.optim.warmup}"),
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.optim.grad_clip is None or cfg.optim.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {cfg.optim.grad_clip}"),
        (cfg.eval.every >= 0, f"eval.every must be >= 0, got {cfg.eval.every}"),
        (bool(cfg.run_name) and "/" not in cfg.run_name, f"run_name must be a non-empty folder name, got {cfg.run_name!r}"),
        (bool(cfg.data.shards) or cfg.data.feature_cache is not None, "data.shards is empty (and no data.feature_cache)"),
        (cfg.model.vision.normalization == "imagenet",
         f"model.vision.normalization={cfg.model.vision.normalization!r}: training feeds ImageNet-normalised images "
         "(DINOv2's statistics); 'clip' exists only to evaluate imported release checkpoints"),
        (cfg.data.max_image_pixels >= 0, f"data.max_image_pixels must be >= 0 (0 = no cap), got {cfg.data.max_image_pixels}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def missing_eval_path(spec: str) -> Optional[str]:
    """The local path of a ``NAME:PATH`` spec when it does not exist (None for URLs and existing paths)."""
    path = spec.partition(":")[2]
    return path if "://" not in path and not Path(path).exists() else None


def check_eval_datasets(cfg: TrainConfig) -> List[str]:
    """Check ``eval.datasets`` at start-up, not after training; returns the specs the run will evaluate.

    A spec that is not ``NAME:PATH`` is always an error. A missing path is an error when evaluations run during
    training (``eval.every > 0``). With ``eval.every: 0`` only the final evaluation would use it: a missing path
    is then logged as a warning and that dataset is skipped at the end (so a config such as ``configs/demo.yaml``
    runs on other data without ``eval.datasets=[]``); the trainer looks again at the end, in case it appeared.
    """
    for i, spec in enumerate(cfg.eval.datasets):
        name, sep, path = spec.partition(":")
        if not sep or not path:
            raise ConfigError(f"eval.datasets[{i}]={spec!r}: expected NAME:PATH (e.g. folder:demo/data/val)")
    usable: List[str] = []
    for i, spec in enumerate(cfg.eval.datasets):
        missing = missing_eval_path(spec)
        if missing is None:
            usable.append(spec)
        elif cfg.eval.every > 0:
            raise ConfigError(f"eval.datasets[{i}]={spec!r}: {missing} does not exist (eval.every={cfg.eval.every} "
                              "evaluates during training; fix the path or override eval.datasets=[] to skip)")
        else:
            log.warning("eval.datasets[%d]=%r: %s does not exist; the final evaluation will skip it "
                        "(override eval.datasets=[] to silence this)", i, spec, missing)
    return usable


def check_feature_cache(
    cfg: TrainConfig, model: Optional[nn.Module] = None, meta: Optional[Dict[str, Any]] = None
) -> Optional[Dict[str, Any]]:
    """Refuse (:class:`ConfigError`, naming the mismatching setting) a feature cache that the model's vision
    tower would not have produced; returns the cache's ``meta.json`` (None without ``data.feature_cache``).

    Without ``model`` only the settings are compared (architecture, extra timm kwargs, image size, weights
    source): cheap, before the tower is built. With ``model`` the fingerprint of ``model.vision``'s weights
    must also equal the cache's, which catches e.g. a random-init tower drawn with another seed. ``meta``
    is read from ``cfg.data.feature_cache`` when not given.
    """
    if cfg.data.feature_cache is None:
        return None
    vision = getattr(model, "vision", None) if model is not None else None
    try:
        meta = meta if meta is not None else read_cache_meta(cfg.data.feature_cache)
        fingerprint = weights_fingerprint(vision) if vision is not None else None
        if fingerprint is not None and not (meta.get("vision") or {}).get("fingerprint"):
            log.warning("feature cache %s records no weights fingerprint: cannot verify that it was made with "
                        "this model's vision weights", cfg.data.feature_cache)
        check_cache_compatible(meta, cfg.model, cfg.data.image_size, fingerprint=fingerprint)
    except CacheError as e:
        raise ConfigError(f"data.feature_cache={cfg.data.feature_cache!r}: {e}") from None
    if fingerprint is not None:
        log.info("feature cache %s: vision weights fingerprint %s matches", cfg.data.feature_cache, fingerprint)
    return meta


def check_world(num_processes: int) -> None:
    """Refuse a launch where torch.distributed and accelerate disagree on the number of processes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != num_processes:
        raise RuntimeError(
            f"torch.distributed has {dist.get_world_size()} processes but accelerate sees {num_processes}: "
            "check the launcher (accelerate launch / torchrun) settings"
        )


__all__ = ["MIXED_PRECISION", "check_eval_datasets", "check_feature_cache", "check_world", "missing_eval_path",
           "validate_config"]
