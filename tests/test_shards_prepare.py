"""Shard IO (no pickle, truncation, atomic writes) and ``simzss prepare`` (bad samples, failures, resume)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from simzss.cli import prepare as prepare_cli
from simzss.data import prepare
from simzss.data.shards import (
    ShardReadError,
    clean_stale_temps,
    expand_urls,
    iter_samples,
    read_sizes,
    write_shard,
    write_sizes,
)

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg"


def _sample(key: str, caption: str | bytes | None = "a dog on the grass", image: bytes | None = JPEG, **extra: bytes) -> dict:
    s: dict = {"__key__": key, **extra}
    if caption is not None:
        s["txt"] = caption
    if image is not None:
        s["jpg"] = image
    return s


def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar written member by member (duplicates and odd names allowed), unlike write_shard."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _no_temps(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if ".tmp-" in p.name]


class _TouchOnUnpickle:
    """Unpickling this creates a file: proof that a reader unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


# ------------------------------------------------------------------------------------------------ shards


def test_expand_urls_braces_and_double_colon_lists() -> None:
    assert expand_urls("a-{0..2}.tar") == ["a-0.tar", "a-1.tar", "a-2.tar"]
    assert expand_urls("x-{00..01}.tar::y.tar") == ["x-00.tar", "x-01.tar", "y.tar"]
    assert expand_urls(["p.tar", Path("q.tar"), " r-{a,b}.tar "]) == ["p.tar", "q.tar", "r-a.tar", "r-b.tar"]
    with pytest.raises(ValueError):
        expand_urls(" :: ")


