"""matplotlib set-up shared by the report pictures: the headless Agg backend and atomic PNG writes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # pictures are files; never open a window (works without a display)

import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
from matplotlib.figure import Figure  # noqa: E402

from simzss.data.shards import atomic_path  # noqa: E402

DPI = 110


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (temp file + rename, the user's umask), then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    finally:
        plt.close(fig)
    return path


def slug(text: str) -> str:
    """A file-name-safe version of a model or dataset spec (``gem:ViT-B-16/openai`` -> ``gem-ViT-B-16-openai``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return s[-80:] or "item"


__all__ = ["plt", "DPI", "save_figure", "slug"]
