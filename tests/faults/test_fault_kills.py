"""Kills leave nothing behind: prepare's pool workers die with their driver, SIGTERM stops the pool cleanly,
and a killed export's hidden temp folder is removed by the next export."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from fault_helpers import write_uneven_shards


def _children(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != b"Z":
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _start_prepare(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    shards = write_uneven_shards(tmp_path / "in", [40] * 24, concepts=False)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simzss", "prepare", *shards, "--out", str(out), "--processes", "2", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 2:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "prepare did not start its workers"
        time.sleep(0.1)
    return proc, out


def _start_shards(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`simzss shards table ... --processes 2 --prepare` over 960 rows of a few small JPEGs."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 24), (60 * i, 100, 200)).save(images / f"{i}.jpg")
    rows = ["filepath\ttitle"] + [f"images/{i % 4}.jpg\ta photo of dog number {i} on the grass" for i in range(960)]
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simzss", "shards", "table", str(tmp_path / "pairs.tsv"), "--out", str(out),
         "--samples-per-shard", "40", "--processes", "2", "--prepare", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 2:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "shards did not start its workers"
        time.sleep(0.1)
    return proc, out


STARTERS = {"prepare": _start_prepare, "shards": _start_shards}


def _wait_gone(pids: List[int], seconds: float) -> List[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("command", sorted(STARTERS))
def test_sigkill_of_a_pool_driver_takes_its_workers_along(tmp_path: Path, command: str) -> None:
    proc, _ = STARTERS[command](tmp_path)
    time.sleep(1.0)
    workers = _children(proc.pid)
    proc.kill()
    proc.wait()
    left = _wait_gone(workers, 20)
    for pid in left:  # do not leave them running if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"pool workers still running after the driver was killed: {left}"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("command", sorted(STARTERS))
def test_sigterm_stops_a_pool_cleanly(tmp_path: Path, command: str) -> None:
    proc, out = STARTERS[command](tmp_path)
    time.sleep(1.0)  # workers loading spaCy (seconds) or already annotating
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert rc == 128 + signal.SIGTERM, err
    assert "rerun the same command" in err and "Traceback" not in err
    assert not _wait_gone(workers, 5)
    assert not out.exists() or not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # no half-written shard


def _export_then_die(out: str, tok_dir: str) -> None:
    """Child process: start an export and die (os._exit, like SIGKILL: no cleanup) half-way."""
    from conftest import tiny_model_config, tiny_tokenizer
    from simzss.io.export import save_pretrained
    from simzss.models.simzss import SimZSS

    tok = tiny_tokenizer(Path(tok_dir))
    model = SimZSS.from_config(tiny_model_config(tok_dir), tok)
    model.tokenizer.save_pretrained = lambda *a, **k: os._exit(9)  # type: ignore[method-assign]
    save_pretrained(model, out)


def test_killed_export_leaves_temp_folder_that_next_export_removes(tmp_path: Path) -> None:
    from conftest import tiny_model_config, tiny_tokenizer
    from simzss.io.export import save_pretrained
    from simzss.models.simzss import SimZSS

    out = tmp_path / "exports" / "model"
    tok_dir = tmp_path / "tok"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_export_then_die, args=(str(out), str(tok_dir)))
    child.start()
    child.join(120)
    assert child.exitcode == 9
    stale = [p for p in out.parent.iterdir() if p.name.startswith(".model.tmp-")]
    assert len(stale) == 1 and str(child.pid) in stale[0].name and not out.exists()
    tok = tiny_tokenizer(tok_dir)
    save_pretrained(SimZSS.from_config(tiny_model_config(str(tok_dir)), tok), out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # the stale temp folder is gone
    # A running exporter's temp folder (our own pid, alive) is never touched.
    mine = out.parent / f".model.tmp-{os.getppid()}-x"
    mine.mkdir()
    save_pretrained(SimZSS.from_config(tiny_model_config(str(tok_dir)), tok), out, overwrite=True)
    assert mine.is_dir()
