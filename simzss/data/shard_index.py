"""Shard indexes: where every sample's members lie in a plain local shard, saved next to it as ``NAME.tar.idx``.

Every data worker walks its rank's whole sample sequence to agree on the shuffled order, and decodes only its own
chunks (:mod:`simzss.data.stream`), so whatever that walk costs per sample is paid once per worker. Without an
index a worker walks a plain shard by reading each member's 512-byte tar header (:mod:`simzss.data.tar_members`);
with one it reads one small file per shard and no header at all, and a worker still reads the bytes of its own
samples only. The samples are identical either way: the index holds exactly what :func:`tar_members.tar_samples
<simzss.data.tar_members.tar_samples>` gives for the shard (webdataset's grouping into samples, its skipped
metadata members), and is written only for a plain shard whose reading reported nothing to webdataset's handler.

An index is used only while its shard has the size and modification time it recorded; any other shard (no index,
a stale or unreadable one, remote and ``pipe:`` URLs) is read as before. The shard writers (``simzss shards``,
``prepare``, ``shards resize``, ``cache-features``, the demo data) index what they write, and ``simzss shards
index`` indexes existing shards, such as img2dataset's.

File format (two JSON lines, so that a header can be checked without parsing the rest)::

    {"format": "simzss-shard-index", "version": 1, "shard": {"size": BYTES, "mtime_ns": NS}, "samples": N}
    [[KEY, EXT, OFFSET, SIZE, EXT, OFFSET, SIZE, ...], ...]     one list per sample, members in tar order
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from simzss.data.pool import PoolInterrupted, run_jobs, sigterm_raises
from simzss.data.shards import atomic_write_bytes, expand_shards, file_fingerprint
from simzss.data.tar_members import MemberData, is_local_file, plain_samples, tar_samples
from simzss.logs import progress

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "simzss-shard-index"
INDEX_VERSION = 1

#: What :func:`write_index` and :func:`index_state` report for one shard.
FRESH, WRITTEN, MISSING, STALE, UNREADABLE, NOT_PLAIN, READ_ERRORS = (
    "fresh", "written", "missing", "stale", "unreadable", "not_plain", "read_errors")


class UnusableIndex(ValueError):
    """An index file that cannot be used for its shard (the one-line reason is the message); ``stale`` when it is
    intact but its shard changed since."""

    def __init__(self, message: str, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


_warned: set = set()  # index files this process has warned about (once each, not once per epoch)


def index_path(shard: str | os.PathLike[str]) -> str:
    """Where the index of the shard file ``shard`` is: next to it, ``NAME.tar.idx``."""
    return os.fspath(shard) + INDEX_SUFFIX


def _parse_header(line: bytes, path: str) -> Dict[str, Any]:
    """The header (first line) of the index of ``path``; UnusableIndex unless it is one this version reads."""
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
        raise UnusableIndex(f"{index_path(path)}: not a shard index")
    if header.get("version") != INDEX_VERSION:
        raise UnusableIndex(f"{index_path(path)}: index version {header.get('version')!r}, this simzss reads "
                            f"{INDEX_VERSION}")
    return header


def index_state(path: str) -> str:
    """:data:`FRESH` when the index of the local shard ``path`` can be used, else :data:`MISSING`, :data:`STALE`
    (the shard changed since it was indexed) or :data:`UNREADABLE`. Reads the index's first line only."""
    try:
        with open(index_path(path), "rb") as f:
            header = _parse_header(f.readline(), path)
        current = file_fingerprint(path)
    except FileNotFoundError:
        return MISSING
    except (OSError, UnusableIndex):
        return UNREADABLE
    return FRESH if header.get("shard") == current else STALE


def write_index(path: str) -> str:
    """Index the local shard ``path`` (atomically, next to it) and return :data:`WRITTEN`; :data:`NOT_PLAIN` or
    :data:`READ_ERRORS` (nothing written, an older index removed) when its samples must come from webdataset's
    reader. OSError if the index cannot be written."""
    before = file_fingerprint(path)
    problems: List[Exception] = []
    samples = plain_samples(path, handler=lambda exc: problems.append(exc) or True)
    entries: List[List[Any]] = []
    for sample in samples if samples is not None else ():
        entry: List[Any] = [sample["__key__"]]
        for ext, value in sample.items():
            if ext in ("__key__", "__url__"):
                continue
            if not isinstance(value, MemberData):
                problems.append(ValueError(f"unexpected sample field {ext!r}"))
                break
            entry += [ext, value.offset, value.size]
        entries.append(entry)
    if samples is None or problems or file_fingerprint(path) != before:
        remove_index(path)
        return NOT_PLAIN if samples is None else READ_ERRORS
    header = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": before, "samples": len(entries)}
    text = json.dumps(header) + "\n" + json.dumps(entries, ensure_ascii=False, separators=(",", ":")) + "\n"
    atomic_write_bytes(index_path(path), text.encode("utf-8"))
    return WRITTEN


