"""``simzss import-official``: a checkpoint of the SimZSS release (tileb1/simzss) -> a simzss export folder.

The parser is light; torch, timm and the model code load inside :func:`main` after parsing. The conversion is
:mod:`simzss.io.official`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from simzss.cli.options import add_overwrite, command_parser, fail, usage_error

NAME = "import-official"
#: The release's frozen tower (kept here so that --help does not import timm; checked against
#: simzss.io.official.RELEASE_VISION by the tests).
RELEASE_VISION = "vit_base_patch14_reg4_dinov2.lvd142m"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        NAME,
        "Turn a checkpoint of the SimZSS release (tileb1/simzss) into a simzss export folder "
        "(SimZSS.from_pretrained, simzss eval / segment work on it). Nothing is downloaded; pickled code is refused.",
        ["simzss import-official simzss_coco.pt --out exports/official-coco",
         "simzss import-official simzss_coco.pt --out exports/official-coco --overwrite --ignore-unknown"],
    )
    p.add_argument("checkpoint", help="the release's .pt file (a state dict or {'state_dict': ...}; 'module.' prefixes "
                   "ok), or a .safetensors file")
    p.add_argument("--out", required=True, help="export folder to create")
    add_overwrite(p, "an existing export at --out")
    p.add_argument("--vision-name", default=RELEASE_VISION, help="timm architecture of visual.vit.model.*")
    p.add_argument("--vision-kwargs", metavar="JSON",
                   help="timm model_kwargs overriding those inferred from the checkpoint's shapes")
    p.add_argument("--text-heads", type=int,
                   help="attention heads of the text tower (width / 64 when not given: 8 for the release)")
    p.add_argument("--quick-gelu", action="store_true",
                   help="the checkpoint was trained with --force-quick-gelu (the release was not)")
    p.add_argument("--ignore-unknown", action="store_true", help="leave out (and list) unknown keys instead of failing")
    p.add_argument("--bpe", help="CLIP's bpe_simple_vocab_16e6.txt.gz (the copy open_clip_torch ships when not given)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when imported; 2 for usage errors (bad options, a file that is not a release checkpoint, --out exists
    without --overwrite); 1 when writing the export failed (unwritable or full disk)."""
    args = build_parser().parse_args(argv)
    try:
        kwargs = json.loads(args.vision_kwargs) if args.vision_kwargs else None
    except json.JSONDecodeError as e:
        return usage_error(NAME, f"--vision-kwargs is not valid JSON ({e})")
    if kwargs is not None and not isinstance(kwargs, dict):
        return usage_error(NAME, "--vision-kwargs must be a JSON object, e.g. '{\"depth\": 12}'")
    if args.text_heads is not None and args.text_heads < 1:
        return usage_error(NAME, "--text-heads must be >= 1")

    from simzss.io.export import check_export_destination
    from simzss.io.official import OfficialCheckpointError, import_official
    from simzss.logs import setup_logging
    from simzss.models.pretrained import ExportError

    setup_logging()
    try:
        out = check_export_destination(args.out, args.overwrite)
    except (ExportError, FileExistsError) as e:
        return usage_error(NAME, str(e))
    except OSError as e:  # an unwritable or full destination
        return fail(NAME, str(e))
    try:
        out, conv = import_official(
            args.checkpoint,
            out,
            overwrite=args.overwrite,
            vision_name=args.vision_name,
            vision_kwargs=kwargs,
            text_heads=args.text_heads,
            quick_gelu=args.quick_gelu,
            ignore_unknown=args.ignore_unknown,
            bpe_path=args.bpe,
        )
    except (OfficialCheckpointError, ExportError, FileNotFoundError) as e:  # the input is not what we can import
        return usage_error(NAME, str(e))
    except OSError as e:  # writing failed: full disk, unwritable folder
        return fail(NAME, str(e))
    except ValueError as e:  # a bad --vision-name / --vision-kwargs / --bpe
        return usage_error(NAME, str(e))
    t, v = conv.config.text, conv.config.vision
    unknown = ", ".join(conv.ignored_unknown[:20]) + (" ..." if len(conv.ignored_unknown) > 20 else "")
    print(
        f"imported {args.checkpoint} -> {out}\n"
        f"  vision: {v.name} {json.dumps(v.model_kwargs) if v.model_kwargs else ''} denoiser={v.denoiser}\n"
        f"  text: {t.layers} layers x {t.width} wide, {t.heads} heads, context {t.context_length}, {t.activation}\n"
        f"  training-only keys left out: {', '.join(conv.unused) or 'none'}"
        + (f"\n  unknown keys left out ({len(conv.ignored_unknown)}): {unknown}" if conv.ignored_unknown else "")
    )
    return 0


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
