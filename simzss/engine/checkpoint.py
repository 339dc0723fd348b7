"""Pickle-free training checkpoints: atomic directories, rotation, RNG capture.

Layout of ``RUN/checkpoints/step-000001000/``::

    model.safetensors        trainable weights (SimZSS.trainable_state_dict)
    optimizer.safetensors    tensors of the optimizer state   } tensors: safetensors
    optimizer.json           the rest of it (param groups...) } everything else: JSON
    scheduler.json
    trainer_state.json       step, epoch, run id, data-stream position, resolved config
    config.yaml              the resolved config, human-readable
    rank-{R}.json / .safetensors      python / numpy / torch / cuda RNG of every rank
    tokenizer/, text_config/ the tokenizer (and a pretrained text model's config) when the trainer saves them
    manifest.json            size of every other file, and its sha256 with ``checkpoint_checksum: true``

A checkpoint is written into a hidden temporary directory (files fsynced) and renamed into place, so a
crash never leaves a half-written ``step-*`` directory behind; ``latest_checkpoint`` only sees complete ones.
A write that fails (a full disk above all) removes that temporary directory and raises :class:`DiskFullError`
whose message starts with the path. Files can still be damaged afterwards (disk full on another node, manual
edits, a truncated copy, a flipped bit): :func:`validate_checkpoint` is the one check that resume, export and
eval use; ``latest`` is the newest checkpoint that validates (each newer one is named in a "skipping damaged
checkpoint" warning), and an explicit damaged checkpoint is a :class:`CheckpointError` naming the file.
Files get the modes of the user's umask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from simzss.data.shards import DiskFullError, follow_umask, is_disk_full

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
#: Files every checkpoint has (``rank-R.json`` for each of ``world_size`` ranks comes on top).
REQUIRED_FILES = ("trainer_state.json", "model.safetensors", "optimizer.json", "scheduler.json", "config.yaml")
MANIFEST_NAME = "manifest.json"
#: What loading the model needs (``full=False`` validation: export, eval, segment); the rest is training state.
MODEL_FILES = ("trainer_state.json", "model.safetensors", "config.yaml", "config.json")
MODEL_DIRS = ("tokenizer/", "text_config/")
_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or damaged; the message names the file."""


@contextmanager
def removed_on_failure(tmp: Path, target: Path, what: str) -> Iterator[Path]:
    """Write ``target`` through the temporary folder ``tmp``: if anything fails, ``tmp`` is removed (a full disk
    never leaves a half-written folder behind) and a full disk is re-raised as :class:`DiskFullError` naming
    ``target``."""
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):  # also one raised deeper, naming a temporary file: name the target
            raise DiskFullError(target, what) from None
        raise


@contextmanager
def _checkpoint_write(directory: Path) -> Iterator[None]:
    """A write into ``directory``; when that is a temporary checkpoint folder, a failure removes it (see
    :func:`removed_on_failure`), so that a trainer calling these functions leaves nothing behind either."""
    if directory.name.startswith(TMP_PREFIX):
        final = directory.parent / directory.name[len(TMP_PREFIX):]
        with removed_on_failure(directory, final, "a checkpoint"):
            yield
        return
    try:
        yield
    except Exception as e:
        if is_disk_full(e):  # also one raised deeper, naming a temporary file: name the target
            raise DiskFullError(directory, "a checkpoint") from None
        raise


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
    with _checkpoint_write(directory):
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


def _step_folders(ckpt_dir: str | Path) -> List[Tuple[int, Path]]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(ckpt_dir: str | Path) -> List[Path]:
    """Complete checkpoints in ``ckpt_dir`` (those with a ``trainer_state.json``), oldest first."""
    return [p for _, p in _step_folders(ckpt_dir) if (p / "trainer_state.json").exists()]


def list_step_folders(ckpt_dir: str | Path) -> List[Path]:
    """Every ``step-N`` folder in ``ckpt_dir``, oldest first, complete or not. Checkpoints are published by a
    rename, so a ``step-N`` folder without its ``trainer_state.json`` is a damaged one, not a write in progress."""
    return [p for _, p in _step_folders(ckpt_dir)]


def latest_checkpoint(ckpt_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: str | Path) -> int:
    """The training step a checkpoint was written at (its ``trainer_state.json``)."""
    state = _check_json(Path(path) / "trainer_state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{Path(path) / 'trainer_state.json'}: no step number")
    return state["step"]


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


def _check_yaml(path: Path) -> None:
    try:
        yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: not readable YAML ({str(e).splitlines()[0][:200]})") from None


def _check_tokenizer(folder: Path) -> None:
    """A saved tokenizer folder: ``tokenizer_config.json`` and the fast tokenizer's ``tokenizer.json`` (the
    trainer's and ``simzss tokenizer``'s tokenizers are all fast ones) parse."""
    _check_json(folder / "tokenizer_config.json")
    _check_json(folder / "tokenizer.json")


def _is_model_file(rel: str) -> bool:
    return rel in MODEL_FILES or rel.startswith(MODEL_DIRS)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, *, checksum: bool) -> Path:
    """Write ``folder/manifest.json``: the size of every file below ``folder`` and, with ``checksum``, its
    sha256, so that a missing, cut or (with the checksum) bit-flipped file is found by :func:`validate_checkpoint`."""
    files: Dict[str, Dict[str, Any]] = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel != MANIFEST_NAME:
            files[rel] = {"size": f.stat().st_size, **({"sha256": file_sha256(f)} if checksum else {})}
    out = folder / MANIFEST_NAME
    with _checkpoint_write(folder):
        out.write_text(json.dumps({"version": 1, "checksum": "sha256" if checksum else None, "files": files},
                                  indent=1), encoding="utf-8")
    return out


