"""Inference exports: ``save_pretrained`` / ``load_pretrained`` and the ``simzss export`` command.

An export is a folder that needs no training code to load::

    config.json        format marker + version, the ModelConfig, whether vision weights are included,
                       and the size of every other file (written last: it is the completeness marker)
    model.safetensors  text tower, projection, logit scale (``trainable_state_dict``), plus the frozen
                       vision tower under ``vision.`` when included
    tokenizer/         ``tokenizer.save_pretrained``
    text_config/       (text kind ``pretrained``) the transformers config of the text model, so loading
                       builds it from this config instead of fetching the base model from the hub
    README.md          model card: training config (YAML) and evaluation results

The frozen vision tower is referenced by its timm name (+ ``model_kwargs``) and downloaded on load,
unless its weights are included. They are included automatically when the tower cannot be recreated
from its name: a random-init tower (``pretrained: false``) or one loaded from a local weights file.

Exports are built in a hidden sibling folder and renamed into place, so ``OUT_DIR`` is either absent,
the previous export, or the complete new one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from simzss import __version__
from simzss.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    to_dict,
    to_yaml,
)

if TYPE_CHECKING:  # pragma: no cover
    from simzss.models.simzss import SimZSS

logger = logging.getLogger(__name__)

FORMAT_NAME = "simzss"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TEXT_CONFIG_DIR = "text_config"  # config.json of a pretrained-kind text model (exports and checkpoints)
CARD_NAME = "README.md"
VISION_PREFIX = "vision."
# Names a trainer checkpoint may use for the resolved TrainConfig, in order of preference.
CHECKPOINT_CONFIG_NAMES = ("config.yaml", "config.json")
EVAL_RESULTS_NAME = "eval.json"


class ExportError(RuntimeError):
    """An export or checkpoint that cannot be written or read (incomplete, wrong format, conflicting options)."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a simzss export marker (``config.json`` with our format name)."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        return False
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def read_export_config(path: str | os.PathLike) -> Dict[str, Any]:
    """Read and validate an export's ``config.json``; checks the format version and that every listed file is whole."""
    root = Path(path)
    if not root.is_dir():
        raise ExportError(f"{root}: not a directory (expected a simzss export folder)")
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise ExportError(f"{root}: no {CONFIG_NAME}; not a simzss export, or an export that was never completed")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ExportError(f"{cfg_path}: not a simzss export config (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"{cfg_path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{cfg_path}: format_version {version} was written by a newer simzss "
            f"(this one reads <= {FORMAT_VERSION}); upgrade simzss"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        raise ExportError(f"{cfg_path}: missing file list; the export is incomplete")
    for rel, size in files.items():
        f = root / rel
        if not f.is_file():
            raise ExportError(f"{root}: incomplete export, {rel} is missing")
        if f.stat().st_size != size:
            raise ExportError(f"{root}: incomplete or modified export, {rel} has {f.stat().st_size} bytes, expected {size}")
    if not isinstance(meta.get("model"), dict):
        raise ExportError(f"{cfg_path}: no model config")
    return meta


def _load_tokenizer_dir(path: Path) -> Any:
    """Load a tokenizer saved by ``save_pretrained`` from a local folder (never touches the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot load the tokenizer ({e})") from None


def _load_text_config(path: Path) -> Any:
    """A transformers config saved by ``write_text_config`` (local folder only, never the network)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{path}: cannot load the text model config ({e})") from None


def _text_config_from(cfg: ModelConfig, folder: Path, subdir: Optional[str], what: str) -> Any:
    """The saved text-model config of a pretrained-kind text tower in ``folder/subdir``, or ``None``.

    ``None`` (nothing saved, or a scratch tower) makes the tower load ``text.name_or_path``, which
    needs the base model (local folder or hub) for a pretrained kind: logged, since it may fail offline.
    """
    if cfg.text.kind != "pretrained":
        return None
    if subdir and (folder / subdir).is_dir():
        return _load_text_config(folder / subdir)
    logger.warning(
        "%s %s holds no text model config; building the text tower from %r (needs that model, local or hub)",
        what, folder, cfg.text.name_or_path,
    )
    return None


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: unreadable weights ({e})") from None


def _load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, vision_included: bool, source: Path) -> None:
    """Load ``state`` into ``model``; only the frozen vision tower's keys may be absent, and only when not included."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    bad_missing = [k for k in missing if vision_included or not k.startswith(VISION_PREFIX)]
    if bad_missing or unexpected:
        raise ExportError(
            f"{source}: weights do not match the model built from its config"
            + (f"; missing {bad_missing[:8]}{' ...' if len(bad_missing) > 8 else ''}" if bad_missing else "")
            + (f"; unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else "")
        )


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", *, build_vision: bool = True) -> "SimZSS":
    """Load an export written by :func:`save_pretrained` / ``simzss export`` as an eval-mode ``SimZSS``.

    Needs only ``simzss.models``, ``simzss.config`` and the transformers tokenizer. The vision tower comes
    from the export when its weights are included, otherwise from timm by name (``pretrained=True``
    downloads it). A pretrained-kind text tower is built from the export's ``text_config/`` (no hub
    access; exports written before it existed fall back to ``text.name_or_path``). ``build_vision=False``
    gives a text-only model.
    """
    from simzss.models.simzss import SimZSS

    root = Path(path)
    meta = read_export_config(root)
    try:
        cfg = config_from_dict(ModelConfig, meta["model"])
    except ConfigError as e:
        raise ExportError(f"{root / CONFIG_NAME}: invalid model config ({e})") from None
    vision_included = bool(meta.get("vision_weights_included", False))
    build_cfg = cfg
    if vision_included:
        # The weights come from the export: build a random-init tower of the right shape, no download.
        build_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained=False, weights=None))
    elif build_vision and not cfg.vision.pretrained and cfg.vision.weights is None:
        raise ExportError(
            f"{root}: the vision tower is random-init (pretrained: false) and its weights are not in the export; "
            "it cannot be recreated"
        )
    tokenizer = _load_tokenizer_dir(root / meta.get("tokenizer_dir", TOKENIZER_DIR))
    text_config = _text_config_from(cfg, root, meta.get("text_config_dir"), "export")
    model = SimZSS.from_config(build_cfg, tokenizer, build_vision=build_vision, text_config=text_config)
    state = _load_safetensors(root / WEIGHTS_NAME)
    if not build_vision:
        state = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIX)}
    _load_state(model, state, vision_included=vision_included and build_vision, source=root / WEIGHTS_NAME)
    model.config = cfg
    model.tokenizer = tokenizer
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# Trainer checkpoints
# --------------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a trainer checkpoint: ``RUN/checkpoints/step-N`` itself, or the newest complete one in a run or checkpoints folder."""
    from simzss.engine.checkpoint import resolve_resume

    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p}: no such checkpoint")
    try:
        ckpt = resolve_resume(str(p), p)
    except FileNotFoundError:
        ckpt = None
    if ckpt is None:
        raise ExportError(f"{p}: not a complete checkpoint (no trainer_state.json), nor a folder with checkpoints")
    if not (ckpt / WEIGHTS_NAME).is_file():
        raise ExportError(f"{ckpt}: checkpoint has no {WEIGHTS_NAME}")
    return ckpt


