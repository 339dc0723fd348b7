"""``simzss prepare``: annotate image-caption shards with their caption concepts (``KEY.concepts.json``).

The parser is light (stdlib and ``simzss.cli.options``); spaCy and the library load inside :func:`main`
after parsing, so ``--help`` and usage errors are fast.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Callable, List, Optional

from simzss.cli.options import (
    EXIT_FAILED, add_no_progress, add_overwrite, command_parser, fail, usage_error,
)

NAME = "prepare"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        NAME,
        "Annotate image-caption tar shards with their caption concepts: for every input shard NAME.tar, OUT/NAME.tar "
        "gets the same samples plus KEY.concepts.json, and OUT/sizes.json counts them. Resumable: an output made "
        "from its input as that is now is kept, anything else is redone (OUT/fingerprints.json records the inputs).",
        ["simzss prepare 'data/train/shard-{000000..000003}.tar' --out data/prepared --processes 2",
         "simzss prepare data/train --out data/prepared --overwrite"],
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="shard paths, brace patterns (shard-{000..009}.tar), globs, or a folder of *.tar")
    p.add_argument("--out", required=True, help="output folder: annotated shards, sizes.json, fingerprints.json")
    p.add_argument("--processes", type=int, default=1, help="parallel processes, one spaCy pipeline each")
    p.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline name or path")
    p.add_argument("--batch-size", type=int, default=256, help="captions per spaCy batch")
    p.add_argument("--standard-spacy", action="store_true",
                   help="run spaCy's matrix products with its bundled BLIS instead of numpy's BLAS "
                        "(slower with one BLAS thread per process; same pipeline)")
    p.add_argument("--lowercase", action="store_true",
                   help="parse the lower-cased caption, as the official release prepared its shards (spans still "
                        "refer to the caption as written)")
    add_overwrite(p, "every output shard (by default only outputs whose input or settings changed are redone)")
    p.add_argument("--concept-bank", help="text file, one class name per line (only for the in-bank statistics)")
    p.add_argument("--synonyms", help="synonyms file for --concept-bank")
    add_no_progress(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when every shard is done or kept, 1 if a shard failed or was truncated (its complete samples are
    kept), 2 for usage errors (bad options, missing inputs)."""
    args = build_parser().parse_args(argv)
    if args.processes < 1 or args.batch_size < 1:
        return usage_error(NAME, f"--processes and --batch-size must be >= 1, got {args.processes}, {args.batch_size}")

    from simzss.concepts import ConceptBank
    from simzss.data.prepare import plan_shards, prepare_shards
    from simzss.logs import setup_logging

    setup_logging()
    try:
        plan_shards(args.inputs, args.out)  # missing inputs: one line, before spaCy loads or --out is made
        bank = None
        if args.concept_bank:
            bank = ConceptBank.from_file(args.concept_bank, synonyms=args.synonyms, report_unreachable=False)
    except (ValueError, FileNotFoundError) as e:
        return usage_error(NAME, str(e))
    return run_job(NAME, lambda: prepare_shards(
        args.inputs, args.out, processes=args.processes, spacy_model=args.spacy_model, batch_size=args.batch_size,
        bank=bank, overwrite=args.overwrite, progress=not args.no_progress, fast_spacy=not args.standard_spacy,
        lowercase=args.lowercase))


def run_job(command: str, job: Callable[[], dict]) -> int:
    """Run a shard job (``prepare``, ``shards``) and turn its outcome into one line and an exit code: SIGTERM
    128 + 15 (finished shards kept), bad input 2, an unwritable or full output or dead workers 1, else the
    :func:`report_summary` code."""
    from simzss.data.pool import PoolInterrupted

    try:
        summary = job()
    except PoolInterrupted as e:
        fail(command, f"{e}; finished shards are kept, rerun the same command to continue")
        return 128 + signal.SIGTERM
    except (ValueError, FileNotFoundError) as e:
        return usage_error(command, str(e))
    except (OSError, RuntimeError) as e:  # an unwritable or full output, dead workers
        return fail(command, str(e))
    return report_summary(command, summary)

def report_summary(command: str, summary: dict) -> int:
    """Print a shard job's JSON summary (``prepare``, ``shards``), then one line per kind of problem; return the exit
    code: 1 if a shard failed or an input was truncated (its complete samples are kept and counted), else 0."""
    print(json.dumps(summary, indent=1))
    code = 0
    if summary["shards_failed"]:
        code = fail(command, f"{summary['shards_failed']} shard(s) failed and have no output: "
                    + ", ".join(f["shard"] for f in summary["failed"]), EXIT_FAILED)
    if summary.get("shards_truncated"):
        code = fail(command, f"{summary['shards_truncated']} input shard(s) are truncated; their complete samples "
                    "were kept and counted (train can use them); replace the input and rerun to get the rest: "
                    + ", ".join(t["shard"] for t in summary["truncated"]), EXIT_FAILED)
    return code


__all__ = ["build_parser", "main", "report_summary", "run_job"]

if __name__ == "__main__":
    sys.exit(main())
