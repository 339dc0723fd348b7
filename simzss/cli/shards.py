"""``simzss shards``: turn a raw image-caption dataset into webdataset shards that ``prepare`` and ``train`` read,
or resize the images of existing shards, or index them.

One sample per (image, caption) in the img2dataset layout: KEY.jpg (the file's bytes, unchanged, unless
--resize-short), KEY.txt (the caption), KEY.json (image and caption ids). Fixed samples per shard (00000.tar, ...),
sizes.json, fingerprints.json, several processes, atomic and resumable (finished shards whose records are unchanged
are kept). Skipped pairs (missing image, unreadable file, empty caption, ...) are counted in the JSON summary.
--prepare also annotates the concepts (as `simzss prepare`), so the output trains directly.

The parsers are light; Pillow, spaCy and the writers load inside :func:`main` after parsing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from simzss.cli.options import add_max_pixels, add_no_progress, add_overwrite, command_parser, usage_error
from simzss.cli.prepare import run_job
from simzss.helpformat import HelpFormatter

NAME = "shards"
#: Defaults shared with :mod:`simzss.data.convert.resize` (kept here so that --help imports nothing heavy).
DEFAULT_JPEG_QUALITY = 95
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_IMAGE_COLUMN = "filepath"
DEFAULT_CAPTION_COLUMN = "title"
KARPATHY_SPLITS = ("train", "restval", "val", "test")
RESIZE_HELP = ("resize each image so its short side is N pixels (img2dataset's keep_ratio: aspect kept, never "
               "upscaled; an image already that small keeps its bytes), re-encoded as JPEG at --jpeg-quality with "
               "its EXIF orientation applied. 288 keeps every detail of a 224 px crop at crop scale 0.9 (needs "
               ">= 273) and makes decoding several times cheaper (docs/datasets.md)")


def _sub(sub: argparse._SubParsersAction, name: str, help_: str, description: str,
         examples: List[str]) -> argparse.ArgumentParser:
    """One sub-command's parser, in the shared help style, with its examples."""
    return sub.add_parser(name, help=help_, description=description, formatter_class=HelpFormatter,
                          epilog="examples:\n" + "\n".join(f"  {line}" for line in examples))


