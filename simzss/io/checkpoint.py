"""Loading trainer checkpoints (``RUN/checkpoints/step-N``) as eval-mode models, for ``eval``, ``export`` and scripts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from transformers import AutoTokenizer

from simzss.config import ConfigError, ModelConfig, TrainConfig, load_config
from simzss.engine.checkpoint import CKPT_RE, CheckpointError, checkpoint_step, resolve_resume
from simzss.models.pretrained import (
    TEXT_CONFIG_DIR, TOKENIZER_DIR, VISION_PREFIX, WEIGHTS_NAME, ExportError, config_to_build, load_safetensors, load_state,
    load_tokenizer_dir, text_config_from,
)
from simzss.models.simzss import SimZSS

logger = logging.getLogger(__name__)

# Names a trainer checkpoint may use for the resolved TrainConfig, in order of preference.
CHECKPOINT_CONFIG_NAMES = ("config.yaml", "config.json")
EVAL_RESULTS_NAME = "eval.json"
#: The name that stands for the newest complete checkpoint of a run (``RUN/checkpoints/latest``).
LATEST = "latest"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a trainer checkpoint: ``RUN/checkpoints/step-N`` itself, or the newest valid one in a run or
    checkpoints folder; ``RUN/checkpoints/latest`` (or ``RUN/latest``) names the newest valid one.

    Every candidate passes :func:`simzss.engine.checkpoint.validate_checkpoint` (the files a model needs, the
    same check as resume): a folder or ``latest`` skips damaged checkpoints with the resume's "skipping damaged
    checkpoint" warning and logs the step it took; a damaged step folder named explicitly is an
    :class:`ExportError` naming the bad file.
    """
    p = Path(path)
    if p.name == LATEST and not p.exists() and p.parent.is_dir():
        p = p.parent  # an alias, not a folder: the newest complete checkpoint of the folder above
    if not p.exists():
        raise ExportError(f"{p}: no such checkpoint")
    explicit = (p / "trainer_state.json").exists() or bool(CKPT_RE.match(p.name))
    try:
        ckpt = resolve_resume(str(p), p, validate=True, full=False)
    except FileNotFoundError:
        ckpt = None
    except CheckpointError as e:
        hint = ("; a damaged checkpoint: name an earlier one, or the run's checkpoints/latest for the newest valid one"
                if explicit else "")
        raise ExportError(f"{e}{hint}") from None
    if ckpt is None:
        raise ExportError(f"{p}: not a complete checkpoint (no trainer_state.json), nor a folder with checkpoints")
    if not explicit:
        logger.info("%s: using the newest valid checkpoint, step %d (%s)", path, checkpoint_step(ckpt), ckpt)
    return ckpt


def checkpoint_weights(ckpt: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """Trainable weights of a checkpoint, and its vision-tower weights (un-prefixed) when it holds them.

    The trainer stores the frozen tower under ``vision.`` in ``model.safetensors`` only when it cannot be
    recreated from its name (random-init or a local weights file).
    """
    state = load_safetensors(ckpt / WEIGHTS_NAME)
    vision = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    trainable = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIX)}
    return trainable, (vision or None)


def read_checkpoint_config(ckpt: Path) -> TrainConfig:
    """The resolved ``TrainConfig`` saved with a trainer checkpoint (``config.yaml`` or ``config.json``)."""
    for name in CHECKPOINT_CONFIG_NAMES:
        if (ckpt / name).is_file():
            try:
                return load_config(TrainConfig, ckpt / name)
            except ConfigError as e:
                raise ExportError(f"{ckpt / name}: invalid training config ({e})") from None
    raise ExportError(f"{ckpt}: checkpoint has no {' or '.join(CHECKPOINT_CONFIG_NAMES)}")


def load_checkpoint_tokenizer(cfg: ModelConfig, ckpt: Path) -> Any:
    """The checkpoint's tokenizer: a copy saved inside it if any, else ``cfg.tokenizer`` (local path or hub name)."""
    if (ckpt / TOKENIZER_DIR).is_dir():
        return load_tokenizer_dir(ckpt / TOKENIZER_DIR)
    try:
        return AutoTokenizer.from_pretrained(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load tokenizer {cfg.tokenizer!r} named by the checkpoint config ({e})") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *, build_vision: bool = True) -> SimZSS:
    """Build an eval-mode ``SimZSS`` from a trainer checkpoint (vision tower from its config or the checkpoint)."""
    ckpt = resolve_checkpoint(path)
    train_cfg = read_checkpoint_config(ckpt)
    cfg = train_cfg.model
    trainable, vision_state = checkpoint_weights(ckpt)
    vision_included = vision_state is not None
    build_cfg = config_to_build(cfg, vision_included=build_vision and vision_included, build_vision=build_vision,
                                source=f"{ckpt}")
    state = dict(trainable)
    if build_vision and vision_state is not None:
        state.update({VISION_PREFIX + k: v for k, v in vision_state.items()})
    tokenizer = load_checkpoint_tokenizer(cfg, ckpt)
    text_config = text_config_from(cfg, ckpt, TEXT_CONFIG_DIR, "checkpoint")
    model = SimZSS.from_config(build_cfg, tokenizer, build_vision=build_vision, text_config=text_config)
    load_state(model, state, vision_included=vision_included and build_vision, source=ckpt / WEIGHTS_NAME)
    model.config = cfg
    model.tokenizer = tokenizer
    return model.to(device).eval()
