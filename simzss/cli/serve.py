"""``simzss serve``: a local demo page (Gradio) to try a model: drop an image, type class names, see the overlay.

Example::

    simzss serve exports/simzss-b14 --port 7860          # then open http://127.0.0.1:7860
    simzss serve gem:ViT-B-16/openai                      # a training-free baseline, same page

The page takes comma-separated class names, a prompt template set and a background threshold (0 = off: every
pixel gets one of the classes; above 0 a pixel is background when no class reaches that probability), and shows
the overlay with its legend (:func:`simzss.inference.render_overlay`) and each class's share of the picture.
It listens on 127.0.0.1 unless ``--host`` says otherwise; nothing is sent anywhere else.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from simzss.cli.options import EXIT_FAILED, EXIT_USAGE, add_device, add_max_pixels, command_parser, fail
from simzss.config import DataConfig

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("simzss.serve")

BACKGROUND = "background"
MAX_SIDE = 2048  # larger uploads are shrunk first: the page is for trying, not for benchmarks


@dataclass(frozen=True)
class SlideSettings:
    """Sliding-window inference settings of the page (the evaluation protocol's by default)."""

    short_side: int = 448
    crop: int = 448
    stride: int = 224


def segment_for_page(model: Any, image: Optional[Image.Image], labels_text: str, templates: str,
                     bg_threshold: float, alpha: float = 0.5,
                     slide: SlideSettings = SlideSettings()) -> Tuple[Image.Image, List[List[Any]]]:
    """The page's work: (overlay with legend, rows ``[class, area %]`` largest first). ValueError with a message
    for the user on bad input (no image, no or duplicate class names, threshold out of range)."""
    import numpy as np

    from simzss.inference import MAX_LABELS, parse_labels, render_overlay, segment_pil

    if image is None:
        raise ValueError("drop an image first")
    labels = parse_labels(labels_text or "")
    if not 0.0 <= bg_threshold < 1.0:
        raise ValueError(f"background threshold must be in [0, 1), got {bg_threshold}")
    if bg_threshold > 0 and BACKGROUND in labels:
        raise ValueError(f"'{BACKGROUND}' is added by the background threshold; remove it from the class names")
    if bg_threshold > 0 and len(labels) + 1 > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS - 1} class names with a background threshold")
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    kw: dict = dict(background="threshold", bg_threshold=bg_threshold) if bg_threshold > 0 else {}
    label_map, _ = segment_pil(model, image, labels, templates=templates, short_side=slide.short_side,
                               crop=slide.crop, stride=slide.stride, **kw)
    names = [BACKGROUND] + labels if bg_threshold > 0 else labels
    overlay = render_overlay(image, label_map, names, alpha=alpha)
    share = np.bincount(label_map.reshape(-1), minlength=len(names)) / max(1, label_map.size)
    rows = sorted(([n, round(100 * float(s), 2)] for n, s in zip(names, share)), key=lambda r: -r[1])
    return overlay, rows


def open_upload(path: str, max_pixels: int = DataConfig.max_image_pixels) -> Image.Image:
    """An uploaded picture, decoded under a pixel cap (``--max-pixels``, the same default as every other input:
    JPEGs at reduced scale when over it; other formats over it refused with a message for the page)."""
    from PIL import ImageOps, UnidentifiedImageError

    from simzss.data.transforms import ImageTooLargeError, open_image

    try:
        with open_image(path, max_pixels=max_pixels, name="the uploaded image") as img:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except ImageTooLargeError as e:
        raise ValueError(str(e)) from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read the uploaded image ({e})") from None


