"""Pickle-free training checkpoints: atomic directories, rotation, RNG capture.

Layout of ``RUN/checkpoints/step-000001000/``::

    model.safetensors        trainable weights (SimZSS.trainable_state_dict)
    optimizer.safetensors    tensors of the optimizer state   } tensors: safetensors
    optimizer.json           the rest of it (param groups...) } everything else: JSON
    scheduler.json
    trainer_state.json       step, epoch, run id, data-stream position, resolved config
    config.yaml              the resolved config, human-readable
    rank-{R}.json / .safetensors      python / numpy / torch / cuda RNG of every rank

A checkpoint is written into a hidden temporary directory (files fsynced) and renamed into place, so a
crash never leaves a half-written ``step-*`` directory behind; ``latest_checkpoint`` only sees complete ones.
Files can still be damaged afterwards (disk full on another node, manual edits, a truncated copy):
:func:`validate_checkpoint` opens every file, the trainer's ``resume=latest`` takes the newest checkpoint
that validates (naming the skipped ones in a warning), and an explicit damaged checkpoint is a
:class:`CheckpointError` naming the file. Files get the modes of the user's umask.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from simzss.data.shards import follow_umask

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
#: Files every checkpoint has (``rank-R.json`` for each of ``world_size`` ranks comes on top).
REQUIRED_FILES = ("trainer_state.json", "model.safetensors", "optimizer.json", "scheduler.json", "config.yaml")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or damaged; the message names the file."""


# --- tensors <-> (safetensors, JSON) -------------------------------------------------------------


def flatten_state(obj: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numpy arrays, scalars) into a
    JSON-serialisable skeleton and a flat ``{name: tensor}`` dict for safetensors.

    Non-string dict keys and tuples are tagged so that :func:`unflatten_state` restores them exactly.
    """
    tensors: Dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x))
            return {"__ndarray__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: walk(v) for k, v in x.items()}
            return {"__items__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint")

    return walk(obj), tensors


def unflatten_state(skeleton: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__ndarray__" in x:
                return tensors[x["__ndarray__"]].numpy()
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__items__" in x:
                return {walk(k): walk(v) for k, v in x["__items__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def save_state(obj: Any, directory: Path, name: str) -> None:
    """Write ``name.json`` (+ ``name.safetensors`` when there are tensors) into ``directory``."""
    skeleton, tensors = flatten_state(obj)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton), encoding="utf-8")


def load_state(directory: Path, name: str) -> Any:
    """Read back what :func:`save_state` wrote."""
    tensor_path = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_path)) if tensor_path.exists() else {}
    skeleton = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    return unflatten_state(skeleton, tensors)


# --- RNG -----------------------------------------------------------------------------------------


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA when present) RNG states of this process."""
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when the device count matches)."""
    random.setstate(_as_python_rng(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine %d GPUs: not restored",
                        len(cuda), torch.cuda.device_count())


def _as_python_rng(s: Any) -> tuple:
    # random.setstate wants (version, tuple_of_ints, gauss_next); JSON may have given lists.
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


# --- directories ---------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def list_checkpoints(ckpt_dir: str | Path) -> List[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def _check_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({str(e).splitlines()[0][:200]})") from None


def _check_safetensors(path: Path) -> None:
    try:
        # Parsing the header checks that the file is exactly as long as its tensors (truncated or extended
        # files fail) without reading the data.
        with safe_open(str(path), "pt") as f:
            f.keys()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: damaged safetensors file ({str(e).splitlines()[0][:200]})") from None


def _check_state(directory: Path, name: str) -> None:
    skeleton = _check_json(directory / f"{name}.json")
    tensors = directory / f"{name}.safetensors"
    if tensors.exists() or "__tensor__" in json.dumps(skeleton) or "__ndarray__" in json.dumps(skeleton):
        _check_safetensors(tensors)


def validate_checkpoint(path: str | Path, *, full: bool = True) -> Path:
    """Open every file of checkpoint ``path`` (JSON and YAML parsed, safetensors headers checked against the
    file lengths, ``rank-R`` state of every rank that wrote one); return ``path`` or raise
    :class:`CheckpointError` naming the first damaged or missing file. ``full=False`` checks only what loading
    the model needs (``trainer_state.json``, ``model.safetensors``, the config when present): exports, eval."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    state = _check_json(path / "trainer_state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'trainer_state.json'}: no step number")
    if not full:
        _check_safetensors(path / "model.safetensors")
        if (path / "config.yaml").is_file():
            _check_yaml(path / "config.yaml")
        return path
    for name in REQUIRED_FILES[1:]:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing")
    _check_safetensors(path / "model.safetensors")
    _check_state(path, "optimizer")
    _check_state(path, "scheduler")
    for rank in range(int(state.get("world_size") or 1)):
        _check_state(path, f"rank-{rank}")
    _check_yaml(path / "config.yaml")
    return path


