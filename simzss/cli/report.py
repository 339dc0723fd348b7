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
import sys
from typing import List, Optional

from simzss.helpformat import HelpFormatter
from simzss.reports.segmentation_report import load_results, write_report
from simzss.logs import setup_logging

log = logging.getLogger("simzss.report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simzss report", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON files (simzss eval --out, or RUN/eval.json)")
    p.add_argument("--out", default="report", help="folder for report.md and the pictures")
    p.add_argument("--labels", nargs="+", default=None,
                   help="names for the models in the order they appear (default: the model path or spec)")
    p.add_argument("--top-pairs", type=int, default=10, help="confused class pairs to show per dataset")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        runs = [run for path in args.results for run in load_results(path)]
        if args.labels is not None:
            if len(args.labels) != len(runs):
                raise ValueError(f"--labels: {len(args.labels)} names for {len(runs)} models")
            for run, label in zip(runs, args.labels):
                run.label = label
        if args.top_pairs < 1:
            raise ValueError(f"--top-pairs must be >= 1, got {args.top_pairs}")
        report = write_report(args.out, runs, top_pairs=args.top_pairs)
    except (OSError, ValueError) as e:
        print(f"simzss report: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {report}")
    return 0


__all__ = ["build_parser", "main"]