def index_new_shard(path: str | os.PathLike[str]) -> None:
    """Index a shard a writer has just finished (``simzss shards``, ``prepare``, ...). An index only saves reading
    time, so a shard that cannot be indexed is logged, never an error."""
    try:
        outcome = write_index(os.fspath(path))
    except OSError as exc:
        log.warning("%s: no index written (%s); train reads its tar headers instead", path, exc)
        return
    if outcome != WRITTEN:
        log.debug("%s: not indexed (%s); train reads it with webdataset's reader", path, outcome)


def index_kept_shard(path: str | os.PathLike[str]) -> None:
    """Index a shard a writer keeps from an earlier run (resumed, or written before shards had indexes), unless its
    index is fresh already."""
    if index_state(os.fspath(path)) != FRESH:
        index_new_shard(path)


def remove_index(path: str) -> None:
    """Delete the index of ``path`` if there is one (its shard is gone or can no longer be indexed)."""
    try:
        os.unlink(index_path(path))
    except FileNotFoundError:
        pass


def load_index(url: str) -> List[Dict[str, Any]]:
    """The samples of the local shard ``url`` from its index, as :func:`tar_members.tar_samples
    <simzss.data.tar_members.tar_samples>` gives them; ``FileNotFoundError`` when there is none, ``UnusableIndex``
    (one line) when it is stale, damaged or does not fit the shard."""
    with open(index_path(url), "rb") as f:
        raw = f.read()
    first, _, rest = raw.partition(b"\n")
    header = _parse_header(first, url)
    current = file_fingerprint(url)
    if header.get("shard") != current:
        raise UnusableIndex(f"{index_path(url)}: stale (the shard changed since it was indexed)", stale=True)
    try:
        entries = json.loads(rest)
        return _samples(url, entries, current["size"], header.get("samples"))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise UnusableIndex(f"{index_path(url)}: damaged ({exc})") from None


def _samples(url: str, entries: Any, shard_size: int, count: Any) -> List[Dict[str, Any]]:
    """Rebuild the samples of an index's entries, checking every field (TypeError / ValueError if one is wrong)."""
    if not isinstance(entries, list) or len(entries) != count:
        raise ValueError(f"{count!r} samples announced, {len(entries) if isinstance(entries, list) else 'none'} "
                         "listed")
    samples = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) < 4 or len(entry) % 3 != 1 or not isinstance(entry[0], str):
            raise ValueError(f"bad sample entry {str(entry)[:80]}")
        sample: Dict[str, Any] = {"__key__": entry[0], "__url__": url}
        for i in range(1, len(entry), 3):
            ext, offset, size = entry[i : i + 3]
            if (not isinstance(ext, str) or ext in sample or type(offset) is not int or type(size) is not int
                    or offset < 0 or size < 0 or offset + size > shard_size):
                raise ValueError(f"bad member {entry[i : i + 3]} of sample {entry[0]!r}")
            sample[ext] = MemberData(url, offset, size)
        samples.append(sample)
    return samples


def _indexed(url: str, warn: bool) -> Optional[List[Dict[str, Any]]]:
    """The samples of ``url`` from its index, or None (the shard is then read from its headers)."""
    if not is_local_file(url):
        return None
    try:
        return load_index(url)
    except FileNotFoundError:
        return None
    except (OSError, UnusableIndex) as exc:
        # stale ones are counted in the start-up line (log_index_coverage); damaged ones are news, once per file
        loud = warn and not (isinstance(exc, UnusableIndex) and exc.stale) and url not in _warned
        _warned.add(url)
        log.log(logging.WARNING if loud else logging.DEBUG, "%s; reading the shard's tar headers instead "
                "(`simzss shards index` rewrites it)", exc)
        return None


