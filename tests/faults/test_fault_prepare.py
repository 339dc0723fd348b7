"""`simzss prepare` under faults: a truncated tar keeps its complete samples, keys repeated across shards are
counted, missing inputs and unwritable outputs end in one line, and spaCy is loaded once per process."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fault_helpers import jpeg_bytes
from simzss.cli import prepare as prepare_cli
from simzss.cli import tokenizer as tokenizer_cli
from simzss.concepts import ConceptBank
from simzss.data import prepare
from simzss.data.shards import iter_samples, read_fingerprints, read_sizes, write_shard

CAPTIONS = ["a dog on the grass", "a red car next to a house", "two boats on the water", "an apple on a table"]


def _shard(path: Path, keys: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = jpeg_bytes()
    write_shard(path, [{"__key__": k, "jpg": img, "txt": CAPTIONS[i % len(CAPTIONS)], "json": {"i": i}}
                       for i, k in enumerate(keys)])
    return path


def _cut_mid_member(shard: Path, sample: int, members_per_sample: int = 3) -> None:
    """Cut ``shard`` in the middle of the data of the first member of sample ``sample`` (0-based)."""
    import tarfile

    with tarfile.open(shard) as tar:
        member = tar.getmembers()[sample * members_per_sample]
    data = shard.read_bytes()
    shard.write_bytes(data[: member.offset_data + member.size // 2])


def test_truncated_tar_keeps_and_counts_the_complete_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18 item 11: 10 samples, cut inside the 10th: the 9 before the cut are written and counted, the shard is
    reported as truncated, and the command exits 1 (the input is damaged) after writing everything it could."""
    src = _shard(tmp_path / "in" / "s.tar", [f"k{i:02d}" for i in range(10)])
    _cut_mid_member(src, 9)
    out = tmp_path / "out"
    rc = prepare_cli.main([str(src), "--out", str(out), "--no-progress", "--concept-bank", str(_bank(tmp_path))])
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert rc == 1
    assert printed.err.count("\n") == 1 and "truncated" in printed.err and "complete samples were kept" in printed.err
    assert summary["shards_done"] == 1 and summary["shards_failed"] == 0 and summary["shards_truncated"] == 1
    assert summary["truncated"][0]["samples_kept"] == 9 and summary["samples"] == 9
    assert [s["__key__"] for s in iter_samples(out / "s.tar")] == [f"k{i:02d}" for i in range(9)]
    assert read_sizes(out) == {"s.tar": 9}  # train can use the 9
    assert "truncated" in read_fingerprints(out)["s.tar"]
    # a rerun keeps the output (its input did not change) and still says that the input is truncated
    assert prepare_cli.main([str(src), "--out", str(out), "--no-progress"]) == 1
    again = json.loads(capsys.readouterr().out)
    assert again["shards_skipped"] == 1 and again["shards_truncated"] == 1 and again["total_samples"] == 9


def test_a_tar_with_no_complete_sample_fails_without_output(tmp_path: Path) -> None:
    src = _shard(tmp_path / "in" / "s.tar", ["only"])
    _cut_mid_member(src, 0)
    summary = prepare.prepare_shards(str(src), tmp_path / "out", progress=False, bank=ConceptBank.from_names(["dog"]))
    assert summary["shards_failed"] == 1 and summary["shards_truncated"] == 0
    assert not (tmp_path / "out" / "s.tar").exists() and read_sizes(tmp_path / "out") == {}


def test_duplicate_keys_across_shards_are_counted_and_both_kept(tmp_path: Path) -> None:
    """Issue 18 item 12 (decided): a key that an earlier shard already holds is counted and reported; both copies
    are kept (a key is a name: two datasets often number their samples alike), within a shard the second is dropped."""
    a = _shard(tmp_path / "in" / "a.tar", ["x0", "x1", "x2"])
    b = _shard(tmp_path / "in" / "b.tar", ["x1", "y0", "x2", "y1"])
    c = _shard(tmp_path / "in" / "c.tar", ["z0"])
    summary = prepare.prepare_shards([str(a), str(b), str(c)], tmp_path / "out", progress=False,
                                     bank=ConceptBank.from_names(["dog"]))
    assert summary["duplicate_keys_across_shards"] == 2
    assert summary["shards_with_duplicate_keys"] == [str(b)]
    assert summary["samples"] == 8 and read_sizes(tmp_path / "out") == {"a.tar": 3, "b.tar": 4, "c.tar": 1}
    # a rerun that keeps every output (or redoes only some) reports the same count, from the kept shards' keys
    (tmp_path / "out" / "a.tar").unlink()
    again = prepare.prepare_shards([str(a), str(b), str(c)], tmp_path / "out", progress=False,
                                   bank=ConceptBank.from_names(["dog"]))
    assert (again["shards_done"], again["shards_skipped"]) == (1, 2)
    assert again["duplicate_keys_across_shards"] == 2 and again["shards_with_duplicate_keys"] == [str(b)]