def _check_yaml(path: Path) -> None:
    try:
        yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: not readable YAML ({str(e).splitlines()[0][:200]})") from None


def latest_valid_checkpoint(ckpt_dir: str | Path, *, full: bool = True) -> Optional[Path]:
    """The newest checkpoint in ``ckpt_dir`` that :func:`validate_checkpoint` accepts; each newer damaged one
    is named in a warning. None when there is none."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return validate_checkpoint(path, full=full)
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint %s: %s", path.name, e)
    return None


def resolve_resume(resume: str, ckpt_dir: str | Path, *, validate: bool = False, full: bool = True) -> Optional[Path]:
    """``latest`` -> newest checkpoint in ``ckpt_dir`` (None when there is none yet, so a requeued job can start
    from scratch); a path -> that checkpoint, or the newest inside a run folder.

    With ``validate`` (the trainer's resume) every candidate must pass :func:`validate_checkpoint`: ``latest``
    skips damaged ones with a warning naming them, an explicit damaged checkpoint raises :class:`CheckpointError`
    naming the file (``full=False``: only the files a model needs, see :func:`validate_checkpoint`). Without it a
    checkpoint only needs its ``trainer_state.json``.
    """
    def newest(folder: str | Path) -> Optional[Path]:
        return latest_valid_checkpoint(folder, full=full) if validate else latest_checkpoint(folder)

    if resume == "latest":
        return newest(ckpt_dir)
    path = Path(resume)
    if (path / "trainer_state.json").exists() or (validate and CKPT_RE.match(path.name) and path.is_dir()):
        return validate_checkpoint(path, full=full) if validate else path
    for candidate in (path / "checkpoints", path):
        if list_checkpoints(candidate):
            found = newest(candidate)
            if found is None:
                raise CheckpointError(f"resume={resume!r}: every checkpoint in {candidate} is damaged (see the warnings)")
            return found
    raise FileNotFoundError(f"resume={resume!r}: not a checkpoint (no trainer_state.json) nor a folder with checkpoints")


def rotate_checkpoints(ckpt_dir: str | Path, keep: int) -> List[Path]:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps everything); returns the deleted."""
    if keep <= 0:
        return []
    old = list_checkpoints(ckpt_dir)[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def tmp_checkpoint_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{TMP_PREFIX}{checkpoint_name(step)}"


def clean_tmp(ckpt_dir: str | Path) -> None:
    """Remove temporary directories left by a checkpoint write that was killed half-way."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file (and the folder) of ``root`` to disk, so that the rename publishes complete data."""
    for p in [*root.rglob("*"), root]:
        if p.is_file() or p == root:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            except OSError:
                pass  # some filesystems cannot fsync a directory
            finally:
                os.close(fd)


def finalize_checkpoint(tmp: Path, ckpt_dir: str | Path, step: int) -> Path:
    """Atomically move a fully written temporary checkpoint into place (replacing one of the same step);
    files are fsynced first and get the modes of the user's umask."""
    follow_umask(tmp)
    _fsync_tree(tmp)
    final = Path(ckpt_dir) / checkpoint_name(step)
    if final.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside first.
        aside = Path(ckpt_dir) / f"{TMP_PREFIX}old-{final.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def save_model_weights(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """Trainable weights as safetensors (shared storage is copied, as safetensors requires)."""
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, str(path))


def load_model_weights(path: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(path))


__all__ = [
    "flatten_state",
    "unflatten_state",
    "save_state",
    "load_state",
    "rng_state",
    "set_rng_state",
    "checkpoint_name",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "validate_checkpoint",
    "latest_valid_checkpoint",
    "CheckpointError",
    "REQUIRED_FILES",
    "rotate_checkpoints",
    "tmp_checkpoint_dir",
    "clean_tmp",
    "finalize_checkpoint",
    "save_model_weights",
    "load_model_weights",
]