def _checkpoint_weights(ckpt: Path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """Trainable weights of a checkpoint, and its vision-tower weights (un-prefixed) when it holds them.

    The trainer stores the frozen tower under ``vision.`` in ``model.safetensors`` only when it cannot be
    recreated from its name (random-init or a local weights file).
    """
    state = _load_safetensors(ckpt / WEIGHTS_NAME)
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


def _load_checkpoint_tokenizer(cfg: ModelConfig, ckpt: Path) -> Any:
    """The checkpoint's tokenizer: a copy saved inside it if any, else ``cfg.tokenizer`` (local path or hub name)."""
    if (ckpt / TOKENIZER_DIR).is_dir():
        return _load_tokenizer_dir(ckpt / TOKENIZER_DIR)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot load tokenizer {cfg.tokenizer!r} named by the checkpoint config ({e})") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *, build_vision: bool = True) -> "SimZSS":
    """Build an eval-mode ``SimZSS`` from a trainer checkpoint (vision tower from its config or the checkpoint)."""
    from simzss.models.simzss import SimZSS

    ckpt = resolve_checkpoint(path)
    train_cfg = read_checkpoint_config(ckpt)
    cfg = train_cfg.model
    trainable, vision_state = _checkpoint_weights(ckpt)
    vision_included = vision_state is not None
    build_cfg = cfg
    if build_vision and vision_included:
        build_cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained=False, weights=None))
    elif build_vision and not cfg.vision.pretrained and cfg.vision.weights is None:
        raise ExportError(
            f"{ckpt}: the vision tower was random-init (pretrained: false) and the checkpoint does not hold its "
            "weights; it cannot be recreated"
        )
    state = dict(trainable)
    if build_vision and vision_state is not None:
        state.update({VISION_PREFIX + k: v for k, v in vision_state.items()})
    tokenizer = _load_checkpoint_tokenizer(cfg, ckpt)
    text_config = _text_config_from(cfg, ckpt, TEXT_CONFIG_DIR, "checkpoint")
    model = SimZSS.from_config(build_cfg, tokenizer, build_vision=build_vision, text_config=text_config)
    _load_state(model, state, vision_included=vision_included and build_vision, source=ckpt / WEIGHTS_NAME)
    model.config = cfg
    model.tokenizer = tokenizer
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> "SimZSS":
    """Load either an export folder or a trainer checkpoint (run folder, checkpoints folder or step folder)."""
    if is_export(path):
        return load_pretrained(path, device)
    return load_checkpoint(path, device)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def vision_weights_required(cfg: ModelConfig) -> bool:
    """Whether the vision tower cannot be recreated from its timm name (random-init, or a local weights file)."""
    return (not cfg.vision.pretrained) or cfg.vision.weights is not None


