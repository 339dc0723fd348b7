"""``simzss segment``: segment one picture into free-form labels and write an overlay with a legend.

``simzss segment IMAGE --model PATH --labels "cat,grass,sky" --out overlay.png [--out-mask mask.png]`` loads an
export (or a trainer checkpoint, or a baseline spec), runs sliding-window zero-shot segmentation
(:func:`simzss.inference.segment_pil`) and writes the picture with a semi-transparent colour overlay and a legend
below it; ``--out-mask`` writes the raw label map (uint8 PNG, pixel value = index into the labels).
The library functions live in :mod:`simzss.inference`; torch is imported only after parsing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from simzss.cli.options import (EXIT_FAILED, EXIT_USAGE, add_device, add_max_pixels, command_parser, fail,
                                os_error_line, unwritable)
from simzss.config import DataConfig

_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``simzss segment``."""
    p = command_parser(
        "segment",
        "Segment one image into free-form labels and write a coloured overlay with a legend (and optionally the "
        "label map).",
        ['simzss segment photo.jpg --model runs/coco_vitb14/export --labels "cat,grass,sky" --out overlay.png',
         'simzss segment photo.jpg --model gem:ViT-B-16/openai --labels "cat,sky" --out o.png --device cpu'],
    )
    p.add_argument("image", help="input picture (any format Pillow reads)")
    p.add_argument("--model", required=True,
                   help="export folder (simzss export), training checkpoint / run folder, or a baseline spec")
    p.add_argument("--labels", required=True, help='comma-separated class names, e.g. "cat,grass,sky"')
    p.add_argument("--out", required=True, help="overlay picture to write (.png, .jpg)")
    p.add_argument("--out-mask", help="also write the label map as a uint8 PNG (pixel = index into --labels)")
    p.add_argument("--templates", default="single", help="prompt template set: single | imagenet80 | tcl9")
    p.add_argument("--short-side", type=int, default=448, help="resize the short side to this before sliding")
    p.add_argument("--crop", type=int, default=448, help="sliding window size")
    p.add_argument("--stride", type=int, default=224, help="sliding window stride")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1]")
    add_device(p)
    add_max_pixels(p, DataConfig.max_image_pixels)
    p.add_argument("--min-width", type=int, default=0,
                   help="upscale a narrower picture by a whole factor before drawing, so that the overlay and its "
                   "legend stay readable (e.g. 448 for small images)")
    return p


def _check_args(args: argparse.Namespace) -> Optional[str]:
    """The first usage problem of the options (before anything heavy is imported), or None."""
    out, out_mask = Path(args.out), Path(args.out_mask) if args.out_mask else None
    if out.suffix.lower() not in _PICTURE_SUFFIXES:
        return f"--out {out}: unknown picture format {out.suffix!r}; use .png or .jpg"
    if out_mask is not None and out_mask.suffix.lower() != ".png":
        return f"--out-mask must be a .png file (lossless), got {out_mask}"
    if not 0.0 <= args.alpha <= 1.0:
        return f"--alpha must be in [0, 1], got {args.alpha}"
    if min(args.short_side, args.crop, args.stride) <= 0:
        return "--short-side, --crop and --stride must be positive"
    if not Path(args.image).is_file():
        return f"{args.image}: no such image file"
    return None


def _output_problem(args: argparse.Namespace) -> Optional[str]:
    """Why ``--out`` or ``--out-mask`` cannot be written (a failed run, exit 1, as in every command), or None."""
    for path in (args.out, args.out_mask):
        problem = unwritable(path) if path else None
        if problem:
            return problem
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``simzss segment``: exit 0 when written, 2 for a usage error (bad option, missing or unreadable image or
    model, no such device), 1 when the run fails (an output that cannot be written, checked first; writing the
    pictures)."""
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        return fail("segment", problem, EXIT_USAGE)
    problem = _output_problem(args)
    if problem:
        return fail("segment", problem, EXIT_FAILED)

    import numpy as np
    from PIL import Image

    from simzss.cli.options import DeviceError, resolve_device
    from simzss.inference import load_image, parse_labels, render_overlay, save_picture, segment_pil
    from simzss.io.load import load_model
    from simzss.logs import setup_logging
    from simzss.models.pretrained import ExportError

    setup_logging()
    out, out_mask = Path(args.out), Path(args.out_mask) if args.out_mask else None
    try:
        labels = parse_labels(args.labels)
        image = load_image(args.image, max_pixels=args.max_pixels)
        model = load_model(args.model, resolve_device(args.device))
    except (DeviceError, ExportError, OSError, ValueError) as e:  # ImageTooLargeError is a ValueError
        return fail("segment", str(e), EXIT_USAGE)
    try:
        label_map, _ = segment_pil(model, image, labels, templates=args.templates, short_side=args.short_side,
                                   crop=args.crop, stride=args.stride)
    except (KeyError, ValueError) as e:  # an unknown or malformed template set
        return fail("segment", str(e.args[0] if isinstance(e, KeyError) and e.args else e), EXIT_USAGE)
    try:
        save_picture(render_overlay(image, label_map, labels, alpha=args.alpha, min_width=args.min_width), out)
        if out_mask is not None:
            save_picture(Image.fromarray(label_map), out_mask, "PNG")
    except OSError as e:
        return fail("segment", os_error_line(e), EXIT_FAILED)
    counts = np.bincount(label_map.reshape(-1), minlength=len(labels)) / max(1, label_map.size)
    summary = ", ".join(f"{name} {100 * c:.1f}%" for name, c in zip(labels, counts))
    print(f"wrote {out}" + (f" and {out_mask}" if out_mask is not None else "") + f" ({summary})")
    return 0


__all__ = ["build_parser", "main"]
