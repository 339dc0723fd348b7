"""``simzss report``: pictures and ``report.md`` from saved segmentation results, several models compared.

Example::

    simzss report simzss.json gem.json maskclip.json --out reports/voc20
    simzss report runs/demo_simzss/eval.json runs/demo_lit/eval.json --labels SimZSS LiT --out reports/toy

Each JSON is what ``simzss eval --out`` writes (one model, or ``{"runs": [...]}`` for several) or a trainer's
``RUN/eval.json``. Confused-pair charts need results evaluated with ``--report`` (they carry the confusion
matrix); sample grids are drawn only by ``simzss eval --report``, which still holds the images.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional

from simzss.cli.options import EXIT_FAILED, EXIT_USAGE, command_parser, fail, os_error_line, unwritable

log = logging.getLogger("simzss.report")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``simzss report``."""
    p = command_parser(
        "report",
        "Pictures (per-class IoU, most confused pairs) and a report.md comparing the models, from results saved "
        "by `simzss eval --out` or a trainer's RUN/eval.json.",
        ["simzss report simzss.json gem.json maskclip.json --out reports/voc20",
         "simzss report runs/demo_simzss/eval.json runs/demo_lit/eval.json --labels SimZSS LiT --out reports/toy"],
    )
    p.add_argument("results", nargs="+", help="results JSON files (simzss eval --out, or RUN/eval.json)")
    p.add_argument("--out", default="report", help="folder for report.md and the pictures")
    p.add_argument("--labels", nargs="+", default=None,
                   help="names for the models in the order they appear (default: the model path or spec)")
    p.add_argument("--top-pairs", type=int, default=10, help="confused class pairs to show per dataset")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``simzss report``: exit 0 when written; 2 for a usage error (bad option, a missing or malformed results
    file); 1 when the report cannot be written."""
    args = build_parser().parse_args(argv)
    if args.top_pairs < 1:
        return fail("report", f"--top-pairs must be >= 1, got {args.top_pairs}", EXIT_USAGE)
    missing = [r for r in args.results if not Path(r).is_file()]
    if missing:
        return fail("report", f"{missing[0]}: no such results file (simzss eval --out writes one)", EXIT_USAGE)
    problem = unwritable(args.out, folder=True)
    if problem:
        return fail("report", problem, EXIT_FAILED)

    from simzss.logs import setup_logging
    from simzss.reports.segmentation_report import load_results, write_report

    setup_logging()
    try:
        runs = [run for path in args.results for run in load_results(path)]
    except (OSError, ValueError) as e:
        return fail("report", str(e), EXIT_USAGE)
    if args.labels is not None:
        if len(args.labels) != len(runs):
            return fail("report", f"--labels: {len(args.labels)} names for {len(runs)} models", EXIT_USAGE)
        for run, label in zip(runs, args.labels):
            run.label = label
    try:
        report = write_report(args.out, runs, top_pairs=args.top_pairs)
    except OSError as e:
        return fail("report", os_error_line(e), EXIT_FAILED)
    except ValueError as e:  # results that cannot be drawn (e.g. no segmentation results)
        return fail("report", str(e), EXIT_USAGE)
    print(f"wrote {report}")
    return 0


__all__ = ["build_parser", "main"]
