"""The training stream's tar reading: webdataset's samples, read cheaply from plain local shards.

Every data worker reads its rank's whole sample sequence (to agree on the shuffled order) and decodes only its own
chunks, so the cost of *reading* a sample is paid once per worker: with 14 workers, 14 times per trained sample.
Through webdataset's reader (Python's ``tarfile``) that costs about 0.12 ms per sample, which at 14 workers is
about two thirds of the CPU the decoding itself takes (``benchmarks/bench_worker_scaling.py``).

A plain shard (what ``simzss shards`` / ``prepare`` and img2dataset write: regular files with ustar headers) is
therefore read here from its 512-byte headers directly (parsed about 20x faster than by ``tarfile``), and each
member's ``data`` is a :class:`MemberData`, where its bytes are: a worker reads the bytes of the samples it decodes
only (:func:`read_members`), and its shuffle buffer holds no image data. Grouping into samples is webdataset's own
``group_by_keys``, so keys, suffixes and skipped members are exactly what its reader gives.

A shard with an index (:mod:`simzss.data.shard_index`) is not even walked through its headers: the index holds what
this module's reading gives.

Anything else takes webdataset's path unchanged, bytes included: remote or ``pipe:`` URLs, and any local shard
whose headers are not all plain (a bad checksum, a GNU or pax extension header, a link or device, a truncated
file, ...). The scan that decides this reads only the headers, before any member is handed on, so a damaged shard
behaves exactly as before (its complete samples kept, the error counted by the handler).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from webdataset import tariterators

BLOCK = 512
_REGULAR = (b"0", b"\0")
_DIRECTORY = b"5"
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default


@dataclass(frozen=True)
class MemberData:
    """Where a member's bytes are in a local shard (:func:`read_members` reads them)."""

    path: str
    offset: int
    size: int


def read_members(sample: Dict[str, Any]) -> Dict[str, Any]:
    """``sample`` with every :class:`MemberData` value replaced by its bytes (OSError if one cannot be read)."""
    lazy = {k: v for k, v in sample.items() if isinstance(v, MemberData)}
    if not lazy:
        return sample
    fd = os.open(next(iter(lazy.values())).path, os.O_RDONLY)  # a sample's members all come from one shard
    try:
        data = {k: os.pread(fd, v.size, v.offset) for k, v in lazy.items()}
    finally:
        os.close(fd)
    for k, v in lazy.items():
        if len(data[k]) != v.size:
            raise OSError(f"{v.path}: cut short since its headers were read (member at byte {v.offset})")
    return {**sample, **data}


def _octal(field: bytes) -> Optional[int]:
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _checksum_ok(header: bytes) -> bool:
    field = header[148:156]
    stored = _octal(field)
    return stored is not None and stored == sum(header) - sum(field) + 8 * 0x20  # the field counts as spaces


def plain_members(path: str) -> Optional[List[Tuple[str, int, int]]]:
    """``(name, data offset, size)`` of the regular files of the local tar ``path`` in order, from its headers
    alone; None when the shard is not plain (then webdataset's reader must handle it, errors and all)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        end = os.fstat(fd).st_size
        members: List[Tuple[str, int, int]] = []
        offset = 0
        while True:
            if offset + BLOCK > end:
                return None  # no end-of-archive block: truncated (tarfile decides what that means)
            header = os.pread(fd, BLOCK, offset)
            if header == bytes(BLOCK):
                return members if members else None  # the end of the archive (an empty one: let tarfile say so)
            if not _checksum_ok(header):
                return None
            kind = header[156:157]
            size = _octal(header[124:136])
            if size is None or kind not in _REGULAR + (_DIRECTORY,):
                return None  # base-256 sizes, links, GNU / pax extension headers...
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0]  # ustar's long names; tarfile joins it whatever the magic
            if prefix:
                name = prefix + b"/" + name
            try:
                text = name.decode("utf-8")
            except UnicodeDecodeError:
                return None
            start = offset + BLOCK
            if start + size > end:
                return None  # the data is cut short
            if kind in _REGULAR:
                if not text or text.endswith("/"):
                    return None  # tarfile reads a V7 "regular" member ending in "/" as a folder
                members.append((text, start, size))
            offset = start + (size + BLOCK - 1) // BLOCK * BLOCK
    finally:
        os.close(fd)


def is_local_file(url: str) -> bool:
    """Whether ``url`` names an existing local file (not a URL or a ``pipe:`` command)."""
    return "://" not in url and not url.startswith("pipe:") and os.path.isfile(url)


def _skipped(name: str) -> bool:
    """The member names webdataset's tar reader leaves out (metadata such as ``__index__``)."""
    top_meta = "/" not in name and name.startswith(tariterators.meta_prefix) and name.endswith(tariterators.meta_suffix)
    return top_meta or _SKIP_META.match(name) is not None


def _plain_files(url: str, members: List[Tuple[str, int, int]]) -> Iterator[Dict[str, Any]]:
    """The member records of a plain shard (``plain_members``) followed by webdataset's end-of-shard marker ``{}``."""
    for name, offset, size in members:
        if not _skipped(name):
            yield {"fname": name, "data": MemberData(url, offset, size), "__url__": url}
    yield {}


def _members_of(shard: Dict[str, Any], handler: Callable[[Exception], bool]) -> Iterator[Dict[str, Any]]:
    """One shard's members followed by webdataset's end-of-shard marker ``{}``."""
    url = shard["url"]
    members = plain_members(url) if is_local_file(url) else None
    if members is None:
        yield from tariterators.tar_file_expander(tariterators.url_opener([shard], handler=handler), handler=handler)
        return
    yield from _plain_files(url, members)


def plain_samples(path: str, handler: Callable[[Exception], bool]) -> Optional[Iterator[Dict[str, Any]]]:
    """The samples of the local shard ``path`` as :func:`tar_samples` gives them (all values :class:`MemberData`),
    or None when the shard is not plain (:func:`plain_members`)."""
    members = plain_members(path) if is_local_file(path) else None
    if members is None:
        return None
    return tariterators.group_by_keys(_plain_files(path, members), handler=handler)


def tar_samples(shards: Iterable[Dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[Dict[str, Any]]:
    """The samples (``{"__key__", "__url__", EXT: ...}``) of the shards ``{"url": ...}`` in order: what
    ``webdataset.tarfile_to_samples(handler=handler)`` yields, with :class:`MemberData` in place of the bytes for
    plain local shards (:func:`read_members` reads them)."""
    files = (member for shard in shards for member in _members_of(shard, handler))
    return tariterators.group_by_keys(files, handler=handler)


__all__ = ["MemberData", "is_local_file", "plain_members", "plain_samples", "read_members", "tar_samples"]