def test_write_shard_round_trip_is_deterministic(tmp_path: Path) -> None:
    samples = [_sample("k0", json={"a": 1}), _sample("dir/k1", "une légende", b"\x89PNG")]
    assert write_shard(tmp_path / "a.tar", samples) == 2
    time.sleep(0.01)
    write_shard(tmp_path / "b.tar", samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert [m.name for m in tar] == ["k0.jpg", "k0.json", "k0.txt", "dir/k1.jpg", "dir/k1.txt"]
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    got = list(iter_samples(tmp_path / "a.tar"))
    assert got == [
        {"__key__": "k0", "jpg": JPEG, "json": b'{"a": 1}', "txt": b"a dog on the grass"},
        {"__key__": "dir/k1", "jpg": b"\x89PNG", "txt": "une légende".encode()},
    ]
    assert _no_temps(tmp_path)


def _tarfile_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    """The reference: what tarfile itself writes (PAX, the metadata write_shard fixes)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fast_headers", [True, False])
def test_write_shard_is_byte_identical_to_tarfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_headers: bool) -> None:
    from simzss.data import shards

    keys = ["k", "dir/sub/k2", "légende-ü", "x" * 90, "y" * 95, "z" * 200, "0001"]
    sizes = [0, 1, 511, 512, 513, 10240, 12345]
    samples = [{"__key__": key, "jpg": bytes([i]) * size, "txt": f"caption {i} é", "json": {"i": i}}
               for i, (key, size) in enumerate(zip(keys, sizes))]
    if not fast_headers:
        monkeypatch.setattr(shards, "_HEADERS", shards._HeaderTemplate())
        monkeypatch.setattr(shards._HEADERS, "enabled", False)
    assert write_shard(tmp_path / "ours.tar", samples) == len(samples)
    members = [(f"{s['__key__']}.{ext}", shards._member_bytes(s["__key__"], ext, s[ext]))
               for s in samples for ext in sorted(k for k in s if k != "__key__")]
    _tarfile_shard(tmp_path / "ref.tar", members)
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert shards._HEADERS is not None and shards._HEADERS.enabled is fast_headers
    with tarfile.open(tmp_path / "ours.tar") as tar:  # and tarfile reads it back member for member
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members


@pytest.mark.parametrize(
    "bad, match",
    [([_sample("k"), _sample("k")], "duplicate"), ([_sample("a.b")], "invalid sample key"),
     ([_sample("k", pyd=b"x")], "refusing"), ([{"__key__": "k"}], "no members")],
)
def test_write_shard_rejects_bad_samples_and_leaves_nothing(tmp_path: Path, bad: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_shard(tmp_path / "s.tar", bad)
    assert list(tmp_path.iterdir()) == []


def test_write_shard_keeps_old_file_when_source_fails(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.tar", [_sample("old")])
    before = (tmp_path / "s.tar").read_bytes()

    def broken():
        yield _sample("new")
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "s.tar", broken())
    assert (tmp_path / "s.tar").read_bytes() == before and _no_temps(tmp_path)


def test_iter_samples_groups_by_key_and_splits_repeats(tmp_path: Path) -> None:
    _raw_tar(tmp_path / "s.tar", [
        ("a.jpg", b"1"), ("a.TXT", b"cap a"), ("a.concepts.json", b"{}"), ("noext", b"?"), (".hidden.txt", b"h"),
        ("b.txt", b"cap b"), ("b.txt", b"cap b again"), ("a.txt", b"cap a later"),
    ])
    dropped: Counter[str] = Counter()
    got = list(iter_samples(tmp_path / "s.tar", dropped=dropped))
    assert got == [
        {"__key__": "a", "jpg": b"1", "txt": b"cap a", "concepts.json": b"{}"},
        {"__key__": "b", "txt": b"cap b"},
        {"__key__": "b", "txt": b"cap b again"},
        {"__key__": "a", "txt": b"cap a later"},
    ]
    assert dropped == Counter(no_extension=1, hidden_or_meta=1)


def _truncate(src: Path, dst: Path, keep: int) -> None:
    dst.write_bytes(src.read_bytes()[:keep])


def test_truncated_or_garbage_shards_raise_after_complete_samples(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    write_shard(good, [_sample(f"k{i}", image=bytes(3000)) for i in range(4)])
    with tarfile.open(good) as tar:
        members = tar.getmembers()
    offsets = [m.offset for m in members]  # header offsets
    end_of_data = members[-1].offset_data + 512  # the last member (1 byte) padded to a block
    cases = {
        "mid_data": offsets[4] + 512 + 1000,  # inside k2.jpg's data
        "at_header": offsets[6],  # member boundary, no end-of-archive block
        "mid_header": offsets[6] + 100,
        "end_block_cut": end_of_data + 100,
    }
    for name, keep in cases.items():
        bad = tmp_path / f"{name}.tar"
        _truncate(good, bad, keep)
        seen = []
        with pytest.raises(ShardReadError) as err:
            for s in iter_samples(bad):
                seen.append(s["__key__"])
        assert err.value.path == str(bad) and err.value.samples_read == len(seen), name
        assert seen == [f"k{i}" for i in range(len(seen))] and len(seen) < 4, name
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ShardReadError):
        list(iter_samples(tmp_path / "junk.tar"))
    with pytest.raises(ShardReadError, match="missing.tar"):
        list(iter_samples(tmp_path / "missing.tar"))
    assert len(list(iter_samples(good))) == 4


def test_pickle_members_are_never_unpickled(tmp_path: Path) -> None:
    payload = pickle.dumps(_TouchOnUnpickle(tmp_path / "canary"))
    pickle.loads(payload)  # the payload works: unpickling it creates the file
    assert (tmp_path / "canary").exists()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_TouchOnUnpickle(marker))
    _raw_tar(tmp_path / "s.tar", [("k.jpg", JPEG), ("k.txt", b"a ball"), ("k.pyd", payload), ("k.pickle", payload),
                                  ("k.extra.pkl", payload), ("k2.pth", payload), ("k2.txt", b"a car"), ("k2.jpg", JPEG)])
    dropped: Counter[str] = Counter()
    got = list(iter_samples(tmp_path / "s.tar", dropped=dropped))
    assert [sorted(s) for s in got] == [["__key__", "jpg", "txt"], ["__key__", "jpg", "txt"]]
    assert dropped == Counter(unsafe_extension=4)
    assert not marker.exists()


def test_sizes_json_round_trip_and_validation(tmp_path: Path) -> None:
    assert read_sizes(tmp_path) == {}
    with pytest.raises(FileNotFoundError):
        read_sizes(tmp_path, missing_ok=False)
    write_sizes(tmp_path, {"b.tar": 2, "a.tar": 1})
    assert read_sizes(tmp_path) == {"a.tar": 1, "b.tar": 2}
    assert list(json.loads((tmp_path / "sizes.json").read_text())) == ["a.tar", "b.tar"]
    for bad in ('{"a.tar": -1}', '["a.tar"]', '{"a.tar": "3"}', "{nope"):
        (tmp_path / "sizes.json").write_text(bad)
        with pytest.raises(ValueError, match="sizes.json"):
            read_sizes(tmp_path)
    assert _no_temps(tmp_path)


def test_clean_stale_temps_keeps_live_writers(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"s.tar.tmp-{dead.pid}"
    live = tmp_path / f"s.tar.tmp-{os.getppid()}"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in flight")
    (tmp_path / "s.tar").write_bytes(b"done")
    assert clean_stale_temps(tmp_path) == [stale]
    assert live.exists() and (tmp_path / "s.tar").exists()


# ------------------------------------------------------------------------------------------------ prepare

CAPTIONS = ["two tennis rackets on the grass", "a red car parked next to a house", "a dog sleeping on the floor",
            "boats on the water under a clear sky", "an apple and a ball on a wooden table", "it is sunny"]


def _inputs(tmp_path: Path, shards: int, per_shard: int) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for s in range(shards):
        write_shard(src / f"shard-{s:06d}.tar",
                    [_sample(f"{s:04d}{i:04d}", CAPTIONS[(s + i) % len(CAPTIONS)], json=b"{}") for i in range(per_shard)])
    return src


def _check_output(out: Path, name: str, expected_keys: list[str]) -> list[dict]:
    samples = list(iter_samples(out / name))
    assert [s["__key__"] for s in samples] == expected_keys
    from simzss.concepts import Concept

    for s in samples:
        record = json.loads(s["concepts.json"])
        assert record["version"] == 1
        caption = s["txt"].decode()
        for c in map(Concept.from_json, record["concepts"]):
            assert caption[c.chunk_span[0]:c.chunk_span[1]] == c.text
            assert all(0 <= a < b <= len(caption) for a, b in c.spans)
    return samples


def test_prepare_annotates_drops_bad_samples_and_reports_failed_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _inputs(tmp_path, shards=2, per_shard=3)
    corrupt_jpeg = b"\xff\xd8garbage\x00\x01"
    write_shard(src / "shard-000002.tar", [
        _sample("ok1", "a tree in the snow", corrupt_jpeg),  # prepare does not decode: passes through
        _sample("latin1", "un caf\xe9 sur la plage".encode("latin-1")),
        _sample("empty", "  \n"),
        _sample("nocap", None),
        _sample("noimg", "a bird", None),
        _sample("ok2", "two tennis rackets", b"\x89PNG"),
    ])
    _raw_tar(src / "shard-000003.tar", [("d.jpg", JPEG), ("d.txt", b"a dog"), ("e.jpg", JPEG), ("e.txt", b"a cat"),
                                        ("d.jpg", JPEG), ("d.txt", b"the same key again")])
    whole = src / "shard-000000.tar"
    (src / "shard-000004.tar").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "out"

    rc = prepare_cli.main([str(src / "shard-{000000..000004}.tar"), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert rc == 1 and "truncated" in printed.err  # the cut input is reported, its complete samples kept
    assert (summary["shards_done"], summary["shards_skipped"], summary["shards_failed"]) == (5, 0, 0)
    (cut,) = summary["truncated"]
    assert cut["shard"].endswith("shard-000004.tar") and "truncated" in cut["error"]
    kept = cut["samples_kept"]
    assert 1 <= kept < 3
    assert summary["skipped"] == {"duplicate_key": 1, "missing_caption": 1, "non_utf8_caption": 1,
                                  "empty_caption": 1, "missing_image": 1}
    assert summary["samples"] == 3 + 3 + 2 + 2 + kept and summary["captions"] == 10 + kept
    assert 0 < summary["in_bank_share"] <= 1 and summary["concepts_per_caption"] > 0.5
    _check_output(out, "shard-000004.tar", [f"0000{i:04d}" for i in range(kept)])
    # the cut shard is a copy of shard-000000's head: its keys repeat, counted (both copies kept)
    assert summary["duplicate_keys_across_shards"] == kept
    assert summary["shards_with_duplicate_keys"] == [str(src / "shard-000004.tar")]
    assert read_sizes(out, missing_ok=False) == {"shard-000000.tar": 3, "shard-000001.tar": 3,
                                                 "shard-000002.tar": 2, "shard-000003.tar": 2, "shard-000004.tar": kept}
    passed = _check_output(out, "shard-000002.tar", ["ok1", "ok2"])
    assert passed[0]["jpg"] == corrupt_jpeg and passed[1]["jpg"] == b"\x89PNG"
    rackets = json.loads(passed[1]["concepts.json"])["concepts"]
    assert [c["concept"] for c in rackets] == ["tennis racket"]
    dup = _check_output(out, "shard-000003.tar", ["d", "e"])
    assert dup[0]["txt"] == b"a dog"
    first = _check_output(out, "shard-000000.tar", ["00000000", "00000001", "00000002"])
    assert first[0]["json"] == b"{}" and first[0]["jpg"] == JPEG
    assert _no_temps(out)

    # a rerun keeps finished shards and still reports the truncated input
    again = prepare.prepare_shards(str(src / "shard-{000000..000004}.tar"), out, progress=False)
    assert (again["shards_done"], again["shards_skipped"], again["shards_failed"]) == (0, 5, 0)
    assert again["shards_truncated"] == 1 and again["total_samples"] == 10 + kept


def test_prepare_rejects_bad_arguments(tmp_path: Path) -> None:
    src = _inputs(tmp_path, shards=1, per_shard=1)
    with pytest.raises(ValueError, match="inside the output folder"):
        prepare.prepare_shards(str(src / "shard-000000.tar"), src, progress=False)
    (tmp_path / "other").mkdir()
    write_shard(tmp_path / "other" / "shard-000000.tar", [_sample("x")])
    with pytest.raises(ValueError, match="same output"):
        prepare.prepare_shards([str(src / "shard-000000.tar"), str(tmp_path / "other" / "shard-000000.tar")],
                               tmp_path / "out", progress=False)
    assert prepare_cli.main([str(src / "shard-000000.tar"), "--out", str(tmp_path / "o"), "--processes", "0"]) == 2


def test_prepare_drops_pickle_members_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_TouchOnUnpickle(marker))
    src = tmp_path / "in"
    src.mkdir()
    _raw_tar(src / "s.tar", [("k.jpg", JPEG), ("k.pyd", payload), ("k.txt", b"a red ball"), ("k.pickle", payload)])
    summary = prepare.prepare_shards(str(src / "s.tar"), tmp_path / "out", progress=False)
    assert summary["shards_done"] == 1 and summary["dropped_members"] == {"unsafe_extension": 2}
    (sample,) = _check_output(tmp_path / "out", "s.tar", ["k"])
    assert sorted(sample) == ["__key__", "concepts.json", "jpg", "txt"]
    assert not marker.exists()


def test_prepare_reports_bank_names_that_can_never_match(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from simzss.concepts import ConceptBank

    src = tmp_path / "in"
    src.mkdir()
    _raw_tar(src / "s.tar", [("k.jpg", JPEG), ("k.txt", b"a potted plant next to a dog")])
    bank = ConceptBank.from_names(["potted plant", "dog", "chest of drawers"])
    with caplog.at_level("WARNING", logger="simzss.data.prepare"):
        summary = prepare.prepare_shards(str(src / "s.tar"), tmp_path / "out", bank=bank, progress=False)
    assert summary["unreachable_bank_names"] == ["potted plant", "chest of drawers"]
    assert "can never match" in caplog.text and "potted plant" in caplog.text


def test_prepare_standard_spacy_writes_the_same_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _inputs(tmp_path, shards=2, per_shard=6)
    pattern = str(src / "shard-{000000..000001}.tar")
    assert prepare_cli.main([pattern, "--out", str(tmp_path / "fast"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["fast_spacy"] is True
    assert prepare_cli.main([pattern, "--out", str(tmp_path / "std"), "--no-progress", "--standard-spacy"]) == 0
    assert json.loads(capsys.readouterr().out)["fast_spacy"] is False
    for name in ("shard-000000.tar", "shard-000001.tar", "sizes.json"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "std" / name).read_bytes()


def test_prepare_lowercase_parses_lower_case_but_keeps_the_caption(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--lowercase` (as the release prepared its shards): concepts of the lower-cased parse, caption untouched."""
    from simzss.concepts import ConceptExtractor

    src = tmp_path / "src"
    src.mkdir()
    caption = "Two TENNIS Rackets next to A Dog"
    _raw_tar(src / "s.tar", [("k.jpg", JPEG), ("k.txt", caption.encode())])
    assert prepare_cli.main([str(src / "s.tar"), "--out", str(tmp_path / "out"), "--no-progress", "--lowercase"]) == 0
    assert json.loads(capsys.readouterr().out)["lowercase"] is True
    with tarfile.open(tmp_path / "out" / "s.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members["k.txt"].decode() == caption
    stored = [c["concept"] for c in json.loads(members["k.concepts.json"])["concepts"]]
    assert stored == [c.concept for c in ConceptExtractor(lowercase=True)([caption])[0]] == ["tennis racket", "dog"]


def test_worker_processes_get_one_blas_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # a user's own setting wins
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with prepare.worker_environment():
            seen = pool.submit(os.getenv, "OPENBLAS_NUM_THREADS"), pool.submit(os.getenv, "MKL_NUM_THREADS")
        assert [f.result() for f in seen] == ["1", "3"]
    assert "OPENBLAS_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "3"  # restored


@pytest.mark.slow
def test_prepare_in_parallel_matches_serial_output(tmp_path: Path) -> None:
    src = _inputs(tmp_path, shards=3, per_shard=4)
    serial = prepare.prepare_shards(str(src / "shard-{000000..000002}.tar"), tmp_path / "a", progress=False)
    parallel = prepare.prepare_shards(str(src / "shard-{000000..000002}.tar"), tmp_path / "b", processes=2,
                                      progress=False)
    assert serial["shards_done"] == parallel["shards_done"] == 3 and parallel["processes"] == 2
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "sizes.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.slow
def test_killed_prepare_resumes_without_partial_or_duplicate_shards(tmp_path: Path) -> None:
    shards, per_shard = 60, 16
    src = _inputs(tmp_path, shards=shards, per_shard=per_shard)
    out = tmp_path / "out"
    pattern = str(src / f"shard-{{000000..{shards - 1:06d}}}.tar")
    cmd = [sys.executable, "-m", "simzss", "prepare", pattern, "--out", str(out), "--no-progress", "--batch-size", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and any(out.glob("*.tar"))):
            assert proc.poll() is None, "prepare ended before writing a shard"
            assert time.monotonic() < deadline, "no output shard within 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert 1 <= len(finished) < shards, "the kill must land mid-run"
    for name in finished:  # whatever carries a final name is complete
        s = int(name[len("shard-"):-len(".tar")])
        _check_output(out, name, [f"{s:04d}{i:04d}" for i in range(per_shard)])

    summary = prepare.prepare_shards(pattern, out, progress=False)
    assert summary["shards_failed"] == 0
    # a shard renamed into place just before the kill, with no fingerprint recorded yet, is redone
    assert len(finished) - 1 <= summary["shards_skipped"] <= len(finished)
    assert summary["shards_skipped"] + summary["shards_done"] == shards
    assert summary["total_samples"] == shards * per_shard
    names = [f"shard-{s:06d}.tar" for s in range(shards)]
    assert read_sizes(out, missing_ok=False) == {n: per_shard for n in names}
    # no temps; every shard indexed, the one finished before the kill included
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [f"{n}.idx" for n in names]
                                                           + ["fingerprints.json", "sizes.json"])
    for s, name in enumerate(names):
        _check_output(out, name, [f"{s:04d}{i:04d}" for i in range(per_shard)])


def test_prepare_on_a_file_that_is_not_a_tar_leaves_no_sizes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The output folder gets a sizes.json only once it holds a shard: a failed first run leaves none behind."""
    bad = tmp_path / "notatar.tar"
    bad.write_text("this is not a tar archive\n")
    rc = prepare_cli.main([str(bad), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc != 0
    assert not (tmp_path / "out" / "sizes.json").exists()
    printed = capsys.readouterr()
    assert "notatar.tar" in printed.out + printed.err  # the failed shard is reported