def _check_manifest(path: Path, *, full: bool) -> bool:
    """Check the files ``manifest.json`` lists (only those the model needs unless ``full``): present, of the
    recorded size, and of the recorded sha256 when the checkpoint was written with a checksum. Returns whether
    there was a manifest (checkpoints written before it existed have none)."""
    if not (path / MANIFEST_NAME).exists():
        return False
    manifest = _check_json(path / MANIFEST_NAME)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / MANIFEST_NAME}: no file list")
    for rel, info in files.items():
        if not full and not _is_model_file(rel):
            continue
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        size = f.stat().st_size
        if isinstance(info, dict) and size != info.get("size"):
            raise CheckpointError(f"{f}: {size} bytes, the checkpoint wrote {info.get('size')} (cut or modified)")
        digest = info.get("sha256") if isinstance(info, dict) else None
        if digest is not None and file_sha256(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (sha256 differs from the one written with the "
                                  "checkpoint): the file was modified or the disk flipped a bit")
    return True


def validate_checkpoint(path: str | Path, *, full: bool = True) -> Path:
    """The one check of a checkpoint folder, for resume (``full=True``) and for export / eval / segment
    (``full=False``); return ``path`` or raise :class:`CheckpointError` naming the first damaged or missing file.

    Both levels check the same files that loading the model needs: ``trainer_state.json`` (with its step),
    ``model.safetensors`` (header against the file length), ``config.yaml`` (or ``config.json``), a saved
    ``tokenizer/`` folder, and every one of these files that ``manifest.json`` lists (present, same size, same
    sha256 when written with ``checkpoint_checksum: true``). ``full`` adds the training state that only resume
    reads: optimizer, scheduler and the ``rank-R`` state of every rank (and their manifest entries).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    state = _check_json(path / "trainer_state.json")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'trainer_state.json'}: no step number")
    _check_manifest(path, full=full)
    _check_safetensors(path / "model.safetensors")
    if (path / "config.yaml").exists() or not (path / "config.json").exists():
        _check_yaml(path / "config.yaml")
    else:
        _check_json(path / "config.json")
    if (path / "tokenizer").is_dir():
        _check_tokenizer(path / "tokenizer")
    if full:
        for name in REQUIRED_FILES[1:]:
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: missing")
        _check_state(path, "optimizer")
        _check_state(path, "scheduler")
        for rank in range(int(state.get("world_size") or 1)):
            _check_state(path, f"rank-{rank}")
    return path


def latest_valid_checkpoint(ckpt_dir: str | Path, *, full: bool = True) -> Optional[Path]:
    """The newest checkpoint in ``ckpt_dir`` that :func:`validate_checkpoint` accepts; each newer ``step-N``
    folder (a damaged one, or one without its ``trainer_state.json``) is named in a warning. None when there is
    none."""
    for path in reversed(list_step_folders(ckpt_dir)):
        try:
            return validate_checkpoint(path, full=full)
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint %s: %s", path.name, e)
    return None


def resolve_resume(resume: str, ckpt_dir: str | Path, *, validate: bool = False, full: bool = True) -> Optional[Path]:
    """``latest`` -> newest checkpoint in ``ckpt_dir`` (None when there is none yet, so a requeued job can start
    from scratch); a path -> that checkpoint, or the newest inside a run folder.

    With ``validate`` (resume, export, eval) every candidate must pass :func:`validate_checkpoint`: ``latest``
    skips damaged ones with a warning naming them, an explicit damaged checkpoint raises :class:`CheckpointError`
    naming the file (``full=False``: only the files a model needs, see :func:`validate_checkpoint`). Without it a
    checkpoint only needs its ``trainer_state.json``.
    """
    def listed(folder: Path) -> List[Path]:
        return list_step_folders(folder) if validate else list_checkpoints(folder)

    def newest(folder: str | Path) -> Optional[Path]:
        return latest_valid_checkpoint(folder, full=full) if validate else latest_checkpoint(folder)

    if resume == "latest":
        return newest(ckpt_dir)
    path = Path(resume)
    if (path / "trainer_state.json").exists() or (validate and CKPT_RE.match(path.name) and path.is_dir()):
        return validate_checkpoint(path, full=full) if validate else path
    for candidate in (path / "checkpoints", path):
        if listed(candidate):
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


def _checksum_setting(tmp: Path) -> bool:
    """``checkpoint_checksum`` of the config the trainer saved in ``trainer_state.json`` (false when absent)."""
    try:
        state = json.loads((tmp / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    config = state.get("config") if isinstance(state, dict) else None
    return bool(config.get("checkpoint_checksum", False)) if isinstance(config, dict) else False


def finalize_checkpoint(tmp: Path, ckpt_dir: str | Path, step: int, *, checksum: Optional[bool] = None) -> Path:
    """Atomically move a fully written temporary checkpoint into place (replacing one of the same step).

    ``manifest.json`` is written first (sizes, and sha256 of every file when ``checksum``; ``None`` takes
    ``checkpoint_checksum`` from the config in ``tmp/trainer_state.json``); files are fsynced and get the
    modes of the user's umask. A failure (a full disk) removes ``tmp`` and raises (:class:`DiskFullError`).
    """
    final = Path(ckpt_dir) / checkpoint_name(step)
    with removed_on_failure(tmp, final, "a checkpoint"):
        write_manifest(tmp, checksum=_checksum_setting(tmp) if checksum is None else checksum)
        follow_umask(tmp)
        _fsync_tree(tmp)
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
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with _checkpoint_write(Path(path).parent):
        save_file(tensors, str(path))


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
    "list_step_folders",
    "latest_checkpoint",
    "checkpoint_step",
    "write_manifest",
    "file_sha256",
    "MANIFEST_NAME",
    "DiskFullError",
    "is_disk_full",
    "removed_on_failure",
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
