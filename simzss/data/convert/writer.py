"""Write image-caption records (from COCO Captions, a CSV/parquet table, ...) as img2dataset-layout shards.

Each record becomes one sample: ``KEY.jpg|png|webp`` (the image file's bytes, unchanged, or with ``resize``
its short side brought down to N and re-encoded as JPEG, see :mod:`simzss.data.convert.resize`), ``KEY.txt`` (the
caption), ``KEY.json`` (ids and source path). Shards hold a fixed number of records (``00000.tar``, ...), are
written in parallel, atomically and resumably, and ``sizes.json`` is kept up to date, so ``simzss prepare``
and ``simzss train`` read the output as is. With ``prepare`` the concepts are added in the same pass. Each shard's
fingerprint (``fingerprints.json``) holds a digest of its records (key, caption, image path, size and mtime): a
rerun redoes a shard whose records changed and keeps the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

from simzss.concepts import ConceptExtractor
from simzss.data.convert.resize import ResizeOptions, resize_image
from simzss.data.pool import PoolInterrupted, exit_with_parent, run_jobs, sigterm_raises
from simzss.data.prepare import CONCEPTS_EXT, CONCEPTS_VERSION
from simzss.data.shard_index import index_kept_shard, index_new_shard, remove_index
from simzss.data.shards import (
    atomic_write_bytes, clean_stale_temps, file_fingerprint, read_fingerprints, read_sizes, write_one_of_many,
    write_sizes,
)
from simzss.data.transforms import ImageTooLargeError
from simzss.logs import progress, setup_logging

log = logging.getLogger(__name__)

#: Reasons a record is skipped, in the order they are checked.
SKIP_REASONS = ("duplicate_key", "empty_caption", "image_is_url", "missing_image", "unreadable_image",
                "unsupported_image_format", "image_too_large")
MANIFEST = "shards_manifest.json"
MANIFEST_VERSION = 1
#: Pillow format -> the member extension the training stream and ``prepare`` read.
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SHARD_NAME = re.compile(r"^\d{5,}\.tar$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


@dataclass(frozen=True)
class Record:
    """One (image, caption) pair to write: a stable key, an image path, the caption and ids for ``KEY.json``."""

    key: str
    image: str
    caption: str
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrepareOptions:
    """Settings of the concept annotation done in the same pass (as ``simzss prepare``)."""

    spacy_model: str = "en_core_web_sm"
    batch_size: int = 256
    fast_spacy: bool = True
    lowercase: bool = False


@dataclass
class ShardOutcome:
    """What happened to one output shard."""

    name: str
    status: str  # done | skipped | failed
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    error: Optional[str] = None


def is_url(path: str) -> bool:
    """True for ``http://...``-style image references (downloading is img2dataset's job, not ours)."""
    return bool(_URL.match(path))


def image_problem(path: str) -> Optional[str]:
    """Why the file at ``path`` cannot be a sample's image, from its header only (cheap), or None."""
    try:
        with Image.open(path) as im:
            fmt = im.format
    except FileNotFoundError:
        return "missing_image"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "unreadable_image"
    return None if fmt in IMAGE_FORMATS else "unsupported_image_format"


def screen_records(records: Sequence[Record]) -> Tuple[List[Record], Counter]:
    """Drop the records that cannot become a sample before any shard is written (so that shards hold exactly
    their share): repeated keys, empty captions, URLs, image files that are missing, not an image by their
    header, or of a format the training stream does not read. Returns the kept records (order kept) and the
    counts by reason; the first few of each reason are logged."""
    kept: List[Record] = []
    skipped: Counter = Counter()
    seen: set = set()
    problems: Dict[str, Optional[str]] = {}
    for r in records:
        if r.key in seen:
            reason = "duplicate_key"
        elif not r.caption.strip():
            reason = "empty_caption"
        elif is_url(r.image):
            reason = "image_is_url"
        else:
            if r.image not in problems:  # several captions share an image: open it once
                problems[r.image] = image_problem(r.image)
            reason = problems[r.image]
        seen.add(r.key)
        if reason is None:
            kept.append(r)
            continue
        skipped[reason] += 1
        if skipped[reason] <= 3:
            log.warning("skipping %s (%s): %s", r.key, r.image, reason)
    return kept, skipped


