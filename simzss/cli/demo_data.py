"""``simzss demo-data OUT_DIR``: write the synthetic toy world (training shards and a labelled held-out split).

The parser is light; numpy and Pillow load inside :func:`main` after parsing.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from simzss.cli.options import add_overwrite, command_parser, fail, os_error_line, usage_error

NAME = "demo-data"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        NAME,
        "Write the synthetic toy world: OUT_DIR/train (webdataset shards + sizes.json), OUT_DIR/val (images, "
        "masks, classes.txt) and OUT_DIR/toy_world.json. The same arguments give byte-identical shards, images "
        "and masks.",
        ["simzss demo-data demo/data", "simzss demo-data demo/data --num-train 500 --overwrite"],
    )
    p.add_argument("out_dir", help="output folder (gets train/, val/, toy_world.json)")
    p.add_argument("--num-train", type=int, default=2000, help="training image-caption pairs")
    p.add_argument("--num-val", type=int, default=100, help="held-out images with masks")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    p.add_argument("--shard-size", type=int, default=500, help="samples per training shard")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated world")
    add_overwrite(p, "existing train/ and val/ folders")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when written, 2 for bad options or an existing output without --overwrite, 1 if a write failed."""
    args = build_parser().parse_args(argv)

    from simzss.data.synthetic import generate_toy_world
    from simzss.logs import setup_logging

    setup_logging()
    try:
        summary = generate_toy_world(args.out_dir, num_train=args.num_train, num_val=args.num_val,
                                     image_size=args.image_size, shard_size=args.shard_size, seed=args.seed,
                                     overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        return usage_error(NAME, str(e))
    except OSError as e:  # unwritable or full output
        return fail(NAME, f"cannot write {args.out_dir}: {os_error_line(e)}")
    summary.pop("classes")
    print(json.dumps(summary, indent=1))
    return 0


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
