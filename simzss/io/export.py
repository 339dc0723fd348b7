"""Writing exports: ``save_pretrained``, ``export_checkpoint`` and the ``simzss export`` command.

The folder format is :mod:`simzss.models.pretrained`. The frozen vision weights are included automatically when
the tower cannot be recreated from its name: a random-init tower (``pretrained: false``) or one loaded from a
local weights file. Exports are built in a hidden sibling folder and renamed into place, so ``OUT_DIR`` is either
absent, the previous export, or the complete new one. The hidden folders carry the writer's pid; those of dead
processes (a killed export) are removed by the next export to the same place. Files and folders get the modes of
the user's umask.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from safetensors.torch import save_file

from simzss import __version__
from simzss.config import ModelConfig, TrainConfig, to_dict
from simzss.data.shards import follow_umask, pid_alive
from simzss.io.card import model_card
from simzss.io.checkpoint import (
    EVAL_RESULTS_NAME, checkpoint_weights, load_checkpoint_tokenizer, read_checkpoint_config, resolve_checkpoint,
)
from simzss.io.hub import push_to_hub
from simzss.models.pretrained import (
    CARD_NAME, CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, TEXT_CONFIG_DIR, TOKENIZER_DIR, VISION_PREFIX, WEIGHTS_NAME,
    ExportError, is_export, load_state, read_export_config, text_config_from,
)
from simzss.models.simzss import SimZSS
from simzss.models.vision import build_vision_tower
from simzss.helpformat import HelpFormatter
from simzss.logs import setup_logging

logger = logging.getLogger(__name__)


def vision_weights_required(cfg: ModelConfig) -> bool:
    """Whether the vision tower cannot be recreated from its timm name (random-init, a local weights file, or a
    DVT denoiser, whose weights only ever come from a file)."""
    return (not cfg.vision.pretrained) or cfg.vision.weights is not None or cfg.vision.denoiser != "none"


def _tensor_dict(state: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone so tied/viewed tensors are written independently.
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}



def _hidden_prefix(out: Path, kind: str) -> str:
    """Prefix of the hidden sibling folders of ``out`` (``kind``: tmp | old), with this process's pid."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def clean_stale_exports(out: Path) -> List[Path]:
    """Remove the hidden ``.OUT.tmp-PID-*`` / ``.OUT.old-PID-*`` folders that dead processes left next to ``out``.

    A backup (``old``) of a process killed between its two renames is the previous export: it is moved back to
    ``out`` when ``out`` is missing. Returns the folders removed or restored.
    """
    handled: List[Path] = []
    if not out.parent.is_dir():
        return handled
    for kind in ("tmp", "old"):
        for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            pid = p.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if not p.is_dir() or not pid.isdigit() or pid_alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.rename(p, out)
                logger.warning("restored %s from the backup %s of a killed export", out, p.name)
            else:
                shutil.rmtree(p, ignore_errors=True)
                logger.info("removed %s, left by a killed export (pid %s)", p, pid)
            handled.append(p)
    return handled


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out``; an existing export is swapped out and removed only afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    backup = Path(tempfile.mkdtemp(prefix=_hidden_prefix(out, "old"), dir=out.parent))
    os.rmdir(backup)
    os.rename(out, backup)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse early: an existing OUT_DIR without overwrite, or one that is not an export (we never delete other data)."""
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not is_export(out)):
        raise ExportError(f"{out} exists and is not a simzss export; refusing to replace it even with --overwrite")


def write_export(
    out_dir: str | os.PathLike,
    *,
    config: ModelConfig,
    tokenizer: Any,
    trainable_state: Mapping[str, torch.Tensor],
    vision_state: Optional[Mapping[str, torch.Tensor]] = None,
    train_config: Optional[TrainConfig] = None,
    eval_results: Optional[Any] = None,
    overwrite: bool = False,
    text_config: Optional[Any] = None,
) -> Path:
    """Write an export folder atomically from its parts; ``vision_state`` (un-prefixed) includes the vision tower.

    ``text_config`` (the ``transformers`` config of a pretrained-kind text tower, ``TextTower.hf_config``)
    is saved so that loading needs no hub access. Everything is written to a hidden sibling folder,
    ``config.json`` last, then renamed to ``out_dir``.
    """
    out = Path(out_dir).absolute()
    _check_out_dir(out, overwrite)
    if vision_state is None and vision_weights_required(config):
        raise ExportError(
            f"the vision tower ({config.vision.name}) is "
            + ("random-init (pretrained: false)" if not config.vision.pretrained else f"from a local file ({config.vision.weights})")
            + "; it cannot be recreated from its name, so its weights must be included"
        )
    bad = [k for k in trainable_state if k.startswith(VISION_PREFIX)]
    if bad:
        raise ExportError(f"trainable state holds vision-tower keys {bad[:4]}; pass them as vision_state")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_exports(out)
    tmp = Path(tempfile.mkdtemp(prefix=_hidden_prefix(out, "tmp"), dir=out.parent))
    try:
        tensors = _tensor_dict(trainable_state)
        if vision_state is not None:
            tensors.update(_tensor_dict(vision_state, VISION_PREFIX))
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "simzss_format_version": str(FORMAT_VERSION)})
        del tensors
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if text_config is not None:
            text_config.save_pretrained(str(tmp / TEXT_CONFIG_DIR))
        elif config.text.kind == "pretrained":
            logger.warning(
                "no text model config given for a pretrained-kind text tower: loading this export will need %r",
                config.text.name_or_path,
            )
        (tmp / CARD_NAME).write_text(
            model_card(
                config,
                name=out.name,
                vision_included=vision_state is not None,
                train_config=train_config,
                eval_results=eval_results,
            ),
            encoding="utf-8",
        )
        files = {
            f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()
        }
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "simzss_version": __version__,
            "model": to_dict(config),
            "vision_weights_included": vision_state is not None,
            "tokenizer_dir": TOKENIZER_DIR,
            **({"text_config_dir": TEXT_CONFIG_DIR} if text_config is not None else {}),
            "files": files,
        }
        # config.json is the completeness marker: written last, itself via temp file + rename.
        part = tmp / (CONFIG_NAME + ".part")
        with open(part, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, tmp / CONFIG_NAME)
        follow_umask(tmp)  # mkdtemp made it 0700, safetensors writes 0600
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote export %s (vision weights %s)", out, "included" if vision_state is not None else "referenced by name")
    return out


def save_pretrained(
    model: SimZSS,
    out_dir: str | os.PathLike,
    *,
    include_vision: Optional[bool] = None,
    train_config: Optional[TrainConfig] = None,
    eval_results: Optional[Any] = None,
    overwrite: bool = False,
) -> Path:
    """Export an in-memory ``SimZSS`` (needs ``model.config`` and ``model.tokenizer``).

    ``include_vision=None`` includes the vision weights only when they cannot be recreated from the timm
    name (random-init or a local weights file); ``False`` in that case is an error.
    """
    cfg: Optional[ModelConfig] = getattr(model, "config", None)
    tokenizer = getattr(model, "tokenizer", None)
    if cfg is None or tokenizer is None:
        raise ExportError("model has no .config / .tokenizer; build it with SimZSS.from_config to export it")
    required = vision_weights_required(cfg)
    if include_vision is False and required:
        raise ExportError(
            f"the vision tower ({cfg.vision.name}) cannot be recreated from its name "
            "(random-init or local weights file); its weights must be included"
        )
    include = required if include_vision is None else include_vision
    if include and required and include_vision is None:
        logger.info("including the vision tower weights: it is random-init or from a local file")
    vision_state = None
    if include:
        vision = getattr(model, "vision", None)
        if vision is None:
            raise ExportError("model has no vision tower (built with build_vision=False); cannot include its weights")
        vision_state = vision.state_dict()
    return write_export(
        out_dir,
        config=cfg,
        tokenizer=tokenizer,
        trainable_state=model.trainable_state_dict(),
        vision_state=vision_state,
        train_config=train_config,
        eval_results=eval_results,
        overwrite=overwrite,
        text_config=getattr(model.text, "hf_config", None),
    )


def find_eval_results(ckpt: Path) -> Optional[Any]:
    """``eval.json`` of the checkpoint folder or of its run folder (``RUN/checkpoints/step-N`` -> ``RUN``), if any."""
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        f = d / EVAL_RESULTS_NAME
        if f.is_file():
            return _read_json(f)
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    include_vision: Optional[bool] = None,
    eval_results: Optional[Any] = None,
    overwrite: bool = False,
) -> Path:
    """Export a trainer checkpoint; evaluation results default to the run's ``eval.json``.

    The vision weights, when included, come from the checkpoint if it holds them, else from the tower
    built by its config (hub download or local weights file); a random-init tower that the checkpoint
    does not hold is an error.
    """
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir).absolute()
    _check_out_dir(out, overwrite)  # fail before loading anything
    train_cfg = read_checkpoint_config(ckpt)
    cfg = train_cfg.model
    trainable, vision_state = checkpoint_weights(ckpt)
    required = vision_weights_required(cfg)
    if include_vision is False and required:
        raise ExportError(f"{ckpt}: the vision tower cannot be recreated from its name; its weights must be included")
    include = required or bool(include_vision)
    tokenizer = load_checkpoint_tokenizer(cfg, ckpt)
    # Validate the trainable weights against a model built from the config (no vision download needed).
    text_config = text_config_from(cfg, ckpt, TEXT_CONFIG_DIR, "checkpoint")
    model = SimZSS.from_config(cfg, tokenizer, build_vision=False, text_config=text_config)
    load_state(model, trainable, vision_included=False, source=ckpt / WEIGHTS_NAME)
    if include and vision_state is None:
        if not cfg.vision.pretrained and cfg.vision.weights is None:
            raise ExportError(
                f"{ckpt}: the vision tower was random-init (pretrained: false) and the checkpoint does not hold its "
                "weights; it cannot be recreated, so this checkpoint cannot be exported"
            )
        vision_state = build_vision_tower(cfg.vision).state_dict()  # only the tower is needed
    if not include:
        vision_state = None
    if eval_results is None:
        eval_results = find_eval_results(ckpt)
    return write_export(
        out,
        config=cfg,
        tokenizer=tokenizer,
        trainable_state=model.trainable_state_dict(),
        vision_state=vision_state,
        train_config=train_cfg,
        eval_results=eval_results,
        overwrite=overwrite,
        text_config=model.text.hf_config,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="simzss export",
        description="Export a training checkpoint to a self-contained inference folder (safetensors + tokenizer + model card).",
    )
    p.add_argument("checkpoint", help="checkpoint folder (RUN/checkpoints/step-N); RUN/checkpoints/latest, a run folder or a "
                   "checkpoints folder mean its newest complete checkpoint")
    p.add_argument("out_dir", help="export folder to create")
    p.add_argument(
        "--include-vision",
        action="store_true",
        help="include the frozen vision tower's weights (automatic when it is random-init or from a local file)",
    )
    p.add_argument("--eval-results", metavar="JSON", help="evaluation results for the model card (default: the run's eval.json)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the export to this Hugging Face model repo")
    p.add_argument("--private", action="store_true", help="create the hub repo as private")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at OUT_DIR")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``simzss export CHECKPOINT OUT_DIR [...]``."""
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        results = _read_json(Path(args.eval_results)) if args.eval_results else None
        out = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            include_vision=True if args.include_vision else None,
            eval_results=results,
            overwrite=args.overwrite,
        )
        meta = read_export_config(out)
        print(f"exported {args.checkpoint} -> {out} (vision weights {'included' if meta['vision_weights_included'] else 'referenced by name'})")
        if args.push_to_hub:
            url = push_to_hub(out, args.push_to_hub, private=True if args.private else None)
            print(f"pushed to {args.push_to_hub}: {url}")
    except (ExportError, OSError, ValueError) as e:  # FileExistsError, unwritable OUT_DIR, bad model config
        print(f"simzss export: error: {e}", file=sys.stderr)
        return 1
    return 0

