"""Shard indexes (simzss/data/shard_index.py): the samples of an indexed shard are exactly those read from its tar
headers and from webdataset's reader; stale, damaged or foreign index files are never trusted; shards that are not
plain are not indexed; the writers index what they write; ``simzss shards index`` indexes existing shards."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, List

import pytest
import webdataset as wds

from simzss.data import shard_index
from simzss.data.shard_index import (
    UnusableIndex,
    index_coverage,
    index_path,
    index_state,
    indexed_samples,
    load_index,
    write_index,
)
from simzss.data.shards import write_shard
from simzss.data.tar_members import read_members, tar_samples


def _samples(n: int, start: int = 0) -> List[Dict[str, Any]]:
    return [{"__key__": f"{i:06d}", "jpg": bytes([i % 251]) * (600 + 37 * i), "txt": f"caption {i}",
             "json": {"i": i}} for i in range(start, start + n)]


def _shard(path: Path, n: int, start: int = 0) -> str:
    write_shard(path, _samples(n, start))
    return str(path)


def _webdataset(urls: List[str]) -> List[Dict[str, Any]]:
    return list(wds.DataPipeline(lambda: iter([{"url": u} for u in urls]), wds.tarfile_to_samples()))


def _read(urls: List[str], errors: List[Exception] | None = None) -> List[Dict[str, Any]]:
    handler = (lambda e: errors.append(e) or True) if errors is not None else (lambda e: False)
    return list(indexed_samples([{"url": u} for u in urls], handler))


def test_an_index_gives_the_samples_of_the_headers_and_of_webdatasets_reader(tmp_path: Path) -> None:
    a, b = _shard(tmp_path / "a.tar", 5), _shard(tmp_path / "b.tar", 4, start=5)
    odd = tmp_path / "odd.tar"  # metadata members, upper-case suffixes, a folder: still plain
    with tarfile.open(odd, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("__index__", b"m"), ("dir/k1.JPG", b"\xff" * 700), ("dir/k1.txt", b"one"),
                           ("k2.tar.gz", b"z"), ("k3.txt", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    urls = [a, str(odd), b]
    from_headers = list(tar_samples([{"url": u} for u in urls], handler=lambda e: False))
    assert [write_index(u) for u in urls] == ["written"] * 3
    assert index_coverage(urls) == {"fresh": 3}
    from_index = _read(urls)
    assert from_index == from_headers  # keys, URLs and where every member's bytes are
    assert [list(s) for s in from_index] == [list(s) for s in from_headers]  # fields in the same order
    assert [read_members(s) for s in from_index] == _webdataset(urls)
    assert [s["__key__"] for s in from_index][5:8] == ["dir/k1", "k2", "k3"] and "jpg" in from_index[5]


def test_with_an_index_no_tar_header_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simzss.data import tar_members

    url = _shard(tmp_path / "a.tar", 6)
    write_index(url)
    monkeypatch.setattr(tar_members, "plain_members", lambda path: pytest.fail(f"headers of {path} read"))
    assert [s["__key__"] for s in _read([url])] == [f"{i:06d}" for i in range(6)]


def test_a_changed_shard_makes_its_index_stale_and_is_read_from_its_headers(tmp_path: Path, caplog) -> None:
    url = _shard(tmp_path / "a.tar", 6)
    write_index(url)
    os.utime(url, ns=(0, 0))  # same bytes, other mtime (a copy without -p): not trusted either
    assert index_state(url) == "stale"
    _shard(tmp_path / "a.tar", 3, start=40)  # rewritten: other samples, other offsets
    assert index_state(url) == "stale"
    with caplog.at_level(logging.DEBUG, logger="simzss.data.shard_index"):
        samples = _read([url])
    assert [read_members(s) for s in samples] == _webdataset([url])
    assert [s["__key__"] for s in samples] == ["000040", "000041", "000042"]
    # not a warning per shard and epoch: the start-up line counts the stale indexes
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "stale (the shard changed since it was indexed)" in caplog.text
    assert "`simzss shards index` rewrites it" in caplog.text and "Traceback" not in caplog.text


def _damage(path: str, how: str) -> None:
    head, body = Path(index_path(path)).read_text().split("\n", 1)
    header, entries = json.loads(head), json.loads(body)
    if how == "truncated":
        Path(index_path(path)).write_text(head + "\n" + body[: len(body) // 2])
        return
    if how == "count":
        header["samples"] += 1
    elif how == "offset":
        entries[-1][-2] = 10 ** 9  # past the end of the shard
    elif how == "type":
        entries[0][2] = "512"
    elif how == "duplicate":
        entries[0] += entries[0][1:4]
    elif how == "version":
        header["version"] = 99
    elif how == "foreign":
        header = {"format": "something else"}
    Path(index_path(path)).write_text(json.dumps(header) + "\n" + json.dumps(entries) + "\n")


@pytest.mark.parametrize("how", ["truncated", "count", "offset", "type", "duplicate", "version", "foreign"])
def test_a_damaged_index_is_refused_in_one_line_and_the_headers_are_read(tmp_path: Path, caplog, how: str) -> None:
    url = _shard(tmp_path / "a.tar", 5)
    write_index(url)
    _damage(url, how)
    with pytest.raises(UnusableIndex) as info:
        load_index(url)
    assert index_path(url) in str(info.value) and "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="simzss.data.shard_index"):
        samples = _read([url])
        assert _read([url]) == samples  # the next epoch: no second warning
    assert [read_members(s) for s in samples] == _webdataset([url])
    assert index_path(url) in caplog.text and "Traceback" not in caplog.text and len(caplog.records) == 1
    # the start-up check reads the first line only: a damaged header is seen there, damaged entries by the workers
    expected = {"version": "unreadable", "foreign": "unreadable", "count": "fresh", "truncated": "fresh"}
    if how in expected:
        assert index_state(url) == expected[how]


def test_shards_that_are_not_plain_or_report_problems_are_not_indexed(tmp_path: Path) -> None:
    long = tmp_path / "long.tar"  # a pax header for the long name: webdataset's reader must handle it
    with tarfile.open(long, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k" * 120 + ".txt")
        tar.addfile(info, io.BytesIO(b""))
    dup = tmp_path / "dup.tar"  # the same suffix twice in one sample: webdataset's grouping reports it
    with tarfile.open(dup, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("k1.txt", "k1.TXT"):
            tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    cut = tmp_path / "cut.tar"
    good = _shard(tmp_path / "good.tar", 4)
    cut.write_bytes(Path(good).read_bytes()[:3000])
    Path(index_path(str(dup))).write_text("an older index\n")  # removed when the shard can no longer be indexed
    assert write_index(str(long)) == "not_plain" and write_index(str(cut)) == "not_plain"
    assert write_index(str(dup)) == "read_errors"
    assert not any(Path(index_path(str(p))).exists() for p in (long, cut, dup))
    for url in (str(long), str(dup), str(cut)):  # read as before, errors and all
        errors: List[Exception] = []
        ours = [read_members(s) for s in _read([url, good], errors)]
        theirs_errors: List[Exception] = []
        theirs = list(wds.DataPipeline(lambda u=url: iter([{"url": u}, {"url": good}]),
                                       wds.tarfile_to_samples(handler=lambda e: theirs_errors.append(e) or True)))
        assert ours == theirs and [type(e) for e in errors] == [type(e) for e in theirs_errors]


def test_runs_of_indexed_and_unindexed_shards_keep_their_order(tmp_path: Path) -> None:
    urls = [_shard(tmp_path / f"s{i}.tar", 3, start=10 * i) for i in range(5)]
    for i in (0, 2, 3):
        write_index(urls[i])
    samples = _read(urls)
    assert [s["__key__"] for s in samples] == [f"{10 * i + j:06d}" for i in range(5) for j in range(3)]
    assert [read_members(s) for s in samples] == _webdataset(urls)


def test_the_shard_writers_index_what_they_write(tmp_path: Path) -> None:
    from simzss.data.convert.resize import ResizeOptions, resize_shards
    from simzss.data.synthetic import generate_toy_world

    generate_toy_world(tmp_path / "world", num_train=24, num_val=2, image_size=64, shard_size=10)
    train = sorted(str(p) for p in (tmp_path / "world" / "train").glob("*.tar"))
    assert train and index_coverage(train) == {"fresh": len(train)}
    resize_shards(train, tmp_path / "small", ResizeOptions(short_side=32), processes=1, show_progress=False)
    small = sorted(str(p) for p in (tmp_path / "small").glob("*.tar"))
    assert index_coverage(small) == {"fresh": len(small)}
    assert _read(small) == list(tar_samples([{"url": u} for u in small], handler=lambda e: False))
    os.remove(index_path(small[0]))  # a shard kept from an earlier run (or an older version) without an index
    summary = resize_shards(train, tmp_path / "small", ResizeOptions(short_side=32), processes=1, show_progress=False)
    assert summary["shards_skipped"] == len(small) and index_coverage(small) == {"fresh": len(small)}


def test_simzss_shards_index_indexes_existing_shards(tmp_path: Path, capsys) -> None:
    from simzss.cli.shards import main

    (tmp_path / "d").mkdir()
    urls = [_shard(tmp_path / "d" / f"{i:05d}.tar", 4, start=4 * i) for i in range(3)]
    with tarfile.open(tmp_path / "d" / "00003.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("k" * 120 + ".txt"), io.BytesIO(b""))
    assert main(["index", str(tmp_path / "d"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["indexed"] == 3 and summary["not_indexed"] == [str(tmp_path / "d" / "00003.tar")]
    assert index_coverage(urls) == {"fresh": 3}
    assert main(["index", str(tmp_path / "d" / "0000{0..2}.tar"), "--processes", "2", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["already_indexed"] == 3
    os.mkdir(index_path(urls[1]) + ".blocker")
    os.remove(index_path(urls[1]))
    os.rename(index_path(urls[1]) + ".blocker", index_path(urls[1]))  # a folder where the index goes: unwritable
    assert main(["index", urls[1], "--overwrite", "--no-progress"]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["shards_failed"] == 1 and "1 shard(s) failed" in out.err and "Traceback" not in out.err
    assert main(["index", str(tmp_path / "missing.tar")]) == 2
    assert "not found: " in capsys.readouterr().err


def test_training_says_once_how_many_shards_lack_an_index(tmp_path: Path, caplog) -> None:
    urls = [_shard(tmp_path / f"{i}.tar", 2) for i in range(4)]
    write_index(urls[0])
    write_index(urls[1])
    os.utime(urls[1], ns=(0, 0))
    with caplog.at_level(logging.INFO, logger="simzss.data.shard_index"):
        shard_index.log_index_coverage(urls + ["pipe:cat x.tar"])
    assert "3 of 4 local training shards have no usable index (2 missing, 1 stale)" in caplog.text
    assert "simzss shards index" in caplog.text
