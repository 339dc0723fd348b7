"""``simzss tokenizer``: train a byte-level BPE tokenizer on the captions of tar shards.

The parser is light; ``tokenizers``/``transformers`` load inside :func:`main` after parsing. The output folder
records the shards (path, size, mtime) and settings it was trained on: a rerun on the same input reports it up
to date, a rerun on other input refuses unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from simzss.cli.options import add_no_progress, add_overwrite, command_parser, fail, usage_error

NAME = "tokenizer"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        NAME,
        "Train a lower-casing byte-level BPE tokenizer on the KEY.txt captions of image-text tar shards and save "
        "it (save_pretrained layout) to --out, with training_source.json recording the shards it was trained on.",
        ["simzss tokenizer --shards demo/data/train --out demo/tokenizer --vocab-size 2048",
         "simzss tokenizer --shards 'data/shard-{000000..000099}.tar' --out tok --max-captions 1000000"],
    )
    p.add_argument("--shards", nargs="+", required=True, help="tar shards: paths, brace patterns or folders")
    p.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a BPE merge")
    p.add_argument("--max-captions", type=int, default=None, help="train on at most this many captions")
    add_overwrite(p, "an existing tokenizer folder trained on other shards or settings")
    add_no_progress(p)  # training prints no bar; accepted so every data command takes the same options
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when trained (or already up to date), 2 for usage errors (missing shards, an output trained on other
    input without --overwrite), 1 when training or writing failed."""
    args = build_parser().parse_args(argv)
    if args.vocab_size < 1 or args.min_frequency < 1 or (args.max_captions is not None and args.max_captions < 1):
        return usage_error(NAME, "--vocab-size, --min-frequency and --max-captions must be >= 1")

    import logging

    from simzss.data.outputs import writable_folder
    from simzss.data.shards import expand_shards
    from simzss.data.tokenize import iter_shard_captions, read_training_source, train_bpe_tokenizer, training_source
    from simzss.logs import setup_logging

    setup_logging()
    log = logging.getLogger("simzss.cli.tokenizer")
    out = Path(args.out)
    try:
        paths = expand_shards(args.shards, local_only=True)
    except (ValueError, FileNotFoundError) as exc:
        return usage_error(NAME, str(exc))
    source = training_source(paths, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                             max_captions=args.max_captions)
    if out.exists() and not args.overwrite:
        if not out.is_dir():
            return usage_error(NAME, f"--out {out} is a file; give a folder")
        if any(out.iterdir()):
            previous = read_training_source(out)
            if previous == source:
                log.info("%s is up to date: trained on these %d shard(s) with these settings", out, len(paths))
                return 0
            why = ("was trained on other shards or settings" if previous is not None
                   else "holds a tokenizer of unknown origin")
            return usage_error(NAME, f"{out} {why}; pass --overwrite to replace it, or choose another --out")
    try:
        writable_folder(out.resolve().parent)  # the folder is written beside --out, then swapped in
    except PermissionError as exc:
        return fail(NAME, str(exc))

    stats: Dict[str, int] = {}
    captions: Iterable[str] = iter_shard_captions(paths, stats)
    if args.max_captions is not None:
        captions = (c for _, c in zip(range(args.max_captions), captions))
    try:
        tokenizer = train_bpe_tokenizer(captions, out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                                        source=source)
    except (ValueError, FileNotFoundError) as exc:
        return fail(NAME, str(exc))
    except OSError as exc:  # unwritable or full output
        return fail(NAME, f"cannot write {out}: {exc}")
    log.info(
        "read %d captions from %d shards (%d unreadable shards, %d bad captions); vocabulary %d -> %s",
        stats["captions"], stats["shards"], stats["bad_shards"], stats["bad_captions"], len(tokenizer), out,
    )
    return 0


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