def read_image_member(path: str) -> Tuple[Optional[str], Optional[bytes], Optional[str]]:
    """``(extension, bytes, None)`` for a readable JPEG/PNG/WebP file, else ``(None, None, skip reason)``.

    The bytes are the file's own; Pillow only checks that they are a well-formed image of a format the
    training stream reads.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, None, "missing_image"
    except OSError:
        return None, None, "unreadable_image"
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, None, "unreadable_image"
    ext = IMAGE_FORMATS.get(fmt or "")
    if ext is None:
        return None, None, "unsupported_image_format"
    return ext, data, None


# ------------------------------------------------------------------------------------------------
# worker side (top-level functions and module state, so that 'spawn' workers can run them)

_STATE: Dict[str, Any] = {}


class ShardsInterrupted(PoolInterrupted):
    """SIGTERM reached ``write_dataset``; the pool was stopped, finished shards are kept."""


def _init_worker(prepare: Optional[PrepareOptions], resize: Optional[ResizeOptions] = None) -> None:
    """Load the spaCy pipeline once per process when concepts are annotated in the same pass; keep ``resize``."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        exit_with_parent(parent.pid)
    if parent is not None and not logging.getLogger().handlers:
        setup_logging(logging.WARNING)
    _STATE.clear()
    _STATE["resize"] = resize
    if prepare is not None:
        extractor = ConceptExtractor(prepare.spacy_model, batch_size=prepare.batch_size, numpy_gemm=prepare.fast_spacy,
                                     lowercase=prepare.lowercase)
        extractor(["a warm-up caption"])
        _STATE.update(extractor=extractor, batch_size=prepare.batch_size)


def build_shard(dst: str, records: Sequence[Record]) -> ShardOutcome:
    """Write the readable records as one shard at ``dst`` (atomically); unreadable images are counted skips."""
    out = ShardOutcome(name=Path(dst).name, status="done")

    def samples() -> Iterator[Dict[str, Any]]:
        for r in records:
            ext, data, reason = read_image_member(r.image)
            if reason is None and _STATE.get("resize") is not None:
                try:
                    resized = resize_image(data, _STATE["resize"])  # type: ignore[arg-type]
                except ImageTooLargeError:
                    reason = "image_too_large"
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                    reason = "unreadable_image"
                else:
                    if resized is not None:
                        ext, data = "jpg", resized
            if reason is not None:
                out.skipped[reason] += 1
                log.warning("skipping %s (%s): %s", r.key, r.image, reason)
                continue
            caption = r.caption.strip()
            meta = {"key": r.key, "caption": caption, **r.meta}
            yield {"__key__": r.key, ext: data, "txt": caption,  # type: ignore[dict-item]
                   "json": json.dumps(meta, ensure_ascii=False, sort_keys=True)}

    def annotated() -> Iterator[Dict[str, Any]]:
        extractor = _STATE.get("extractor")
        if extractor is None:
            yield from samples()
            return
        it = samples()
        while chunk := list(islice(it, _STATE["batch_size"])):
            for sample, concepts in zip(chunk, extractor([s["txt"] for s in chunk])):
                payload = {"version": CONCEPTS_VERSION, "concepts": [c.to_json() for c in concepts]}
                sample[CONCEPTS_EXT] = json.dumps(payload, ensure_ascii=False)
                yield sample

    out.samples, out.error = write_one_of_many(dst, annotated(), dst)
    if out.error is not None:
        out.status = "failed"
    else:
        index_new_shard(dst)
    return out


def _run_shard(dst: str, records: Sequence[Record]) -> ShardOutcome:
    return build_shard(dst, records)


# ------------------------------------------------------------------------------------------------
# driver


