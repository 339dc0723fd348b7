"""``simzss shards``: turn a raw image-caption dataset into webdataset shards that ``prepare`` and ``train`` read.

  simzss shards coco --captions annotations/captions_train2017.json --images train2017 --out DIR
  simzss shards coco --captions dataset_coco.json --split train,restval --images COCO_ROOT --out DIR
  simzss shards table cc3m.tsv --image-column filepath --caption-column title --out DIR

One sample per (image, caption) in the img2dataset layout: KEY.jpg (the file's bytes, unchanged), KEY.txt
(the caption), KEY.json (image and caption ids). Fixed samples per shard (00000.tar, ...), sizes.json,
several processes, atomic and resumable (finished shards are kept). Skipped pairs (missing image, unreadable
file, empty caption, ...) are counted in the JSON summary. --prepare also annotates the concepts (as
`simzss prepare`), so the output trains directly.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

from simzss.data.convert.coco import KARPATHY_SPLITS, read_coco_captions
from simzss.data.convert.table import DEFAULT_CAPTION_COLUMN, DEFAULT_IMAGE_COLUMN, read_table
from simzss.data.convert.writer import PrepareOptions, write_dataset
from simzss.data.pool import PoolInterrupted
from simzss.helpformat import HelpFormatter
from simzss.logs import setup_logging


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder: NNNNN.tar shards, sizes.json, shards_manifest.json")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="image-caption pairs per shard")
    p.add_argument("--processes", type=int, default=1, help="parallel writer processes")
    p.add_argument("--overwrite", action="store_true", help="rewrite every shard, even finished ones")
    p.add_argument("--prepare", action="store_true",
                   help="also annotate the caption concepts (KEY.concepts.json), as `simzss prepare` does")
    p.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline for --prepare")
    p.add_argument("--batch-size", type=int, default=256, help="captions per spaCy batch with --prepare")
    p.add_argument("--lowercase", action="store_true",
                   help="with --prepare: parse the lower-cased caption, as the official release did")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simzss shards", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="source", required=True, metavar="{coco,table}")
    coco = sub.add_parser("coco", formatter_class=HelpFormatter, help="COCO Captions or a Karpathy split json",
                          description="COCO Captions (captions_*.json) or Karpathy's dataset_coco.json / "
                          "dataset_flickr30k.json: one sample per (image, caption).")
    coco.add_argument("--captions", required=True,
                      help="captions_train2017.json / captions_val2017.json, or a Karpathy dataset_*.json")
    coco.add_argument("--images", required=True,
                      help="image folder: train2017/ (COCO json: file_name is inside it) or the folder holding "
                      "train2014/ and val2014/ (Karpathy json: filepath/filename)")
    coco.add_argument("--split", help=f"Karpathy json only: comma-separated splits from {', '.join(KARPATHY_SPLITS)}"
                      " (the usual training set is train,restval)")
    _common(coco)
    table = sub.add_parser("table", formatter_class=HelpFormatter,
                           help="a CSV/TSV/parquet table of image paths and captions",
                           description="A table with a header row, an image-path column and a caption column (the "
                           "release's CSV: tab-separated, columns filepath and title). Relative paths are resolved "
                           "against --image-root. Image URLs are not downloaded: use img2dataset (docs/datasets.md).")
    table.add_argument("table", help="the .csv / .tsv / .parquet file (parquet needs pyarrow)")
    table.add_argument("--image-column", default=DEFAULT_IMAGE_COLUMN, help="column with the image paths")
    table.add_argument("--caption-column", default=DEFAULT_CAPTION_COLUMN, help="column with the captions")
    table.add_argument("--sep", default="auto", help="field separator: auto (tab if the header has one, else comma), "
                       "'\\t' or one character")
    table.add_argument("--image-root", help="folder relative image paths start from (default: the table's folder)")
    _common(table)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when every shard is written or already there, 1 if a shard failed, 2 for unusable input."""
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        if args.source == "coco":
            records, skipped = read_coco_captions(args.captions, args.images, args.split)
            source = {"kind": "coco", "captions": str(Path(args.captions).resolve()), "split": args.split}
        else:
            records = read_table(args.table, image_column=args.image_column, caption_column=args.caption_column,
                                 sep=args.sep, image_root=args.image_root)
            skipped = None
            source = {"kind": "table", "table": str(Path(args.table).resolve()), "image_column": args.image_column,
                      "caption_column": args.caption_column}
        prepare = (PrepareOptions(spacy_model=args.spacy_model, batch_size=args.batch_size, lowercase=args.lowercase)
                   if args.prepare else None)
        summary = write_dataset(records, args.out, source=source, samples_per_shard=args.samples_per_shard,
                                processes=args.processes, overwrite=args.overwrite, show_progress=not args.no_progress,
                                prepare=prepare, skipped=skipped)
    except PoolInterrupted as e:
        print(f"simzss shards: {e}; finished shards are kept, rerun the same command to continue", file=sys.stderr)
        return 128 + signal.SIGTERM
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"simzss shards: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    if summary["shards_failed"]:
        print(f"simzss shards: {summary['shards_failed']} shard(s) failed: "
              + ", ".join(f["shard"] for f in summary["failed"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
