"""The ``simzss`` command: one sub-command per job, each implemented by a module's ``main(argv)``."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

from simzss import __version__

# name -> (module, function, one-line help). Modules are imported only when their command runs,
# so `simzss --help` stays fast and a job never pays for another job's imports.
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "demo": ("simzss.cli.demo", "main", "toy world end to end: data, prepare, train, evaluate, overlay"),
    "demo-data": ("simzss.cli.demo_data", "main", "write the synthetic toy-world shards and held-out split"),
    "shards": ("simzss.cli.shards", "main", "raw datasets (COCO Captions, CSV/parquet tables) -> webdataset shards; resize images"),
    "prepare": ("simzss.cli.prepare", "main", "annotate image-caption shards with concepts (concepts.json)"),
    "tokenizer": ("simzss.cli.tokenizer", "main", "train a BPE tokenizer on caption shards"),
    "train": ("simzss.cli.train", "main", "train a SimZSS (or LiT) model"),
    "eval": ("simzss.cli.eval", "main", "zero-shot segmentation / classification / retrieval"),
    "export": ("simzss.cli.export", "main", "export a checkpoint for inference (safetensors)"),
    "segment": ("simzss.cli.segment", "main", "segment one image with free-form labels"),
    "report": ("simzss.cli.report", "main", "pictures and report.md from saved segmentation results"),
    "plot": ("simzss.cli.plot", "main", "training curves of one or more runs (metrics.jsonl)"),
    "serve": ("simzss.cli.serve", "main", "local demo page: drop an image, type class names, see the overlay"),
    "convert-benchmark": ("simzss.cli.convert_benchmark", "main", "official benchmark download -> the layout eval reads"),
    "cache-features": ("simzss.cli.cache_features", "main", "precompute frozen vision features for training"),
    "import-official": ("simzss.cli.import_official", "main", "convert a checkpoint of the official release into an export"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: simzss COMMAND [options]   (simzss COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"simzss: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    entry: Callable[[List[str]], Optional[int]] = getattr(importlib.import_module(module), func)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
