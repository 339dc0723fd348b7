"""The export-folder format that ``SimZSS.from_pretrained`` reads: file names, ``config.json`` checks, and its parts.

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
unless its weights are included. Writing exports is :mod:`simzss.io.export`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

import simzss.data.clip_tokenizer  # noqa: F401  registers OpenCLIPTokenizerFast (import-official exports) with AutoTokenizer
from simzss.config import ConfigError, ModelConfig, config_from_dict

logger = logging.getLogger(__name__)

FORMAT_NAME = "simzss"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TEXT_CONFIG_DIR = "text_config"  # config.json of a pretrained-kind text model (exports and checkpoints)
CARD_NAME = "README.md"
VISION_PREFIX = "vision."


class ExportError(RuntimeError):
    """An export or checkpoint that cannot be written or read (incomplete, wrong format, conflicting options)."""



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


def load_tokenizer_dir(path: Path) -> Any:
    """Load a tokenizer saved by ``save_pretrained`` from a local folder (never touches the network)."""
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot load the tokenizer ({e})") from None


def load_text_config(path: Path) -> Any:
    """A transformers config saved by ``write_text_config`` (local folder only, never the network)."""
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{path}: cannot load the text model config ({e})") from None


def text_config_from(cfg: ModelConfig, folder: Path, subdir: Optional[str], what: str) -> Any:
    """The saved text-model config of a pretrained-kind text tower in ``folder/subdir``, or ``None``.

    ``None`` (nothing saved, or a scratch tower) makes the tower load ``text.name_or_path``, which
    needs the base model (local folder or hub) for a pretrained kind: logged, since it may fail offline.
    """
    if cfg.text.kind != "pretrained":
        return None
    if subdir and (folder / subdir).is_dir():
        return load_text_config(folder / subdir)
    logger.warning(
        "%s %s holds no text model config; building the text tower from %r (needs that model, local or hub)",
        what, folder, cfg.text.name_or_path,
    )
    return None


def load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: unreadable weights ({e})") from None


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, vision_included: bool, source: Path) -> None:
    """Load ``state`` into ``model``; only the frozen vision tower's keys may be absent, and only when not included."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    bad_missing = [k for k in missing if vision_included or not k.startswith(VISION_PREFIX)]
    if bad_missing or unexpected:
        raise ExportError(
            f"{source}: weights do not match the model built from its config"
            + (f"; missing {bad_missing[:8]}{' ...' if len(bad_missing) > 8 else ''}" if bad_missing else "")
            + (f"; unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else "")
        )



def config_to_build(cfg: ModelConfig, *, vision_included: bool, build_vision: bool, source: str) -> ModelConfig:
    """The config to build a model from before loading saved weights: when the saved weights include the vision
    tower, a random-init tower of the right shape (nothing to download, no DVT file to read); otherwise ``cfg``,
    which must be able to recreate the tower (``ExportError`` naming ``source`` when it is random-init)."""
    if vision_included:
        vision = dataclasses.replace(cfg.vision, pretrained=False, weights=None, denoiser_weights=None)
        return dataclasses.replace(cfg, vision=vision)
    if build_vision and not cfg.vision.pretrained and cfg.vision.weights is None:
        raise ExportError(
            f"{source}: the vision tower is random-init (pretrained: false) and its weights are not saved with it; "
            "it cannot be recreated"
        )
    return cfg


@dataclass
class ExportParts:
    """What an export folder holds, ready to build a model from: ``build_config`` has the vision tower set to
    random init when its weights come from the export (nothing to download)."""

    config: ModelConfig
    build_config: ModelConfig
    tokenizer: Any
    text_config: Any
    state: Dict[str, torch.Tensor]
    vision_included: bool


def read_export(path: str | os.PathLike, *, build_vision: bool = True) -> ExportParts:
    """Read and check an export folder (see :func:`read_export_config`); the parts ``SimZSS.from_pretrained`` needs.

    A pretrained-kind text tower is built from the export's ``text_config/`` (no hub access; exports written
    before it existed fall back to ``text.name_or_path``). ``build_vision=False`` leaves the vision weights out.
    """
    root = Path(path)
    meta = read_export_config(root)
    try:
        cfg = config_from_dict(ModelConfig, meta["model"])
    except ConfigError as e:
        raise ExportError(f"{root / CONFIG_NAME}: invalid model config ({e})") from None
    vision_included = bool(meta.get("vision_weights_included", False))
    build_cfg = config_to_build(cfg, vision_included=vision_included, build_vision=build_vision, source=f"{root}")
    tokenizer = load_tokenizer_dir(root / meta.get("tokenizer_dir", TOKENIZER_DIR))
    text_config = text_config_from(cfg, root, meta.get("text_config_dir"), "export")
    state = load_safetensors(root / WEIGHTS_NAME)
    if not build_vision:
        state = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIX)}
    return ExportParts(cfg, build_cfg, tokenizer, text_config, state, vision_included and build_vision)


def write_text_config(model: torch.nn.Module, folder: str | os.PathLike) -> Optional[Path]:
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
