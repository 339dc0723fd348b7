"""``simzss export``: a training checkpoint -> a self-contained inference folder (safetensors + tokenizer + card).

The parser is light; torch and the model code load inside :func:`main` after parsing. ``latest``, a run folder
or a checkpoints folder mean the newest checkpoint that validates (the resume's check: a damaged newest one is
skipped with a warning), and the command says which step and folder it exported.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from simzss.cli.options import add_overwrite, command_parser, fail, usage_error

NAME = "export"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        NAME,
        "Export a training checkpoint to a self-contained inference folder (safetensors weights, tokenizer, "
        "model card). The export records the checkpoint folder and training step it came from.",
        ["simzss export runs/demo/checkpoints/latest demo/export",
         "simzss export runs/coco/checkpoints/step-000010000 exports/coco --include-vision --overwrite",
         "simzss export runs/coco exports/coco --push-to-hub me/simzss-coco --private"],
    )
    p.add_argument("checkpoint", help="checkpoint folder (RUN/checkpoints/step-N); RUN/checkpoints/latest, a run folder "
                   "or a checkpoints folder mean its newest valid checkpoint")
    p.add_argument("out_dir", help="export folder to create")
    p.add_argument("--include-vision", action="store_true",
                   help="include the frozen vision tower's weights (automatic when it is random-init or from a local file)")
    p.add_argument("--eval-results", metavar="JSON",
                   help="evaluation results for the model card (default: those the run recorded at the checkpoint's step)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the export to this Hugging Face model repo")
    p.add_argument("--private", action="store_true", help="create the hub repo as private")
    add_overwrite(p, "an existing export at OUT_DIR")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when exported, 2 for usage errors (no such or a damaged named checkpoint, OUT_DIR exists without
    --overwrite, unreadable --eval-results), 1 when the export failed (unwritable or full disk, hub push)."""
    args = build_parser().parse_args(argv)

    from simzss.engine.checkpoint import checkpoint_step
    from simzss.io.checkpoint import resolve_checkpoint
    from simzss.io.export import check_export_destination, export_resolved_checkpoint, read_eval_results
    from simzss.io.hub import push_to_hub
    from simzss.logs import setup_logging
    from simzss.models.pretrained import ExportError, read_export_config

    setup_logging()
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        results = read_eval_results(args.eval_results) if args.eval_results else None
        out = check_export_destination(args.out_dir, args.overwrite)
    except (ExportError, FileExistsError) as e:
        return usage_error(NAME, str(e))
    except OSError as e:  # an unwritable or full destination
        return fail(NAME, str(e))
    try:
        out = export_resolved_checkpoint(ckpt, out, include_vision=True if args.include_vision else None,
                                eval_results=results, overwrite=args.overwrite)
        meta = read_export_config(out)
        vision = "included" if meta["vision_weights_included"] else "referenced by name"
        print(f"exported {ckpt} (training step {checkpoint_step(ckpt)}) -> {out} (vision weights {vision})")
        if args.push_to_hub:
            url = push_to_hub(out, args.push_to_hub, private=True if args.private else None)
            print(f"pushed to {args.push_to_hub}: {url}")
    except (ExportError, OSError, ValueError) as e:  # full disk, unwritable folder, weights that do not fit, hub
        return fail(NAME, str(e))
    return 0


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
