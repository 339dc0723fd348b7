"""The training stream's tar reader (simzss/data/tar_members.py) gives exactly what webdataset's gives.

Plain local shards are read from their headers (the fast path); everything else falls back to webdataset. Each
case compares the samples (keys, URLs, every member's bytes) and the errors handed to the handler with
``webdataset.tarfile_to_samples`` on the same shards, for healthy, unusual and damaged tars alike.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import webdataset as wds

from simzss.data.shards import write_shard
from simzss.data.tar_members import MemberData, plain_members, read_members, tar_samples


def _samples(n: int, start: int = 0, size: int = 700) -> List[Dict[str, Any]]:
    return [{"__key__": f"{i:06d}", "jpg": bytes([i % 251]) * (size + i), "txt": f"caption {i}",
             "json": {"i": i}} for i in range(start, start + n)]


def _raw_tar(path: Path, members: List[Tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT,
             extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), time.time()
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tar)
    return path


def _read(reader: Callable[..., Any], urls: List[str]) -> Tuple[List[Dict[str, Any]], List[str]]:
    errors: List[str] = []

    def handler(exn: Exception) -> bool:
        errors.append(type(exn).__name__)
        return True

    shards = [{"url": u} for u in urls]
    if reader is tar_samples:  # the bytes read as the owning worker reads them
        out = [read_members(sample) for sample in tar_samples(shards, handler=handler)]
    else:
        out = list(wds.DataPipeline(lambda: iter(shards), wds.tarfile_to_samples(handler=handler)))
    return out, errors


def _same_as_webdataset(urls: List[str]) -> List[Dict[str, Any]]:
    ours, our_errors = _read(tar_samples, urls)
    theirs, their_errors = _read(None, urls)
    assert ours == theirs
    assert our_errors == their_errors
    return ours


def test_plain_shards_take_the_fast_path_and_read_the_same(tmp_path: Path) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(a, _samples(5))
    write_shard(b, _samples(3, start=5, size=1024))  # data sizes on and off the 512-byte blocks
    assert sorted(name for name, _, _ in plain_members(str(a)))[:3] == ["000000.jpg", "000000.json", "000000.txt"]
    samples = _same_as_webdataset([str(a), str(b)])
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(8)]
    assert samples[6]["jpg"] == bytes([6]) * 1030 and samples[0]["__url__"] == str(a)


def test_metadata_folders_and_odd_names_are_handled_as_webdataset_does(tmp_path: Path) -> None:
    path = _raw_tar(tmp_path / "odd.tar", [
        ("__index__", b"meta"), ("sub/__meta__/x.txt", b"skip"), ("dir/k1.JPG", b"\xff" * 600),
        ("dir/k1.txt", b"one"), ("k2.tar.gz", b"z"), ("k3.txt", b""), ("k3.cls", b"3")],
        extra=lambda tar: tar.addfile(_dir("folder")))
    assert plain_members(str(path)) is not None  # still plain: a folder member is only skipped
    samples = _same_as_webdataset([str(path)])
    # webdataset's rules: top-level __NAME__ members are metadata; a key is the name up to the first dot of its
    # file name, suffixes lower-cased
    assert [s["__key__"] for s in samples] == ["sub/__meta__/x", "dir/k1", "k2", "k3"] and "jpg" in samples[1]


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_fall_back_to_webdataset(tmp_path: Path, fmt: int) -> None:
    long_key = "k" * 120
    path = _raw_tar(tmp_path / "long.tar", [(f"{long_key}.txt", b"long"), ("short.txt", b"s")], fmt=fmt)
    assert plain_members(str(path)) is None
    samples = _same_as_webdataset([str(path)])
    assert [s["__key__"] for s in samples] == [long_key, "short"]


def test_links_fall_back_to_webdataset(tmp_path: Path) -> None:
    def link(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("k9.txt")
        info.type, info.linkname = tarfile.SYMTYPE, "k1.txt"
        tar.addfile(info)

    path = _raw_tar(tmp_path / "link.tar", [("k1.txt", b"one")], extra=link)
    assert plain_members(str(path)) is None
    _same_as_webdataset([str(path)])


def test_damaged_shards_fall_back_and_fail_as_before(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    write_shard(good, _samples(6))
    data = good.read_bytes()
    members = plain_members(str(good))
    cut_in_data = tmp_path / "cut_data.tar"
    cut_in_data.write_bytes(data[: members[7][1] + 100])  # inside the 3rd sample's image
    cut_at_header = tmp_path / "cut_header.tar"
    cut_at_header.write_bytes(data[: members[9][1] - 512 + 200])  # inside the 4th sample's first header
    flipped = bytearray(data)
    flipped[members[4][1] - 512 + 10] ^= 0xFF  # a name byte of a header: its checksum no longer matches
    bad_header = tmp_path / "bad_header.tar"
    bad_header.write_bytes(bytes(flipped))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    for damaged in (cut_in_data, cut_at_header, bad_header, empty):
        assert plain_members(str(damaged)) is None, damaged.name
        _same_as_webdataset([str(damaged), str(good)])  # the next shard is read in full either way
    _same_as_webdataset([str(tmp_path / "missing.tar"), str(good)])


def test_a_file_that_vanishes_after_its_headers_were_read_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    write_shard(path, _samples(2))
    errors: List[Exception] = []
    samples = list(tar_samples([{"url": str(path)}], handler=lambda e: errors.append(e) or True))
    os.remove(path)
    assert len(samples) == 2 and errors == []  # the headers were read; the bytes are read by the owning worker
    with pytest.raises(FileNotFoundError) as info:  # which the stream counts as a read_error skip (test_stream)
        read_members(samples[0])
    assert str(path) in str(info.value)


def test_plain_members_hold_where_the_bytes_are_not_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    write_shard(path, _samples(4, size=900))
    lazy = list(tar_samples([{"url": str(path)}], handler=lambda e: False))
    assert all(isinstance(s["jpg"], MemberData) and s["jpg"].size >= 900 for s in lazy)
    assert [read_members(s) for s in lazy] == _read(None, [str(path)])[0]
    eager = read_members(lazy[0])
    assert read_members(eager) is eager  # nothing left to read


def test_ustar_prefixed_names_and_v7_headers_read_as_tarfile_reads_them(tmp_path: Path) -> None:
    deep = "/".join(["folder"] * 20) + "/k1"  # 146 characters: ustar splits it into prefix + name
    ustar = _raw_tar(tmp_path / "ustar.tar", [(f"{deep}.txt", b"deep"), ("k2.txt", b"two")])
    assert plain_members(str(ustar)) is not None  # no extension header needed: still the fast path
    assert ustar.read_bytes()[345:352] == b"folder/"  # the prefix field is in use
    assert [s["__key__"] for s in _same_as_webdataset([str(ustar)])] == [deep, "k2"]
    v7 = _raw_tar(tmp_path / "v7.tar", [("k1.txt", b"one"), ("k1.cls", b"1")], fmt=tarfile.USTAR_FORMAT)
    data = bytearray(v7.read_bytes())
    data[257:265] = bytes(8)  # no magic: a V7 header; fix its checksum so that tarfile still reads it
    data[148:156] = b" " * 8
    data[148:156] = f"{sum(data[:512]):06o}\0 ".encode()
    v7.write_bytes(bytes(data))
    assert plain_members(str(v7)) is not None
    _same_as_webdataset([str(v7)])