def indexed_samples(shards: Iterable[Dict[str, Any]], handler: Callable[[Exception], bool],
                    warn: bool = True) -> Iterator[Dict[str, Any]]:
    """What :func:`tar_members.tar_samples <simzss.data.tar_members.tar_samples>` yields for the shards
    ``{"url": ...}``, taken from their indexes where those can be used (``warn``: log unusable ones at WARNING)."""
    with_index = ((shard, _indexed(shard["url"], warn)) for shard in shards)
    for has_index, run in itertools.groupby(with_index, key=lambda item: item[1] is not None):
        if has_index:
            for _, samples in run:
                yield from samples  # type: ignore[misc]
        else:
            yield from tar_samples((shard for shard, _ in run), handler)


def index_coverage(urls: Sequence[str]) -> Counter:
    """How many of the shards ``urls`` are in each :func:`index_state`; URLs, ``pipe:`` commands and ``file:``
    URLs count as ``not_a_path`` (they are always read with webdataset's reader)."""
    return Counter(index_state(url) if is_local_file(url) else "not_a_path" for url in urls)


def log_index_coverage(urls: Sequence[str]) -> None:
    """One line at start-up: how many local training shards lack a usable index, and the command that adds them."""
    counts = index_coverage(urls)
    local = sum(n for state, n in counts.items() if state != "not_a_path")
    fresh = counts.get(FRESH, 0)
    if local and fresh < local:
        detail = ", ".join(f"{counts[s]} {s}" for s in (MISSING, STALE, UNREADABLE) if counts.get(s))
        log.info("%d of %d local training shards have no usable index (%s): every data worker reads their tar "
                 "headers; `simzss shards index SHARDS` writes the indexes once (docs/datasets.md)",
                 local - fresh, local, detail)


@dataclass
class IndexOutcome:
    """What ``simzss shards index`` did to one shard."""

    shard: str
    status: str  # FRESH (kept), WRITTEN, NOT_PLAIN, READ_ERRORS or "failed"
    error: Optional[str] = None


def index_one(path: str, overwrite: bool) -> IndexOutcome:
    """Index one shard unless its index is already fresh (or ``overwrite``); an unwritable index is "failed"."""
    if not overwrite and index_state(path) == FRESH:
        return IndexOutcome(path, FRESH)
    try:
        return IndexOutcome(path, write_index(path))
    except OSError as exc:
        return IndexOutcome(path, "failed", f"{exc.strerror or type(exc).__name__}: {exc.filename or path}")


def index_shards(inputs: Sequence[str], *, processes: int = 1, overwrite: bool = False,
                 show_progress: bool = True) -> Dict[str, Any]:
    """Index the local shards ``inputs`` (paths, brace patterns, globs, folders of ``*.tar``); returns the job's
    summary. Shards that are not plain tar files, or whose reading reports problems, are counted and left to
    webdataset's reader (nothing is written for them)."""
    urls = expand_shards(list(inputs), local_only=True, what="shard")
    results: List[IndexOutcome] = []
    bar = progress(total=len(urls), desc="indexing shards", unit="shard", enabled=show_progress)

    def finished(outcome: IndexOutcome) -> None:
        results.append(outcome)
        bar.update(1)
        if outcome.status in (NOT_PLAIN, READ_ERRORS):
            log.warning("%s: not indexed (%s); train reads it with webdataset's reader", outcome.shard,
                        "not a plain tar file" if outcome.status == NOT_PLAIN else "its reading reports problems")
        elif outcome.status == "failed":
            log.error("%s: cannot write its index: %s", outcome.shard, outcome.error)

    try:
        with sigterm_raises(PoolInterrupted):
            run_jobs(index_one, [(url, overwrite) for url in urls], finished, processes=processes)
    finally:
        bar.close()
    by = Counter(r.status for r in results)
    failed = [r for r in results if r.status == "failed"]
    return {
        "shards": len(urls),
        "indexed": by[WRITTEN],
        "already_indexed": by[FRESH],
        "not_indexed": sorted(r.shard for r in results if r.status in (NOT_PLAIN, READ_ERRORS)),
        "shards_failed": len(failed),
        "failed": [{"shard": r.shard, "error": r.error} for r in sorted(failed, key=lambda r: r.shard)],
    }


__all__ = [
    "INDEX_SUFFIX",
    "IndexOutcome",
    "UnusableIndex",
    "index_coverage",
    "index_kept_shard",
    "index_new_shard",
    "index_path",
    "index_shards",
    "index_state",
    "indexed_samples",
    "load_index",
    "log_index_coverage",
    "remove_index",
    "write_index",
]