def _tensor_dict(state: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone so tied/viewed tensors are written independently.
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _format_results(results: Any) -> str:
    """Markdown for evaluation results: a table of the scalar metrics and the full JSON.

    Accepts the trainer's ``eval.json`` (``{"step": N, "results": {spec: metrics}}``), ``simzss eval`` output
    (``{spec: metrics}``) or a flat ``{metric: value}``.
    """
    rows: List[Tuple[str, str, Any]] = []
    step = None
    table_src = results
    if isinstance(results, dict) and isinstance(results.get("results"), dict):
        step, table_src = results.get("step"), results["results"]

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "per_class":
                    continue
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            name, _, metric = prefix.rpartition("/")
            rows.append((name or "-", metric, obj))

    walk("", table_src)
    out = [f"At training step {step}:", ""] if step is not None else []
    if rows:
        out += ["| evaluation | metric | value |", "|---|---|---|"]
        out += [f"| {n} | {m} | {v:.4g} |" if isinstance(v, float) else f"| {n} | {m} | {v} |" for n, m, v in rows]
        out.append("")
    out += ["<details><summary>all results (JSON)</summary>", "", "```json", json.dumps(results, indent=2), "```", "", "</details>"]
    return "\n".join(out)


def model_card(
    cfg: ModelConfig,
    *,
    name: str,
    vision_included: bool,
    train_config: Optional[TrainConfig] = None,
    eval_results: Optional[Any] = None,
) -> str:
    """Text of the export's README.md: what the model is, how to load it, evaluation results, training config."""
    v, t = cfg.vision, cfg.text
    if vision_included:
        vision_src = "weights included in `model.safetensors` (`vision.` prefix)"
    else:
        vision_src = "weights downloaded from the timm hub by name on load"
    text_desc = (
        f"from scratch, {t.layers} layers x {t.width} wide, {t.heads} heads"
        if t.kind == "scratch"
        else f"initialised from `{t.name_or_path}`"
    )
    config_yaml = to_yaml(train_config) if train_config is not None else to_yaml(cfg)
    lines = [
        "---",
        "library_name: simzss",
        "pipeline_tag: image-segmentation",
        "tags:",
        "- zero-shot-segmentation",
        "- open-vocabulary-segmentation",
        "- simzss",
        "---",
        "",
        f"# {name}",
        "",
        "An open-vocabulary zero-shot segmentation model trained by the SimZSS recipe "
        "(Stegmüller, Lebailly et al., ICLR 2025): a frozen vision tower and a text tower aligned to it.",
        "",
        f"- Vision tower (frozen): `{v.name}`"
        + (f" with `{json.dumps(v.model_kwargs)}`" if v.model_kwargs else "")
        + f" — {vision_src}",
        f"- Text tower: {text_desc}, {t.pooling} pooling, context {t.context_length}",
        f"- Exported by simzss {__version__} (export format {FORMAT_VERSION})",
        "",
        "## Usage",
        "",
        "```python",
        "from simzss.export import load_pretrained",
        "",
        'model = load_pretrained("PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "```bash",
        'simzss segment image.jpg --model PATH/TO/THIS/FOLDER --labels "cat,grass,sky" --out overlay.png',
        "```",
        "",
        "## Evaluation results",
        "",
        _format_results(eval_results) if eval_results is not None else "No evaluation results were recorded.",
        "",
        "## Training configuration",
        "",
        "```yaml",
        config_yaml.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out``; an existing export is swapped out and removed only afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote export %s (vision weights %s)", out, "included" if vision_state is not None else "referenced by name")
    return out


def save_pretrained(
    model: "SimZSS",
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
    from simzss.models.simzss import SimZSS
    from simzss.models.vision import FrozenVisionTower

    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out_dir).absolute()
    _check_out_dir(out, overwrite)  # fail before loading anything
    train_cfg = read_checkpoint_config(ckpt)
    cfg = train_cfg.model
    trainable, vision_state = _checkpoint_weights(ckpt)
    required = vision_weights_required(cfg)
    if include_vision is False and required:
        raise ExportError(f"{ckpt}: the vision tower cannot be recreated from its name; its weights must be included")
    include = required or bool(include_vision)
    tokenizer = _load_checkpoint_tokenizer(cfg, ckpt)
    # Validate the trainable weights against a model built from the config (no vision download needed).
    text_config = _text_config_from(cfg, ckpt, TEXT_CONFIG_DIR, "checkpoint")
    model = SimZSS.from_config(cfg, tokenizer, build_vision=False, text_config=text_config)
    _load_state(model, trainable, vision_included=False, source=ckpt / WEIGHTS_NAME)
    if include and vision_state is None:
        if not cfg.vision.pretrained and cfg.vision.weights is None:
            raise ExportError(
                f"{ckpt}: the vision tower was random-init (pretrained: false) and the checkpoint does not hold its "
                "weights; it cannot be recreated, so this checkpoint cannot be exported"
            )
        vc = cfg.vision  # only the tower is needed: built as SimZSS.from_config builds it
        vision_state = FrozenVisionTower(
            vc.name, pretrained=vc.pretrained, weights=vc.weights, model_kwargs=dict(vc.model_kwargs)
        ).state_dict()
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


def write_text_config(model: "SimZSS", folder: str | os.PathLike) -> Optional[Path]:
    """Save a pretrained-kind text tower's ``transformers`` config to ``folder/text_config`` (for checkpoints).

    ``load_checkpoint`` / ``export_checkpoint`` then build the text model from it, with no hub access.
    Returns the folder written, or ``None`` for a scratch tower (built from the ``ModelConfig`` alone).
    """
    hf_config = getattr(model.text, "hf_config", None)
    if hf_config is None:
        return None
    out = Path(folder) / TEXT_CONFIG_DIR
    hf_config.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------------


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None) -> str:
    """Upload an export folder to a Hugging Face model repo (created if needed); returns the commit URL.

    Any hub or network failure becomes an :class:`ExportError` with the reason.
    """
    read_export_config(folder)  # never upload a partial or foreign folder
    try:
        import huggingface_hub
    except ImportError:
        raise ExportError("--push-to-hub needs the huggingface_hub package (pip install huggingface_hub)") from None
    try:
        huggingface_hub.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        info = huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            token=token,
            commit_message=f"Upload SimZSS export (simzss {__version__})",
        )
    except Exception as e:  # network, auth, offline mode, bad repo id: all reported, none a traceback
        raise ExportError(f"push to the Hugging Face Hub ({repo_id}) failed: {type(e).__name__}: {e}") from None
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simzss export",
        description="Export a training checkpoint to a self-contained inference folder (safetensors + tokenizer + model card).",
    )
    p.add_argument("checkpoint", help="checkpoint folder (RUN/checkpoints/step-N), or a run / checkpoints folder (latest step)")
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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


__all__ = [
    "FORMAT_VERSION",
    "ExportError",
    "is_export",
    "read_export_config",
    "load_pretrained",
    "resolve_checkpoint",
    "read_checkpoint_config",
    "load_checkpoint",
    "load_model",
    "vision_weights_required",
    "model_card",
    "write_export",
    "save_pretrained",
    "find_eval_results",
    "export_checkpoint",
    "write_text_config",
    "push_to_hub",
    "main",
]
