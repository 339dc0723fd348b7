"""Issue 18 item 2: no endless spin. ``data.image_size=0`` is a config error; a stream that skips everything, or whose
shards yield nothing, stops with a one-line error after a bounded number of skips; SIGTERM ends a process that is
reading training data with workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fault_helpers import NO_CONCEPTS, write_uneven_shards
from simzss.concepts import ConceptBank
from simzss.config import ConfigError, DataConfig, TrainConfig, load_config
from simzss.data.shards import write_shard, write_sizes
from simzss.data.stream import TrainingDataError, build_train_loader

ROOT = Path(__file__).resolve().parents[2]


def test_zero_or_negative_image_size_is_a_config_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "simzss", "train", "data.image_size=0", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.image_size" in lines[0] and "Traceback" not in proc.stderr
    for bad in ("data.image_size=-5", "data.decode=nvjpeg", "data.shuffle_buffer=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(TrainConfig, None, [bad])


def test_a_stream_that_skips_everything_stops_with_an_error(tmp_path: Path) -> None:
    from conftest import tiny_tokenizer

    samples = [{"__key__": f"k{i:03d}", "jpg": b"not a picture", "txt": "a cat", "concepts.json": NO_CONCEPTS}
               for i in range(40)]
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "bad.tar", samples)
    write_sizes(tmp_path / "shards", {"bad.tar": 40})
    cfg = DataConfig(shards=[str(tmp_path / "shards" / "bad.tar")], image_size=16, workers=2, shuffle_buffer=50)
    loader = build_train_loader(cfg, tiny_tokenizer(tmp_path / "tok"), ConceptBank.from_names(["cat"]), batch_size=8,
                                context_length=16)
    t0 = time.monotonic()
    with pytest.raises(TrainingDataError, match=r"in a row were skipped .*corrupt_image") as info:
        next(iter(loader))
    assert time.monotonic() - t0 < 60 and "\n" not in str(info.value)


def test_shards_that_yield_nothing_stop_with_a_one_line_error(tmp_path: Path) -> None:
    from conftest import tiny_tokenizer

    (tmp_path / "broken.tar").write_bytes(b"this is not a tar file" * 50)
    cfg = DataConfig(shards=[str(tmp_path / "broken.tar")], image_size=16, workers=2, num_samples=16)
    loader = build_train_loader(cfg, tiny_tokenizer(tmp_path / "tok"), ConceptBank.from_names(["cat"]), batch_size=4,
                                context_length=16)
    with pytest.raises(TrainingDataError, match="yielded no sample") as info:
        next(iter(loader))
    assert "\n" not in str(info.value) and "DataLoader worker" not in str(info.value)  # not a worker traceback


@pytest.mark.slow
def test_sigterm_ends_a_process_reading_with_workers(tmp_path: Path) -> None:
    """A process that turns SIGTERM into a stop flag (as the trainer does) while its 2 data workers run ahead ends
    promptly when its whole process group gets SIGTERM, and leaves no worker behind."""
    shards = write_uneven_shards(tmp_path / "shards", [60, 60])
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT / 'tests' / 'faults')!r}]
        from conftest import tiny_tokenizer
        from simzss.concepts import ConceptBank
        from simzss.config import ConfigError, DataConfig, TrainConfig, load_config
        from simzss.data.stream import build_train_loader
        from simzss.engine.signals import GracefulStop
        cfg = DataConfig(shards={shards!r}, image_size=16, workers=2, shuffle_buffer=1000)
        loader = build_train_loader(cfg, tiny_tokenizer({str(tmp_path / 'tok')!r}), ConceptBank.from_names(["cat"]),
                                    batch_size=4, context_length=16)
        with GracefulStop() as stop:
            while stop.requested is None:
                for batch in loader:
                    print("batch", flush=True)
                    if stop.requested:
                        break
        print("stopped", stop.requested, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "batch"
        children = _children(proc.pid)
        assert len(children) >= 2  # the data workers
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped SIGTERM" in out
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in children)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


_CYCLE_SCRIPT = """
import gc, sys
sys.path[:0] = [{tests!r}, {faults!r}]
from conftest import tiny_tokenizer
from simzss.concepts import ConceptBank
from simzss.config import DataConfig
from simzss.data.stream import build_train_loader
cfg = DataConfig(shards={shards!r}, image_size=16, workers=2, shuffle_buffer=1000)
loader = build_train_loader(cfg, tiny_tokenizer({tok!r}), ConceptBank.from_names(["cat"]), batch_size=4,
                            context_length=16)
next(iter(loader))
loader.myself = loader  # a reference cycle, as a caught exception's traceback makes one
del loader
gc.collect()  # the collector closes the worker queues before torch's clean-up can use them
{after}
print("done", flush=True)
"""


_NEXT_PASS = """
import multiprocessing
second = build_train_loader(cfg, tiny_tokenizer({tok!r}), ConceptBank.from_names(["cat"]), batch_size=4,
                            context_length=16)
next(iter(second))
print("workers alive", len(multiprocessing.active_children()), flush=True)
"""


@pytest.mark.parametrize("after", ["", _NEXT_PASS], ids=["at exit", "at the next pass"])
def test_workers_of_a_loader_lost_in_a_reference_cycle_do_not_outlive_it(tmp_path: Path, after: str) -> None:
    """The workers ignore SIGTERM (torch's fallback for workers that miss the stop message); those of a loader
    collected in a cycle must still end, or the process hangs at exit waiting for them (a CI run did)."""
    shards = write_uneven_shards(tmp_path / "shards", [40, 40])
    tok = str(tmp_path / "tok")
    script = _CYCLE_SCRIPT.format(tests=str(ROOT / "tests"), faults=str(ROOT / "tests" / "faults"), shards=shards,
                                  tok=tok, after=after.format(tok=tok))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the process did not exit: its data workers outlived the loader")
    assert proc.returncode == 0 and "done" in out, err[-2000:]
    if after:
        assert "workers alive 2" in out  # only the second loader's: the lost ones ended when it started