def build_app(model: Any, model_name: str, *, slide: SlideSettings = SlideSettings(),
              default_labels: str = "cat, dog, grass, sky", max_pixels: int = DataConfig.max_image_pixels) -> Any:
    """The Gradio Blocks page for ``model`` (any zero-shot model: SimZSS export or baseline)."""
    import gradio as gr

    from simzss.resources import available_templates

    def run(upload: Optional[str], labels_text: str, templates: str, bg: float, alpha: float):
        try:
            image = open_upload(upload, max_pixels) if upload else None
            return segment_for_page(model, image, labels_text, templates, float(bg), float(alpha), slide)
        except (ValueError, KeyError) as e:  # KeyError: unknown template set
            raise gr.Error(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from None

    with gr.Blocks(title="SimZSS zero-shot segmentation") as app:
        gr.Markdown(f"## Zero-shot segmentation\nModel: `{model_name}` — drop an image, type class names "
                    "separated by commas, press **Segment**.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="image", sources=["upload", "clipboard"],
                                 elem_id="image-in")
                labels = gr.Textbox(value=default_labels, label="class names (comma-separated)", elem_id="labels")
                templates = gr.Dropdown(choices=available_templates(), value="single", label="prompt templates",
                                        elem_id="templates")
                bg = gr.Slider(0.0, 0.99, value=0.0, step=0.01, elem_id="bg-threshold",
                               label="background threshold (0 = off; else background where no class reaches it)")
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="overlay opacity", elem_id="alpha")
                button = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column():
                overlay = gr.Image(type="pil", format="png", label="overlay", interactive=False, elem_id="overlay")
                areas = gr.Dataframe(headers=["class", "area %"], datatype=["str", "number"], label="area per class",
                                     interactive=False, elem_id="areas")
        button.click(run, inputs=[image, labels, templates, bg, alpha], outputs=[overlay, areas])
    return app


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``simzss serve``."""
    p = command_parser(
        "serve",
        "A local demo page (Gradio) to try a model: drop an image, type class names, see the overlay and each "
        "class's share of the picture. It listens on 127.0.0.1 unless --host says otherwise; nothing is sent "
        "anywhere else.",
        ["simzss serve exports/simzss-b14 --port 7860     # then open http://127.0.0.1:7860",
         "simzss serve gem:ViT-B-16/openai --device cpu  # a training-free baseline, same page"],
    )
    p.add_argument("model", help="export folder, training checkpoint folder, or a baseline spec (gem:ViT-B-16/openai)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 127.0.0.1 is this machine only, 0.0.0.0 exposes the page to the network")
    p.add_argument("--labels", default="cat, dog, grass, sky", help="class names pre-filled on the page")
    p.add_argument("--short-side", type=int, default=448, help="resize the short side to this before sliding")
    p.add_argument("--crop", type=int, default=448, help="sliding window size")
    p.add_argument("--stride", type=int, default=224, help="sliding window stride")
    add_device(p)
    add_max_pixels(p, DataConfig.max_image_pixels)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``simzss serve``: runs until Ctrl+C (exit 0); 2 for a usage error (bad option, a model that cannot be
    loaded, no such device), 1 when the page cannot listen."""
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        return fail("serve", f"--port must be in 1..65535, got {args.port}", EXIT_USAGE)
    if min(args.short_side, args.crop, args.stride) <= 0:
        return fail("serve", "--short-side, --crop and --stride must be positive", EXIT_USAGE)
    if args.max_pixels < 0:
        return fail("serve", f"--max-pixels must be >= 0 (0 = no limit), got {args.max_pixels}", EXIT_USAGE)

    from simzss.cli.options import DeviceError, resolve_device
    from simzss.io.load import load_model
    from simzss.logs import setup_logging

    setup_logging()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page phones nobody
    try:
        model = load_model(args.model, resolve_device(args.device))
    except (DeviceError, FileNotFoundError, ValueError, RuntimeError) as e:  # ExportError is a RuntimeError
        return fail("serve", str(e), EXIT_USAGE)
    app = build_app(model, str(args.model), slide=SlideSettings(args.short_side, args.crop, args.stride),
                    default_labels=args.labels, max_pixels=args.max_pixels)
    print(f"serving {args.model} on http://{args.host}:{args.port}  (Ctrl+C stops)", flush=True)
    try:
        app.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, show_error=True,
                   quiet=True)
    except OSError as e:  # port taken, address not available
        return fail("serve", f"cannot listen on {args.host}:{args.port}: {e}", EXIT_FAILED)
    return 0


__all__ = ["SlideSettings", "segment_for_page", "build_app", "build_parser", "main"]