def _resize_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--resize-short", type=int, metavar="N", required=required, help=RESIZE_HELP)
    p.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, metavar="Q",
                   help="JPEG quality of resized images (as img2dataset)")
    add_max_pixels(p, DEFAULT_MAX_IMAGE_PIXELS)  # with --resize-short: larger images are skipped and counted


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder: NNNNN.tar shards, sizes.json, shards_manifest.json")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="image-caption pairs per shard")
    p.add_argument("--processes", type=int, default=1, help="parallel writer processes")
    add_overwrite(p, "every shard, even unchanged ones (needed to change --samples-per-shard or --resize-short)")
    p.add_argument("--prepare", action="store_true",
                   help="also annotate the caption concepts (KEY.concepts.json), as `simzss prepare` does")
    p.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline for --prepare")
    p.add_argument("--batch-size", type=int, default=256, help="captions per spaCy batch with --prepare")
    p.add_argument("--lowercase", action="store_true",
                   help="with --prepare: parse the lower-cased caption, as the official release did")
    _resize_options(p, required=False)
    add_no_progress(p)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        NAME,
        "Raw image-caption datasets (COCO Captions, CSV/TSV/parquet tables) -> webdataset shards that prepare and "
        "train read; `shards resize` to shrink the images of existing shards; `shards index` to index them.",
        ["simzss shards coco --captions annotations/captions_train2017.json --images train2017 --out coco_shards",
         "simzss shards table cc3m.tsv --image-column filepath --caption-column title --out cc3m --resize-short 288",
         "simzss shards resize 'data/prepared/{00000..00099}.tar' --out data/prepared288 --resize-short 288"],
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="{coco,table,resize,index}")
    coco = _sub(sub, "coco", "COCO Captions or a Karpathy split json",
                "COCO Captions (captions_*.json) or Karpathy's dataset_coco.json / dataset_flickr30k.json: one sample "
                "per (image, caption).",
                ["simzss shards coco --captions annotations/captions_train2017.json --images train2017 --out coco",
                 "simzss shards coco --captions dataset_coco.json --split train,restval --images COCO_ROOT --out k"])
    coco.add_argument("--captions", required=True,
                      help="captions_train2017.json / captions_val2017.json, or a Karpathy dataset_*.json")
    coco.add_argument("--images", required=True,
                      help="image folder: train2017/ (COCO json: file_name is inside it) or the folder holding "
                      "train2014/ and val2014/ (Karpathy json: filepath/filename)")
    coco.add_argument("--split", help=f"Karpathy json only: comma-separated splits from {', '.join(KARPATHY_SPLITS)}"
                      " (the usual training set is train,restval)")
    _common(coco)
    table = _sub(sub, "table", "a CSV/TSV/parquet table of image paths and captions",
                 "A table with a header row, an image-path column and a caption column (the release's CSV: "
                 "tab-separated, columns filepath and title). Relative paths are resolved against --image-root. "
                 "Image URLs are not downloaded: use img2dataset (docs/datasets.md).",
                 ["simzss shards table cc3m.tsv --out cc3m_shards",
                  "simzss shards table pairs.csv --image-column path --caption-column caption --out s --prepare"])
    table.add_argument("table", help="the .csv / .tsv / .parquet file (parquet needs pyarrow)")
    table.add_argument("--image-column", default=DEFAULT_IMAGE_COLUMN, help="column with the image paths")
    table.add_argument("--caption-column", default=DEFAULT_CAPTION_COLUMN, help="column with the captions")
    table.add_argument("--sep", default="auto", help="field separator: auto (tab if the header has one, else comma), "
                       "'\\t' or one character")
    table.add_argument("--image-root", help="folder relative image paths start from (default: the table's folder)")
    _common(table)
    resize = _sub(sub, "resize", "resize the images of existing shards (all other members kept)",
                  "Write every input shard NAME.tar as OUT/NAME.tar with its images resized (short side N); captions, "
                  ".json, concepts.json and every other member are kept. Resumable and atomic; an output is redone "
                  "when its input or the settings change (fingerprints.json).",
                  ["simzss shards resize data/prepared --out data/prepared288 --resize-short 288 --processes 4"])
    resize.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="shard paths, brace patterns, globs or a folder of *.tar")
    resize.add_argument("--out", required=True, help="output folder: resized shards, sizes.json, fingerprints.json")
    resize.add_argument("--processes", type=int, default=1, help="parallel processes")
    add_overwrite(resize, "every output shard")
    _resize_options(resize, required=True)
    add_no_progress(resize)
    index = _sub(sub, "index", "index existing shards, so that train's data workers walk them cheaply",
                 "Write NAME.tar.idx next to every shard: where each sample's members lie. Every data worker walks "
                 "its rank's whole sample sequence to agree on the shuffled order; from an index that costs about "
                 "5x less than reading the tar headers (docs/datasets.md). The samples are the same either way. "
                 "simzss's own shard writers index what they write; use this for shards made elsewhere (img2dataset)"
                 " or before this version. A shard that is not a plain tar file is counted and left to webdataset's "
                 "reader. An index is ignored once its shard changes; rerun to refresh it.",
                 ["simzss shards index 'laion/{00000..41407}.tar' --processes 16",
                  "simzss shards index data/prepared"])
    index.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="shard paths, brace patterns, globs or a folder of *.tar (local files only)")
    index.add_argument("--processes", type=int, default=1, help="parallel processes")
    add_overwrite(index, "every index (fresh ones too)")
    add_no_progress(index)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when every shard is written or already there, 1 if a shard failed, 2 for unusable input."""
    args = build_parser().parse_args(argv)
    if args.processes < 1:
        return usage_error(NAME, f"--processes must be >= 1, got {args.processes}")

    from simzss.logs import setup_logging

    setup_logging()
    if args.source == "index":
        from simzss.data.shard_index import index_shards

        return run_job(NAME, lambda: index_shards(args.inputs, processes=args.processes, overwrite=args.overwrite,
                                                  show_progress=not args.no_progress))

    from simzss.data.convert.resize import ResizeOptions, plan_resize, resize_shards

    try:
        resize = (ResizeOptions(args.resize_short, args.jpeg_quality, args.max_pixels)
                  if args.resize_short is not None else None)
        if args.source == "resize":
            plan_resize(args.inputs, args.out)  # missing inputs: one line, before --out is made
    except (ValueError, FileNotFoundError) as e:
        return usage_error(NAME, str(e))
    if args.source == "resize":
        return run_job(NAME, lambda: resize_shards(args.inputs, args.out, resize,  # type: ignore[arg-type]
                                                   processes=args.processes, overwrite=args.overwrite,
                                                   show_progress=not args.no_progress))

    from simzss.data.convert.coco import read_coco_captions
    from simzss.data.convert.table import read_table
    from simzss.data.convert.writer import PrepareOptions, write_dataset

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
    except (ValueError, FileNotFoundError) as e:
        return usage_error(NAME, str(e))
    prepare = (PrepareOptions(spacy_model=args.spacy_model, batch_size=args.batch_size, lowercase=args.lowercase)
               if args.prepare else None)
    return run_job(NAME, lambda: write_dataset(
        records, args.out, source=source, samples_per_shard=args.samples_per_shard, processes=args.processes,
        overwrite=args.overwrite, show_progress=not args.no_progress, prepare=prepare, skipped=skipped, resize=resize))


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
