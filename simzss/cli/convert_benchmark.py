"""``simzss convert-benchmark NAME RAW_DIR --out DIR``: an official benchmark download -> the layout that
``simzss eval`` reads (label ids remapped, images linked). See docs/datasets.md for each dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

from simzss.cli.options import (EXIT_FAILED, EXIT_USAGE, add_no_progress, add_overwrite, command_parser, fail,
                                os_error_line)

#: The benchmark names (:data:`simzss.data.convert.benchmarks.BENCHMARKS`; repeated here so that ``--help`` does not
#: import the converters, and checked against them when the command runs).
BENCHMARK_NAMES = ("voc", "voc20", "context59", "context60", "coco_object", "coco_stuff", "cityscapes", "ade20k")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``simzss convert-benchmark``."""
    p = command_parser(
        "convert-benchmark",
        "An official benchmark download -> the layout that `simzss eval` reads (label ids remapped, images "
        "linked). See docs/datasets.md for each dataset.",
        ["simzss convert-benchmark cityscapes /data/cityscapes --out /data/cityscapes  "
         "# in place: writes *_gtFine_labelTrainIds.png next to the raw files",
         "simzss convert-benchmark coco_stuff /data/coco --out /data/coco_stuff164k --split val2017"],
    )
    p.add_argument("name", choices=BENCHMARK_NAMES, help="benchmark name (context59 and context60 share one conversion)")
    p.add_argument("raw", metavar="RAW_DIR", help="the extracted official download")
    p.add_argument("--out", required=True, help="output folder (may be RAW_DIR: converted files go next to the raw "
                   "ones); pass it to simzss eval as NAME:OUT")
    p.add_argument("--split", help="split to convert (cityscapes: val; coco_*: val2017)")
    add_overwrite(p, "masks that already exist")
    add_no_progress(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when converted (or nothing to convert), 2 when the raw download is missing or malformed, 1 when
    the output cannot be written."""
    args = build_parser().parse_args(argv)
    raw, out = Path(args.raw).expanduser(), Path(args.out).expanduser()
    if not raw.is_dir():
        return fail("convert-benchmark", f"{args.name}: raw download folder not found: {raw}", EXIT_USAGE)

    from simzss.data.convert.benchmarks import AS_DOWNLOADED, CONVERTERS, ConversionError
    from simzss.logs import setup_logging

    setup_logging(progress=not args.no_progress)
    convert = CONVERTERS[args.name]
    if convert is None:
        print(f"{args.name}: nothing to convert; {AS_DOWNLOADED[args.name]}. Evaluate with "
              f"--datasets {args.name}:{args.raw}")
        return 0
    kwargs = {"split": args.split} if args.split and args.name not in ("context59", "context60") else {}
    try:
        result = convert(raw, out, overwrite=args.overwrite, show_progress=not args.no_progress, **kwargs)
    except ConversionError as e:
        return fail("convert-benchmark", str(e), EXIT_USAGE)
    except OSError as e:
        return fail("convert-benchmark", os_error_line(e), EXIT_FAILED)
    print(json.dumps({**result.to_json(), "eval_spec": f"{args.name}:{out}"}, indent=1))
    return 0


__all__ = ["BENCHMARK_NAMES", "build_parser", "main"]
