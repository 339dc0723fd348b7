"""Writing exports: ``save_pretrained`` (an in-memory model) and ``export_checkpoint`` (a trainer checkpoint).

The folder format is :mod:`simzss.models.pretrained`. The frozen vision weights are included automatically when
the tower cannot be recreated from its name: a random-init tower (``pretrained: false``) or one loaded from a
local weights file. Exports are built in a hidden sibling folder and renamed into place, so ``OUT_DIR`` is either
absent, the previous export, or the complete new one. The hidden folders carry the writer's pid; those of dead
processes (a killed export) are removed by the next export to the same place. Files and folders get the modes of
the user's umask. A failed write (a full disk) removes the hidden folder and raises
:class:`simzss.engine.checkpoint.DiskFullError`, whose message starts with ``OUT_DIR``.

An export of a trainer checkpoint records where it came from (``config.json`` ``source``: checkpoint folder and
training step; the model card says the step) and shows the evaluation results of that step only. The
``simzss export`` command is :mod:`simzss.cli.export`.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from safetensors.torch import save_file

from simzss import __version__
from simzss.config import ModelConfig, TrainConfig, to_dict
from simzss.data.shards import follow_umask, pid_alive
from simzss.engine.checkpoint import DiskFullError, checkpoint_step, is_disk_full
from simzss.io.card import model_card
from simzss.io.checkpoint import (
    EVAL_RESULTS_NAME, checkpoint_weights, load_checkpoint_tokenizer, read_checkpoint_config, resolve_checkpoint,
)
from simzss.models.pretrained import (
    CARD_NAME, CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, TEXT_CONFIG_DIR, TOKENIZER_DIR, VISION_PREFIX, WEIGHTS_NAME,
    ExportError, is_export, load_state, text_config_from,
)
from simzss.models.simzss import SimZSS
from simzss.models.vision import build_vision_tower

logger = logging.getLogger(__name__)

#: The name of the run's per-evaluation log (one JSON row per evaluation: step and ``eval/SPEC/mIoU``).
EVAL_HISTORY_NAME = "eval_history.jsonl"


class NotWritableError(OSError):
    """The export's destination folder cannot be written (read-only file system, permissions); ``str()`` is one
    line naming the folder and the reason."""

    def __init__(self, folder: Path, reason: str) -> None:
        super().__init__(errno.EACCES, reason, str(folder))

    def __str__(self) -> str:
        return f"{self.filename}: cannot write the export there ({self.strerror}); choose another OUT_DIR"


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


def check_writable(out: Path) -> None:
    """Raise :class:`NotWritableError` unless a folder can be created next to ``out`` (in its nearest existing
    ancestor): a read-only destination fails before anything is loaded."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_hidden_prefix(out, "tmp"), dir=folder))
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(out, "the export") from None
        raise NotWritableError(folder, e.strerror or type(e).__name__) from None


def check_export_destination(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Everything about ``out_dir`` that can be checked before loading a model: it does not exist (or
    ``overwrite`` and it is an export: ``FileExistsError`` / :class:`ExportError`), and it can be written
    (:class:`NotWritableError`). Returns the absolute path."""
    out = Path(out_dir).absolute()
    _check_out_dir(out, overwrite)
    check_writable(out)
    return out


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
    source: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write an export folder atomically from its parts; ``vision_state`` (un-prefixed) includes the vision tower.

    ``text_config`` (the ``transformers`` config of a pretrained-kind text tower, ``TextTower.hf_config``)
    is saved so that loading needs no hub access. ``source`` (``{"checkpoint": PATH, "step": N}`` for a trainer
    checkpoint) is recorded in ``config.json`` and the model card. Everything is written to a hidden sibling
    folder, ``config.json`` last, then renamed to ``out_dir``; a full disk removes it and raises
    :class:`DiskFullError` naming ``out_dir``.
    """
    out = check_export_destination(out_dir, overwrite)
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
                source=source,
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
            **({"source": dict(source)} if source is not None else {}),
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):  # also one raised deeper, naming a temporary file: name the target
            raise DiskFullError(out, "the export") from None
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


def _results_step(results: Any) -> Optional[int]:
    step = results.get("step") if isinstance(results, dict) else None
    return step if isinstance(step, int) else None


def _history_results(run: Path, step: int) -> Optional[Dict[str, Any]]:
    """The mIoU of each dataset that ``RUN/eval_history.jsonl`` logged at ``step`` (the last row of that step)."""
    path = run / EVAL_HISTORY_NAME
    if not path.is_file():
        return None
    found: Optional[Dict[str, Any]] = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(row, dict) and row.get("step") == step:
            found = {key[len("eval/"):-len("/mIoU")]: {"mIoU": value} for key, value in row.items()
                     if key.startswith("eval/") and key.endswith("/mIoU")}
    return {"step": step, "results": found} if found else None


def find_eval_results(ckpt: Path, step: Optional[int] = None) -> Optional[Any]:
    """Evaluation results of checkpoint ``ckpt``, trained for ``step`` steps (None: whatever is recorded).

    In order: ``eval.json`` of the checkpoint folder or of its run (``RUN/checkpoints/step-N`` -> ``RUN``) when it
    is of ``step``; else the mIoU that ``RUN/eval_history.jsonl`` logged at ``step``. Results of another step are
    never returned (an export of step 50 does not show step 60's results): None, with a log line.
    """
    newer: Optional[Path] = None
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        f = d / EVAL_RESULTS_NAME
        if f.is_file():
            results = read_eval_results(f)
            if step is None or _results_step(results) in (None, step):
                return results
            newer = f
            break
    if step is not None:
        history = _history_results(ckpt.parent.parent, step)
        if history is not None:
            return history
        if newer is not None:
            logger.info("no evaluation results recorded at step %d (%s is of step %s): the model card has none",
                        step, newer, _results_step(read_eval_results(newer)))
    return None


def read_eval_results(path: str | os.PathLike) -> Any:
    """Evaluation results from a JSON file (``eval.json``, ``simzss eval --out``); :class:`ExportError` naming
    the file when it is missing or not JSON."""
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
    """Export a trainer checkpoint (a step folder, or ``RUN/checkpoints/latest``, a run or checkpoints folder:
    the newest checkpoint that validates, see :func:`resolve_checkpoint`).

    The export records the checkpoint folder and its training step (``config.json`` ``source``, model card).
    Evaluation results default to those recorded for that step (:func:`find_eval_results`). The vision weights,
    when included, come from the checkpoint if it holds them, else from the tower built by its config (hub
    download or local weights file); a random-init tower that the checkpoint does not hold is an error.
    """
    return export_resolved_checkpoint(resolve_checkpoint(checkpoint), out_dir, include_vision=include_vision,
                                      eval_results=eval_results, overwrite=overwrite)


def export_resolved_checkpoint(
    ckpt: Path,
    out_dir: str | os.PathLike,
    *,
    include_vision: Optional[bool] = None,
    eval_results: Optional[Any] = None,
    overwrite: bool = False,
) -> Path:
    """:func:`export_checkpoint` of a step folder that :func:`resolve_checkpoint` already returned (for callers
    that resolve first to tell a bad checkpoint apart from a failed export, without validating it twice)."""
    step = checkpoint_step(ckpt)
    out = check_export_destination(out_dir, overwrite)  # fail before loading anything
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
        eval_results = find_eval_results(ckpt, step)
    elif _results_step(eval_results) not in (None, step):
        logger.warning("the evaluation results given are of step %s, the checkpoint of step %d",
                       _results_step(eval_results), step)
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
        source={"checkpoint": str(ckpt.absolute()), "step": step},
    )