def _fingerprint(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.key.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def _records_digest(records: Sequence[Record]) -> str:
    """What one shard is made from: each record's key, caption, metadata, image path and the image file's size and
    mtime (a missing file counts as such), hashed."""
    h = hashlib.sha256()
    for r in records:
        try:
            fp = file_fingerprint(r.image)
        except OSError:
            fp = {"size": -1, "mtime_ns": -1}
        h.update(json.dumps([r.key, r.caption, r.meta, r.image, fp["size"], fp["mtime_ns"]], sort_keys=True,
                            ensure_ascii=False, default=str).encode("utf-8") + b"\0")
    return h.hexdigest()


def _check_manifest(out: Path, manifest: Dict[str, Any], overwrite: bool) -> None:
    path = out / MANIFEST
    if overwrite or not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete it or use --overwrite") from None
    for k in ("source", "samples_per_shard", "records", "keys_sha256", "prepared", "resize"):
        if old.get(k) != manifest.get(k):
            raise ValueError(
                f"{out} holds shards made with another {k} ({old.get(k)!r}, now {manifest.get(k)!r}); "
                "choose another --out or pass --overwrite to rebuild every shard"
            )


def write_dataset(
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    *,
    source: Dict[str, Any],
    samples_per_shard: int = 1000,
    processes: int = 1,
    overwrite: bool = False,
    show_progress: bool = True,
    prepare: Optional[PrepareOptions] = None,
    skipped: Optional[Counter] = None,
    resize: Optional[ResizeOptions] = None,
) -> Dict[str, Any]:
    """Write ``records`` (in order) into ``out_dir/00000.tar, ...``; return the run summary.

    ``source`` describes the input (stored in ``shards_manifest.json``; a rerun with another input into the
    same folder is refused unless ``overwrite``). An existing shard is kept when its fingerprint says it was made
    from the same records (keys, captions, image files' size and mtime) with the same settings; otherwise it is
    rewritten (``overwrite``: all are). ``skipped``: counts of records the reader already dropped (added to the
    summary). ``resize``: bring every image's short side down to ``resize.short_side`` (JPEG re-encode). Raises
    ``ValueError`` on bad arguments or when no record is left.
    """
    if samples_per_shard < 1 or processes < 1:
        raise ValueError(f"samples per shard and processes must be >= 1, got {samples_per_shard}, {processes}")
    t0 = time.perf_counter()
    log.info("checking %d record(s): captions, and the header of each image file", len(records))
    kept, skips = screen_records(records)
    skips.update(skipped or {})
    if not kept:
        raise ValueError(f"no usable image-caption pair in the input ({_skip_text(skips) or 'it is empty'})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunks = [kept[i : i + samples_per_shard] for i in range(0, len(kept), samples_per_shard)]
    width = max(5, len(str(len(chunks) - 1)))
    names = [f"{i:0{width}d}.tar" for i in range(len(chunks))]
    manifest = {
        "version": MANIFEST_VERSION,
        "source": source,
        "samples_per_shard": samples_per_shard,
        "records": len(kept),
        "keys_sha256": _fingerprint(kept),
        "prepared": prepare is not None,
        "resize": resize.made_with() if resize is not None else None,
        "shards": len(chunks),
    }
    _check_manifest(out, manifest, overwrite)
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    clean_stale_temps(out)
    if overwrite:  # shards of a bigger earlier run would otherwise be read along with the new ones
        for p in out.glob("*.tar"):
            if _SHARD_NAME.match(p.name) and p.name not in names:
                p.unlink()
                remove_index(str(p))
    try:
        sizes = read_sizes(out, verify=False)  # each shard is checked against its fingerprint below
    except ValueError as e:
        log.warning("%s; rebuilding it", e)
        sizes = {}
    sizes = {k: v for k, v in sizes.items() if k in names and (out / k).is_file()}

    fingerprints = read_fingerprints(out)
    made_with = {"prepared": prepare is not None, **(resize.made_with() if resize is not None else {})}
    digests = {name: _records_digest(chunk) for name, chunk in zip(names, chunks)}
    outcomes: List[ShardOutcome] = []
    todo: List[Tuple[str, List[Record]]] = []
    redone = 0
    for name, chunk in zip(names, chunks):
        if (out / name).is_file() and not overwrite:
            record = fingerprints.get(name, {})
            if (name in sizes and record.get("source") == {"records_sha256": digests[name]}
                    and record.get("made_with") == made_with
                    and {k: record.get(k) for k in ("size", "mtime_ns")} == file_fingerprint(out / name)):
                outcomes.append(ShardOutcome(name, "skipped", samples=sizes[name]))
                index_kept_shard(out / name)
                continue
            redone += 1
        todo.append((str(out / name), chunk))
    write_sizes(out, sizes, refresh=[])
    if redone:
        log.warning("%d existing shard(s) are rewritten: their records, image files or settings changed", redone)
    log.info("%d record(s) in %d shard(s): %d to write, %d already done", len(kept), len(names), len(todo),
             len(names) - len(todo))

    bar = progress(total=len(todo), desc="shards", unit="shard", enabled=show_progress and bool(todo))

    def finished(res: ShardOutcome) -> None:
        outcomes.append(res)
        if res.status == "done":
            sizes[res.name] = res.samples
            write_sizes(out, sizes, refresh=[res.name],
                        extra={res.name: {"source": {"records_sha256": digests[res.name]}, "made_with": made_with}})
        bar.update(1)

    try:
        with sigterm_raises(ShardsInterrupted):
            run_jobs(_run_shard, todo, finished, processes=processes, initializer=_init_worker,
                     initargs=(prepare, resize), cleanup=lambda: clean_stale_temps(out))
    finally:
        bar.close()
    write_sizes(out, sizes, refresh=[])
    for o in outcomes:
        skips.update(o.skipped)
    by = Counter(o.status for o in outcomes)
    summary = {
        "out_dir": str(out),
        "shards": len(names),
        "shards_written": by["done"],
        "shards_skipped": by["skipped"],
        "shards_failed": by["failed"],
        "failed": [{"shard": o.name, "error": o.error} for o in outcomes if o.status == "failed"],
        "samples": sum(o.samples for o in outcomes if o.status != "failed"),
        "records": len(records) + sum((skipped or {}).values()),
        "skipped": {k: skips[k] for k in sorted(skips, key=_reason_order)},
        "skipped_total": sum(skips.values()),
        "shards_rewritten_changed": redone,
        "prepared": prepare is not None,
        "resize": resize.made_with() if resize is not None else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if skips:
        log.warning("skipped %d of %d record(s): %s", summary["skipped_total"], summary["records"], _skip_text(skips))
    return summary


def _reason_order(reason: str) -> Tuple[int, str]:
    return (SKIP_REASONS.index(reason) if reason in SKIP_REASONS else len(SKIP_REASONS), reason)


def _skip_text(skips: Counter) -> str:
    return ", ".join(f"{k} {skips[k]}" for k in sorted(skips, key=_reason_order))


__all__ = ["IMAGE_FORMATS", "MANIFEST", "PrepareOptions", "Record", "SKIP_REASONS", "ShardOutcome", "build_shard",
           "is_url", "read_image_member", "screen_records", "write_dataset"]
