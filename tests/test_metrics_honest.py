"""Honest training metrics (issue 16 item 5): the logged throughput is the wall-clock rate of the whole log window,
every row carries a unix ``time``, the data-wait fraction is measured, and ``simzss plot`` shows them with integer
step ticks (issue 19).

A loader that sleeps a known time before each batch makes the true rate known: the logged rate must agree with the
rows' own wall-clock stamps within 10%, and the wait fraction must account for the sleeps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch

from conftest import MemoryStream, tiny_cfg
from simzss.engine import trainer as trainer_mod
from simzss.engine.tracking import ThroughputWindow
from simzss.reports.curves import PANELS, draw_training_curves, plot_training_curves, read_metrics

torch.set_num_threads(1)

SLEEP = 0.06  # seconds the loader waits per batch, on average
LOG_EVERY = 4


class SlowStream(MemoryStream):
    """A loader that takes ``SLEEP`` seconds per batch on average (like a CPU-bound input pipeline), all of it
    before the first batch of each log window: the logged step itself gets its batch at once, so a rate taken
    from the logged step alone (the old ``batch / (step_time + data_time)``) is several times the true rate and
    fails the test; only a rate over the whole window passes."""

    served = 0

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if SlowStream.served % LOG_EVERY == 0:
                time.sleep(SLEEP * LOG_EVERY)
            SlowStream.served += 1
            yield batch


class Tok:
    pad_token_id = 0

    def __len__(self) -> int:
        return 64


def _rows(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_logged_rate_matches_the_wall_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_mod, "build_tokenizer", lambda cfg: Tok())
    monkeypatch.setattr(trainer_mod, "build_loader",
                        lambda cfg, tok, *, rank, world_size: SlowStream(6, cfg.batch_size, seed=cfg.seed))
    SlowStream.served = 0
    before = time.time()
    result = trainer_mod.train(tiny_cfg(tmp_path, "run_name=slow", "max_steps=16", f"log_every={LOG_EVERY}",
                                        "checkpoint_every=0"))
    after = time.time()
    rows = _rows(result)
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    assert all(before <= r["time"] <= after for r in rows)  # unix seconds, wall clock
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    batch = 8
    for prev, row in zip(rows, rows[1:]):
        wall_rate = batch * (row["step"] - prev["step"]) / (row["time"] - prev["time"])
        assert row["samples_per_s"] == pytest.approx(wall_rate, rel=0.10), (row, wall_rate)
        # the loader's sleeps are part of the window: the rate can never beat batch / SLEEP
        assert row["samples_per_s"] < batch / SLEEP
        assert row["samples_per_s_per_gpu"] == row["samples_per_s"]  # one process
        # each window waited SLEEP * LOG_EVERY for its batches: the wait fraction covers at least 90% of that
        assert SLEEP * LOG_EVERY / row["window_seconds"] * 0.9 <= row["data_wait_fraction"] <= 1.0
        assert row["data_time"] >= SLEEP * 0.9
        assert row["step_time"] == pytest.approx(row["window_seconds"] / LOG_EVERY)
    assert "gpu_mem_peak_gib" not in rows[-1]  # CPU: no GPU memory to report
    assert result["data_wait_seconds"] >= 16 * SLEEP * 0.9


def test_window_counts_everything_between_reads() -> None:
    """The window's rate is samples / wall time between closes, whatever happened in between."""
    now = [100.0]
    window = ThroughputWindow(clock=lambda: now[0])
    for _ in range(5):
        window.add(32)
        now[0] += 0.5
    row = window.close(wait_seconds=1.0, world_size=4)
    assert row["samples_per_s_per_gpu"] == pytest.approx(160 / 2.5)
    assert row["samples_per_s"] == pytest.approx(4 * 160 / 2.5)
    assert row["data_wait_fraction"] == pytest.approx(0.4) and row["data_time"] == pytest.approx(0.2)
    now[0] += 10.0  # e.g. a checkpoint: it is in the next window
    window.add(32)
    row = window.close(wait_seconds=1.5, world_size=1)
    assert row["samples_per_s"] == pytest.approx(3.2) and row["data_wait_fraction"] == pytest.approx(0.05)


def test_plot_shows_rate_wait_memory_with_integer_ticks(tmp_path: Path) -> None:
    run = tmp_path / "r3"
    run.mkdir()
    rows = [{"step": s, "loss": 3.0 - s / 3, "samples_per_s": 900.0 + s, "data_wait_fraction": 0.1 * s,
             "gpu_mem_peak_gib": 8.2, "time": 1_700_000_000 + s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = read_metrics(run)
    fig = draw_training_curves([metrics])
    titles = {ax.get_title(): ax for ax in fig.axes}
    for key in ("samples_per_s|samples_per_s_per_gpu", "data_wait_fraction", "gpu_mem_peak_gib"):
        title = dict(PANELS)[key]
        ax = titles[title]
        assert ax.lines, title  # drawn, not "not logged"
    throughput = titles[dict(PANELS)["samples_per_s|samples_per_s_per_gpu"]]
    assert throughput.lines[0].get_ydata().tolist() == [901.0, 902.0, 903.0]
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 0 <= t <= 3.09]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
    out = plot_training_curves([metrics], tmp_path / "c.png")
    from PIL import Image

    with Image.open(out) as img:
        assert img.size[0] > 1200 and img.size[1] > 500
        assert len(set(img.convert("L").getdata())) > 10  # not blank