def test_missing_inputs_are_one_line_exit_2_without_spacy_or_output(tmp_path: Path) -> None:
    """Issue 19 defect 4: checked up front, before spaCy loads and before --out is made."""
    code = ("import sys; from simzss.cli import main; rc = main(sys.argv[1:]); "
            "print('SPACY_LOADED' if 'spacy' in sys.modules else 'NO_SPACY'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "prepare", "/no/such/*.tar", "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["simzss prepare: 1 input shard(s) not found: /no/such/*.tar"]
    assert proc.stdout.strip() == "NO_SPACY"
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", ["prepare", "tokenizer"])
def test_unwritable_out_is_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    """Issue 18 item 6: a read-only --out (here under /proc, read-only even for root) ends in one line, exit 1."""
    src = _shard(tmp_path / "in" / "s.tar", ["k0", "k1"])
    out = "/proc/simzss-test-out/sub"
    if command == "prepare":
        rc = prepare_cli.main([str(src), "--out", out, "--no-progress"])
    else:
        rc = tokenizer_cli.main(["--shards", str(src), "--out", out, "--vocab-size", "300"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith(f"simzss {command}: cannot write") and "--out" in err
    assert "Traceback" not in err


def test_one_count_of_unreachable_bank_names_and_spacy_loaded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Issue 19 defect 7 and the ~20 s after the work: the bank is not reported by form at the start, the parsed
    count is reported once at the end, and no second spaCy pipeline is built for it."""
    built = []
    real = prepare.ConceptExtractor

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "ConceptExtractor", counting)
    src = _shard(tmp_path / "in" / "s.tar", ["k0", "k1"])
    with caplog.at_level("INFO"):
        summary = prepare.prepare_shards(str(src), tmp_path / "out", progress=False)
    assert len(built) == 1  # the worker's pipeline, reused for the bank names
    lines = [r.getMessage() for r in caplog.records if "never match" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{len(summary['unreachable_bank_names'])} of ")
    assert summary["unreachable_bank_names"]  # the default bank has multi-word names no concept equals

    caplog.clear()
    with caplog.at_level("INFO"):  # nothing to do: no spaCy at all, no count
        again = prepare.prepare_shards(str(src), tmp_path / "out", progress=False)
    assert again["shards_skipped"] == 1 and again["unreachable_bank_names"] is None and len(built) == 1
    assert not [r for r in caplog.records if "never match" in r.getMessage()]


@pytest.mark.slow
def test_parallel_prepare_never_loads_spacy_in_the_driver(tmp_path: Path) -> None:
    shards = [str(_shard(tmp_path / "in" / f"s{i}.tar", [f"s{i}k{j}" for j in range(3)])) for i in range(2)]
    code = ("import sys, json; from simzss.data.prepare import prepare_shards; "
            f"s = prepare_shards({shards!r}, {str(tmp_path / 'out')!r}, processes=2, progress=False); "
            "print(json.dumps([s['shards_done'], bool(s['unreachable_bank_names']), 'spacy' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [2, True, False]


def _bank(tmp_path: Path) -> Path:
    path = tmp_path / "bank.txt"
    path.write_text("dog\ncar\nboat\napple\n")
    return path


def _disk_fills_after(monkeypatch: pytest.MonkeyPatch, limit: int) -> list[str]:
    """Shard writes (``write_shard`` opens its temporary file with ``open(tmp, "wb")``) fail like a full disk once
    ``limit`` bytes were written in all; returns the paths opened for writing."""
    from simzss.data import shards

    opened: list[str] = []
    written = [0]
    real_open = open

    class FillingFile:
        def __init__(self, f) -> None:  # noqa: ANN001
            self.f = f

        def write(self, data: bytes) -> int:
            if written[0] + len(data) > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += len(data)
            return self.f.write(data)

        def __enter__(self) -> "FillingFile":
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = real_open(path, mode, *args, **kwargs)
        if mode == "wb":
            opened.append(str(path))
            return FillingFile(f)
        return f

    monkeypatch.setattr(shards, "open", fake_open, raising=False)
    return opened


@pytest.mark.parametrize("command", ["prepare", "shards resize"])
def test_full_disk_stops_the_run_in_one_line_without_temporary_files(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18 item 6 for the data commands: the first shard that hits the full disk ends the run (every other one
    would fail alike) with one line naming it, exit 1, no traceback, no temporary file and no entry in sizes.json."""
    from simzss.cli import main as simzss

    inputs = [str(_shard(tmp_path / "in" / f"s{i}.tar", [f"s{i}k{j}" for j in range(3)])) for i in range(3)]
    out = tmp_path / "out"
    opened = _disk_fills_after(monkeypatch, 4096)
    argv = ([*inputs, "--out", str(out), "--no-progress", "--concept-bank", str(_bank(tmp_path))]
            if command == "prepare" else [*inputs, "--out", str(out), "--resize-short", "8", "--no-progress"])
    rc = simzss([*command.split(), *argv])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("simzss")]
    assert len(lines) == 1 and f"{out / 's0.tar'}: the disk is full" in lines[0], err
    assert len(opened) == 1  # stopped at the first shard
    assert sorted(p.name for p in out.iterdir()) == [] and read_sizes(out) == {}


def test_disk_full_error_crosses_process_pools_whole() -> None:
    """Workers of parallel runs raise it; the driver must get the same one-line message back."""
    import pickle

    from simzss.data.shards import DiskFullError

    e = pickle.loads(pickle.dumps(DiskFullError("/data/out/s.tar", "a shard")))
    assert isinstance(e, DiskFullError) and e.errno == errno.ENOSPC and e.filename == "/data/out/s.tar"
    assert str(e).startswith("/data/out/s.tar: the disk is full") and "a shard" in str(e)


@pytest.mark.parametrize("command", ["prepare", "shards resize"])
def test_out_that_is_a_file_is_a_usage_error(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simzss.cli import main as simzss

    src = _shard(tmp_path / "in" / "s.tar", ["k0"])
    (tmp_path / "out").write_text("notes")
    extra = ["--resize-short", "8"] if command == "shards resize" else []
    assert simzss([*command.split(), str(src), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err == f"simzss {command.split()[0]}: the output folder {tmp_path / 'out'} is a file; give a folder as --out\n"
    assert (tmp_path / "out").read_text() == "notes"
