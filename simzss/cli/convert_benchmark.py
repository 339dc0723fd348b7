"""``simzss convert-benchmark NAME RAW_DIR --out DIR``: an official benchmark download -> the layout that
``simzss eval`` reads (label ids remapped, images linked). See docs/datasets.md for each dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from simzss.data.convert.benchmarks import AS_DOWNLOADED, BENCHMARKS, CONVERTERS, ConversionError
from simzss.helpformat import HelpFormatter
from simzss.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simzss convert-benchmark", description=__doc__, formatter_class=HelpFormatter,
                                epilog="example: simzss convert-benchmark cityscapes /data/cityscapes --out "
                                "/data/cityscapes  (in place: writes *_gtFine_labelTrainIds.png next to the raw files)")
    p.add_argument("name", choices=BENCHMARKS, help="benchmark name (context59 and context60 share one conversion)")
    p.add_argument("raw", metavar="RAW_DIR", help="the extracted official download")
    p.add_argument("--out", required=True, help="output folder (may be RAW_DIR: converted files go next to the raw "
                   "ones); pass it to simzss eval as NAME:OUT")
    p.add_argument("--split", help="split to convert (cityscapes: val; coco_*: val2017)")
    p.add_argument("--overwrite", action="store_true", help="rewrite masks that already exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when converted (or nothing to convert), 2 when the raw download is missing or malformed."""
    args = _parser().parse_args(argv)
    setup_logging()
    convert = CONVERTERS[args.name]
    if convert is None:
        print(f"{args.name}: nothing to convert; {AS_DOWNLOADED[args.name]}. Evaluate with "
              f"--datasets {args.name}:{args.raw}")
        return 0
    raw, out = Path(args.raw).expanduser(), Path(args.out).expanduser()
    kwargs = {"split": args.split} if args.split and args.name not in ("context59", "context60") else {}
    try:
        if not raw.is_dir():
            raise ConversionError(f"{args.name}: raw download folder not found: {raw}")
        result = convert(raw, out, overwrite=args.overwrite, show_progress=not args.no_progress, **kwargs)
    except (ConversionError, OSError) as e:
        print(f"simzss convert-benchmark: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**result.to_json(), "eval_spec": f"{args.name}:{out}"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
