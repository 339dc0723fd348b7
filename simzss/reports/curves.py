"""Training curves from ``RUN/metrics.jsonl`` (the trainer's :class:`simzss.engine.tracking.MetricLogger` rows):
losses, concept accuracy, learning rate, logit scale, wall-clock throughput, the data-wait fraction, peak GPU memory
and eval mIoU against the step, runs overlaid. Steps are whole numbers, so the x axis only has integer ticks."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from simzss.reports.figures import plt, save_figure

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# (metrics.jsonl key, panel title); "eval/*/mIoU" expands to one line per evaluated dataset; "a|b": key a, or key b
# in runs that lack a (throughput: the wall-clock rate of all GPUs; runs logged before it had only a per-GPU rate)
PANELS: Tuple[Tuple[str, str], ...] = (
    ("loss", "total loss"),
    ("global_loss", "global loss (image-text InfoNCE)"),
    ("concept_loss", "concept loss"),
    ("concept_accuracy", "concept accuracy"),
    ("lr", "learning rate"),
    ("logit_scale", "logit scale"),
    ("samples_per_s|samples_per_s_per_gpu", "throughput (samples/s, wall clock)"),
    ("data_wait_fraction", "fraction of wall time waiting for data"),
    ("gpu_mem_peak_gib", "peak GPU memory (GiB)"),
    ("eval/*/mIoU", "eval mIoU"),
)


@dataclass
class RunMetrics:
    """The scalar series of one run: ``series[key] = (steps, values)``, sorted by step, last value per step."""

    label: str
    path: Path
    series: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    skipped_lines: int = 0


def read_metrics(run_dir: str | os.PathLike, label: Optional[str] = None) -> RunMetrics:
    """Parse ``RUN_DIR/metrics.jsonl`` (or a metrics file given directly). Rows logged again after a resume
    replace the earlier value of the same step; unreadable lines are counted and logged, never fatal."""
    p = Path(run_dir)
    path = p / METRICS_FILE if p.is_dir() else p
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {METRICS_FILE} (is {run_dir} a training run folder?)")
    points: Dict[str, Dict[int, float]] = {}
    skipped = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    points.setdefault(k, {})[step] = float(v)
    if skipped:
        log.warning("%s: skipped %d unreadable line(s)", path, skipped)
    series = {k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for k, d in points.items()}
    name = label or (p.name if p.is_dir() else p.parent.name)
    return RunMetrics(name, path, series, skipped)


def _panel_series(run: RunMetrics, key: str) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """(legend suffix, steps, values) of a panel key; ``eval/*/mIoU`` expands to every evaluated dataset."""
    if "|" in key:
        present = [k for k in key.split("|") if k in run.series]
        return [("", *run.series[present[0]])] if present else []
    if "*" not in key:
        return [("", *run.series[key])] if key in run.series else []
    head, tail = key.split("*")
    keys = sorted(k for k in run.series if k.startswith(head) and k.endswith(tail))
    return [(k[len(head): len(k) - len(tail)] if len(keys) > 1 else "", *run.series[k]) for k in keys]


def plot_training_curves(runs: Sequence[RunMetrics], path: str | os.PathLike, title: str = "") -> Path:
    """One PNG with a panel per metric of :data:`PANELS`, every run overlaid in its own colour."""
    return save_figure(draw_training_curves(runs, title), path)


def draw_training_curves(runs: Sequence[RunMetrics], title: str = "") -> Figure:
    """The figure of :func:`plot_training_curves` (not saved)."""
    if not runs:
        raise ValueError("no runs to plot")
    if not any(run.series for run in runs):
        raise ValueError("no metrics in " + ", ".join(str(r.path) for r in runs))
    fig, axes = plt.subplots(2, 5, figsize=(21, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last_step = max((int(steps[-1]) for run in runs for steps, _ in run.series.values() if len(steps)), default=1)
    for ax, (key, panel_title) in zip(axes.flat, PANELS):
        drawn = 0
        for ri, run in enumerate(runs):
            for suffix, steps, vals in _panel_series(run, key):
                label = run.label + (f" ({suffix})" if suffix else "")
                ax.plot(steps, vals, color=colors[ri % len(colors)], label=label, linewidth=1.4,
                        marker="o" if len(steps) <= 25 else None, markersize=3,
                        linestyle=["-", "--", ":", "-."][drawn % 4] if suffix else "-")
                drawn += 1
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_xlim(0, last_step * 1.03)  # the same step range in every panel (eval points are sparse)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a 3-step run has no step 1.5
        ax.grid(alpha=0.3)
        if key.startswith("eval/") and drawn:
            ax.set_ylim(bottom=0)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif key.startswith("eval/") or len(runs) > 1 or drawn > 1:
            ax.legend(fontsize=8)
        if key == "data_wait_fraction" and drawn:
            ax.set_ylim(0, 1.02)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return fig


__all__ = ["METRICS_FILE", "PANELS", "RunMetrics", "read_metrics", "plot_training_curves", "draw_training_curves"]
