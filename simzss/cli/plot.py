"""``simzss plot``: training curves of one or more runs from their ``metrics.jsonl``, overlaid in one picture.

Example::

    simzss plot demo/runs/demo_simzss demo/runs/demo_lit --labels SimZSS LiT --out curves.png

Panels (:data:`simzss.reports.curves.PANELS`): total, global and concept loss, concept accuracy, learning rate,
logit scale, wall-clock throughput, the fraction of time spent waiting for data, peak GPU memory and eval mIoU,
against the step.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from simzss.cli.options import EXIT_FAILED, EXIT_USAGE, command_parser, fail, os_error_line, unwritable


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``simzss plot``."""
    p = command_parser(
        "plot",
        "Training curves of one or more runs from their metrics.jsonl, overlaid in one picture (losses, concept "
        "accuracy, learning rate, logit scale, throughput, data wait, peak GPU memory, eval mIoU against the step).",
        ["simzss plot demo/runs/demo_simzss demo/runs/demo_lit --labels SimZSS LiT --out curves.png"],
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folders (holding metrics.jsonl)")
    p.add_argument("--out", default="training_curves.png", help="PNG to write")
    p.add_argument("--labels", nargs="+", default=None, help="legend names, one per run (default: folder names)")
    p.add_argument("--title", default="", help="title above the panels")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``simzss plot``: exit 0 when written; 2 for a usage error (bad option, a missing run or metrics file);
    1 when the picture cannot be written."""
    args = build_parser().parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        return fail("plot", f"--labels: {len(args.labels)} names for {len(args.runs)} runs", EXIT_USAGE)
    problem = unwritable(args.out)
    if problem:
        return fail("plot", problem, EXIT_FAILED)

    from simzss.logs import setup_logging
    from simzss.reports.curves import plot_training_curves, read_metrics

    setup_logging()
    labels = args.labels or [None] * len(args.runs)
    try:
        runs = [read_metrics(r, label) for r, label in zip(args.runs, labels)]
    except (OSError, ValueError) as e:
        return fail("plot", str(e), EXIT_USAGE)
    try:
        out = plot_training_curves(runs, args.out, args.title)
    except OSError as e:
        return fail("plot", os_error_line(e), EXIT_FAILED)
    except ValueError as e:
        return fail("plot", str(e), EXIT_USAGE)
    print(f"wrote {out}")
    return 0


__all__ = ["build_parser", "main"]
