"""Output folders of shard-to-shard jobs (``simzss prepare``, ``simzss shards resize``): one output shard per input
shard, ``OUT/NAME.tar`` for ``.../NAME.tar``.

Everything here runs before any work: the inputs are expanded and checked (a typo leaves nothing behind), the
output folder must take new files, and output shards made from an input of the same input folder that is gone or
has changed since (the input folder was regenerated with fewer or other shards) are refused, or removed with
``--overwrite``, because ``train`` would read them along with the fresh ones.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from simzss.data.shard_index import remove_index
from simzss.data.shards import expand_shards, read_fingerprints, source_fingerprint

log = logging.getLogger(__name__)


def plan_outputs(inputs: str | Sequence[str], out_dir: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``[(input shard, output path), ...]``: the inputs expanded (brace patterns, globs, folders, lists) and
    checked before anything is loaded or written. ``FileNotFoundError`` names missing inputs; ``ValueError`` for
    remote inputs, inputs inside the output folder, or two inputs with the same file name."""
    out = Path(out_dir)
    urls = expand_shards([inputs] if isinstance(inputs, str) else list(inputs), local_only=True, what="input shard")
    names: dict[str, str] = {}
    plan = []
    for url in urls:
        src = Path(url)
        if src.resolve().parent == out.resolve():
            raise ValueError(f"input {url} is inside the output folder {out}; choose another --out")
        if src.name in names:
            raise ValueError(f"two inputs would write the same output {src.name}: {names[src.name]} and {url}")
        names[src.name] = url
        plan.append((url, out / src.name))
    return plan


def writable_folder(out: str | os.PathLike[str]) -> None:
    """Create ``out`` and check that files can be made in it; ``PermissionError`` with a one-line reason if not
    (a read-only file system, permissions, a full disk), ``ValueError`` if ``out`` is a file (a usage error)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} is a file; give a folder as --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {out} ({e.strerror or type(e).__name__}); "
                              "choose a writable --out") from None


def stale_outputs(out: str | os.PathLike[str], plan: Sequence[tuple[str, Path]]) -> list[str]:
    """Output shards outside ``plan`` made from an input in one of the plan's input folders that is gone or has
    changed since (per ``OUT/fingerprints.json``). Outputs of other input folders are not judged."""
    out = Path(out)
    planned = {dst.name for _, dst in plan}
    folders = {Path(src).resolve().parent for src, _ in plan}
    stale = []
    for name, record in sorted(read_fingerprints(out).items()):
        source = record.get("source")
        if name in planned or not isinstance(source, dict) or "path" not in source or not (out / name).is_file():
            continue
        path = Path(str(source["path"]))
        if path.parent not in folders:
            continue  # another run's input folder: not ours to judge
        try:
            if source_fingerprint(path) == source:
                continue
        except OSError:
            pass
        stale.append(name)
    return stale


def drop_stale_outputs(out: str | os.PathLike[str], plan: Sequence[tuple[str, Path]], overwrite: bool) -> int:
    """Refuse (``ValueError`` naming ``--overwrite``) or, with ``overwrite``, delete the :func:`stale_outputs` of
    ``out``; return how many were deleted."""
    out = Path(out)
    stale = stale_outputs(out, plan)
    if stale and not overwrite:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise ValueError(f"{out} holds {len(stale)} shard(s) made from inputs that are gone or changed ({shown}); "
                         "train would read them with the new ones: pass --overwrite to remove them and redo all")
    for name in stale:
        (out / name).unlink()
        remove_index(str(out / name))
        log.warning("%s: removed; its input is gone or changed (--overwrite)", out / name)
    return len(stale)


def problems_summary(results: Sequence[Any]) -> dict[str, Any]:
    """The failed and truncated part of a shard job's summary, from per-shard results (``shard``, ``status``
    done | skipped | failed, ``error``, ``truncated``, ``samples``): what ``report_summary`` turns into exit code 1."""
    truncated = [r for r in results if r.truncated and r.status != "failed"]
    return {
        "shards_failed": sum(r.status == "failed" for r in results),
        "failed": [{"shard": r.shard, "error": r.error} for r in results if r.status == "failed"],
        "shards_truncated": len(truncated),
        "truncated": [{"shard": r.shard, "error": r.truncated, "samples_kept": r.samples} for r in truncated],
    }


__all__ = ["drop_stale_outputs", "plan_outputs", "problems_summary", "stale_outputs", "writable_folder"]
