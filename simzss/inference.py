"""Segment one picture with free-form labels: ``segment_pil`` (sliding-window zero-shot segmentation,
:func:`simzss.models.zeroshot.segment_image`), ``render_overlay`` (the picture with a semi-transparent colour
overlay and a legend below it) and ``save_picture`` (atomic, umask-following writes).

The command ``simzss segment`` that uses them is :mod:`simzss.cli.segment`.
"""

from __future__ import annotations

import colorsys
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from simzss.data.shards import current_umask
from simzss.data.transforms import image_to_tensor, load_image
from simzss.models.simzss import SimZSS
from simzss.models.zeroshot import get_mean_std, model_device, segment_image, text_classifier

logger = logging.getLogger(__name__)

MAX_LABELS = 256  # the label map is uint8

# Distinct, colour-blind-friendlier first colours (Tableau 10 + extras); more are generated on the hue circle.
_BASE_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229), (57, 59, 121),
)


def label_colors(n: int) -> np.ndarray:
    """``n`` distinct RGB colours as a uint8 ``[n, 3]`` array (deterministic: label i always gets the same colour)."""
    colors = list(_BASE_COLORS[:n])
    golden = 0.618033988749895
    i = 0
    while len(colors) < n:
        h = (i * golden) % 1.0
        s, v = (0.65, 0.95) if i % 2 == 0 else (0.9, 0.7)
        colors.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)))
        i += 1
    return np.asarray(colors, dtype=np.uint8).reshape(n, 3)


def parse_labels(text: str) -> List[str]:
    """Split a comma-separated label list; blanks are dropped, duplicates are an error (they would share pixels)."""
    labels = [s.strip() for s in text.split(",") if s.strip()]
    if not labels:
        raise ValueError("no labels given: pass a comma-separated list, e.g. --labels \"cat,grass,sky\"")
    dupes = sorted({s for s in labels if labels.count(s) > 1})
    if dupes:
        raise ValueError(f"duplicate labels: {', '.join(dupes)}")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels (the mask is uint8), got {len(labels)}")
    return labels


@torch.inference_mode()
def segment_pil(
    model: SimZSS,
    image: Image.Image,
    labels: Sequence[str],
    *,
    templates: str | Sequence[str] = "single",
    short_side: int = 448,
    crop: int = 448,
    stride: int = 224,
    window_batch: int = 16,
    **slide_kw: Any,
) -> Tuple[np.ndarray, torch.Tensor]:
    """Zero-shot segmentation of one PIL picture into ``labels``.

    ``templates`` is a built-in template set name (``single``, ``imagenet80``, ``tcl9``) or a list of prompts
    with ``{}``; extra keywords go to :func:`simzss.models.zeroshot.segment_image`. Returns the label map (uint8
    ``[H, W]``, index into ``labels``) and the per-label probabilities (float ``[C, H, W]`` on the CPU) at the
    picture's size. With ``background="threshold"`` channel/index 0 is background and label i is index i + 1.
    """
    labels = list(labels)
    if not labels:
        raise ValueError("no labels given")
    channels = len(labels) + (1 if slide_kw.get("background") == "threshold" else 0)
    if channels > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} classes (the label map is uint8), got {channels}")
    model.eval()
    device = model_device(model)
    classifier = text_classifier(model, labels, templates)
    x = image_to_tensor(image, *get_mean_std(model)).to(device)
    scores = segment_image(
        model, x, classifier, short_side=short_side, crop=crop, stride=stride, window_batch=window_batch, **slide_kw
    )
    scores = scores.float().cpu()
    if tuple(scores.shape) != (channels, image.height, image.width):
        raise RuntimeError(
            f"segment_image returned scores of shape {tuple(scores.shape)}, expected "
            f"({channels}, {image.height}, {image.width})"
        )
    label_map = scores.argmax(0).to(torch.uint8).numpy()
    return label_map, scores


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: int) -> str:
    """``text``, shortened with an ellipsis so it is at most ``max_width`` pixels wide."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…" if text else ""


def render_overlay(
    image: Image.Image,
    label_map: np.ndarray,
    labels: Sequence[str],
    alpha: float = 0.5,
    *,
    colors: Optional[np.ndarray] = None,
    min_width: int = 0,
) -> Image.Image:
    """The picture with each label's pixels tinted in its colour, and a legend (swatch + name) added below.

    The result is RGB, as wide as ``image`` and taller by the legend. ``alpha`` is the overlay opacity.
    A picture narrower than ``min_width`` is first upscaled by a whole factor (label map: nearest), so that a
    small image still gives a readable overlay and legend.
    """
    label_map = np.asarray(label_map)
    if label_map.shape != (image.height, image.width):
        raise ValueError(f"label map shape {label_map.shape} does not match the image size {(image.height, image.width)}")
    if not labels:
        raise ValueError("no labels")
    if label_map.size and int(label_map.max()) >= len(labels):
        raise ValueError(f"label map has value {int(label_map.max())} but only {len(labels)} labels")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    palette = label_colors(len(labels)) if colors is None else np.asarray(colors, dtype=np.uint8)
    if palette.shape != (len(labels), 3):
        raise ValueError(f"colors must be [{len(labels)}, 3], got {palette.shape}")

    if image.width < min_width:
        factor = -(-min_width // image.width)
        size = (image.width * factor, image.height * factor)
        image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        label_map = np.kron(label_map, np.ones((factor, factor), dtype=label_map.dtype))
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint = palette[label_map.astype(np.int64)].astype(np.float32)
    blended = Image.fromarray(np.clip((1 - alpha) * base + alpha * tint + 0.5, 0, 255).astype(np.uint8))

    w = image.width
    font_size = int(np.clip(round(w / 32), 14, 28))
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, gap = max(4, font_size // 3), max(3, font_size // 4)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (font_size, 0)
    line_h = ascent + descent
    swatch = line_h
    # Flow the legend items left to right, wrapping to new rows; a too-long name is shortened with "…".
    items: List[Tuple[int, int, int, str]] = []  # (label index, x, row, text)
    x, row = pad, 0
    for i, name in enumerate(labels):
        text = _fit_text(measure, name, font, max(1, w - 2 * pad - swatch - gap))
        item_w = swatch + gap + int(np.ceil(measure.textlength(text, font=font)))
        if x > pad and x + item_w > w - pad:
            x, row = pad, row + 1
        items.append((i, x, row, text))
        x += item_w + 2 * gap + pad
    legend_h = pad + (row + 1) * (line_h + pad)

    out = Image.new("RGB", (w, image.height + legend_h), (255, 255, 255))
    out.paste(blended, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, x, r, text in items:
        y = image.height + pad + r * (line_h + pad)
        color = tuple(int(c) for c in palette[i])
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=color, outline=(0, 0, 0))
        draw.text((x + swatch + gap, y), text, fill=(0, 0, 0), font=font)
    return out


def save_picture(image: Image.Image, path: Path, fmt: Optional[str] = None) -> None:
    """Save a picture via a temp file in the same folder + rename, so a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown picture format {path.suffix!r}; use .png or .jpg")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format=fmt)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "label_colors",
    "parse_labels",
    "load_image",
    "image_to_tensor",
    "segment_pil",
    "render_overlay",
    "save_picture",
]

_save_atomic = save_picture  # the former private name (tests/faults/test_fault_permissions.py)
