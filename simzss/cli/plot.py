"""``simzss plot``: training curves of one or more runs from their ``metrics.jsonl``, overlaid in one picture.

Example::

    simzss plot demo/runs/demo_simzss demo/runs/demo_lit --labels SimZSS LiT --out curves.png

Panels: total, global and concept loss, concept accuracy, learning rate, logit scale, throughput and eval mIoU
against the step (:mod:`simzss.reports.curves`).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from simzss.helpformat import HelpFormatter
from simzss.reports.curves import plot_training_curves, read_metrics
from simzss.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simzss plot", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folders (holding metrics.jsonl)")
    p.add_argument("--out", default="training_curves.png", help="PNG to write")
    p.add_argument("--labels", nargs="+", default=None, help="legend names, one per run (default: folder names)")
    p.add_argument("--title", default="", help="title above the panels")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.labels is not None and len(args.labels) != len(args.runs):
            raise ValueError(f"--labels: {len(args.labels)} names for {len(args.runs)} runs")
        labels = args.labels or [None] * len(args.runs)
        runs = [read_metrics(r, label) for r, label in zip(args.runs, labels)]
        out = plot_training_curves(runs, args.out, args.title)
    except (OSError, ValueError) as e:
        print(f"simzss plot: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


__all__ = ["build_parser", "main"]
