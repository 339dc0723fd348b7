"""The training stream's tar reading: webdataset's samples, with a fast path for plain local shards.

Every data worker reads its rank's whole sample sequence (to agree on the shuffled order) and decodes only its own
chunks, so the cost of *reading* a sample is paid once per worker: with 14 workers, 14 times per trained sample.
Through webdataset's reader (Python's ``tarfile``) that costs about 0.12 ms per sample, which at 14 workers is
about two thirds of the CPU the decoding itself takes (``benchmarks/bench_worker_scaling.py``). A plain shard (what
``simzss shards`` / ``prepare`` and img2dataset write: regular files with ustar headers) is therefore read here
from its 512-byte headers directly (parsed about 20x faster than by ``tarfile``), giving webdataset's
``group_by_keys`` exactly the ``{"fname", "data", "__url__"}`` members that its own tar reader would. With ``lazy=True`` a member's ``data`` is a :class:`MemberData` (where its bytes are) instead of
the bytes: a worker then reads the bytes of the samples it decodes only (:func:`read_members`), not those of the
other workers' samples, and its shuffle buffer holds no image data.

Anything else takes webdataset's path unchanged: remote or ``pipe:`` URLs, and any local shard whose headers are
not all plain (a bad checksum, a GNU or pax extension header, a link or device, a truncated file, ...). The scan
that decides this reads only the headers, before any member is handed on, so a damaged shard behaves exactly as
before (its complete samples kept, the error counted by the handler).
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
    """Where a member's bytes are in a local shard; :meth:`read` reads them."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        """The member's bytes; OSError when the shard is gone or was cut short since its headers were read."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, self.size, self.offset)
        finally:
            os.close(fd)
        if len(data) != self.size:
            raise OSError(f"{self.path}: cut short since its headers were read (member at byte {self.offset})")
        return data


def read_members(sample: Dict[str, Any]) -> Dict[str, Any]:
    """``sample`` with every :class:`MemberData` value replaced by its bytes (OSError if one cannot be read)."""
    if not any(isinstance(v, MemberData) for v in sample.values()):
        return sample
    return {k: v.read() if isinstance(v, MemberData) else v for k, v in sample.items()}


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


def _is_local_file(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and os.path.isfile(url)


def _skipped(name: str) -> bool:
    """The member names webdataset's tar reader leaves out (metadata such as ``__index__``)."""
    top_meta = "/" not in name and name.startswith(tariterators.meta_prefix) and name.endswith(tariterators.meta_suffix)
    return top_meta or _SKIP_META.match(name) is not None


def _members_of(shard: Dict[str, Any], handler: Callable[[Exception], bool], lazy: bool) -> Iterator[Dict[str, Any]]:
    """One shard's members followed by webdataset's end-of-shard marker ``{}``."""
    url = shard["url"]
    members = plain_members(url) if _is_local_file(url) else None
    if members is None:
        yield from tariterators.tar_file_expander(tariterators.url_opener([shard], handler=handler), handler=handler)
        return
    if lazy:
        for name, offset, size in members:
            if not _skipped(name):
                yield {"fname": name, "data": MemberData(url, offset, size), "__url__": url}
        yield {}
        return
    try:
        fd = os.open(url, os.O_RDONLY)
        try:
            for name, offset, size in members:
                if not _skipped(name):
                    yield {"fname": name, "data": os.pread(fd, size, offset), "__url__": url}
        finally:
            os.close(fd)
    except OSError as exn:  # the file went away or became unreadable since its headers were read
        exn.args = exn.args + (url,)
        if not handler(exn):
            return
    yield {}


def tar_samples(shards: Iterable[Dict[str, Any]], handler: Callable[[Exception], bool], *,
                lazy: bool = False) -> Iterator[Dict[str, Any]]:
    """The samples (``{"__key__", "__url__", EXT: bytes, ...}``) of the shards ``{"url": ...}`` in order: what
    ``webdataset.tarfile_to_samples(handler=handler)`` yields, read faster from plain local shards. With ``lazy``
    the members of plain local shards are :class:`MemberData` (see :func:`read_members`)."""
    files = (member for shard in shards for member in _members_of(shard, handler, lazy))
    return tariterators.group_by_keys(files, handler=handler)


__all__ = ["MemberData", "plain_members", "read_members", "tar_samples"]
