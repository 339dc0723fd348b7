"""Segmentation evaluation pictures and ``report.md``: per-class IoU, most-confused pairs, sample grids, comparison.

Input is the payload ``simzss eval --out`` writes (``{"model", "task", "results": {DATASET_SPEC: result}}``, a
``result`` being :func:`simzss.eval.segmentation.evaluate_segmentation`'s dict, optionally with ``"confusion"``
and ``"samples"``), or a trainer's ``RUN/eval.json`` (``{"step", "results"}``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import matplotlib.ticker
import numpy as np
from matplotlib.patches import Patch

from simzss.data.shards import atomic_write_bytes
from simzss.reports.figures import plt, save_figure, slug

IGNORE_INDEX = 255
IGNORE_COLOR = (255, 255, 255)

# Cityscapes' official colours of the 19 train ids.
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)


def voc_colormap(n: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved class ids; 0 = black background), ``[n, 3]`` uint8."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def distinct_colors(n: int) -> np.ndarray:
    """Up to 20 clearly different colours (matplotlib's tab20, saturated shades first), ``[n, 3]`` uint8."""
    tab = np.asarray(plt.get_cmap("tab20").colors)
    return np.round(255 * np.concatenate([tab[0::2], tab[1::2]])[:n]).astype(np.uint8)


def dataset_palette(dataset: str, num_classes: int, has_background: bool) -> np.ndarray:
    """Colours of a dataset's class ids: Cityscapes' own for cityscapes; the VOC colour map for the benchmark
    datasets (VOC and Context show their usual colours; without a background class ids start at the first
    non-black colour); a folder dataset of up to 20 classes gets 20 clearly different colours."""
    if dataset == "cityscapes" and num_classes == len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE.copy()
    if dataset == "folder" and num_classes <= 20:
        return distinct_colors(num_classes)
    offset = 0 if has_background else 1
    return voc_colormap(num_classes + offset)[offset:]


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """A class-id map as an RGB picture; ignore (255) and out-of-range ids are white."""
    lut = np.tile(np.array(IGNORE_COLOR, dtype=np.uint8), (256, 1))
    n = min(len(palette), 255)
    lut[:n] = palette[:n]
    return lut[np.asarray(labels, dtype=np.uint8)]


# ------------------------------------------------------------------------------------------------ numbers


def confused_pairs(confusion: Sequence[Sequence[int]], names: Sequence[str], top: int = 10) -> List[Dict[str, Any]]:
    """The ``top`` off-diagonal cells of a confusion matrix (rows = ground truth, cols = prediction) by pixel count:
    ``{"gt", "pred", "pixels", "share"}`` with share = fraction of the ground-truth class's pixels."""
    conf = np.asarray(confusion, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] != len(names):
        raise ValueError(f"confusion matrix of shape {conf.shape} does not match {len(names)} class names")
    off = conf.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:top]
    rows = conf.sum(axis=1)
    out = []
    for flat in order:
        i, j = divmod(int(flat), conf.shape[0])
        if off[i, j] <= 0:
            break
        out.append({"gt": names[i], "pred": names[j], "pixels": int(off[i, j]), "share": float(off[i, j] / rows[i])})
    return out


def _iou_items(per_class: Mapping[str, Optional[float]]) -> List[tuple]:
    """(name, IoU) of the classes with a defined IoU, best first."""
    items = [(k, float(v)) for k, v in per_class.items() if v is not None and not math.isnan(float(v))]
    return sorted(items, key=lambda kv: kv[1], reverse=True)


# ----------------------------------------------------------------------------------------------- pictures


def plot_per_class_iou(per_class: Mapping[str, Optional[float]], miou: float, path: str | os.PathLike,
                       title: str = "") -> Path:
    """Horizontal bar chart of per-class IoU (x100), sorted best first, with the mIoU as a dashed line.

    The value of each bar is printed in a column right of the plot area and the mIoU is named above its line, so
    no label can sit on the line or on a bar."""
    items = _iou_items(per_class)
    n_undefined = len(per_class) - len(items)
    height = max(2.5, 0.24 * len(items) + 1.5)
    fig, ax = plt.subplots(figsize=(7.5, height))
    if items:
        names, vals = zip(*items)
        y = np.arange(len(items))
        ax.barh(y, vals, color=plt.cm.viridis(np.asarray(vals) / 100.0), edgecolor="black", linewidth=0.3)
        ax.set_yticks(y, labels=names, fontsize=9)
        ax.invert_yaxis()
        column = ax.get_yaxis_transform()  # x in axes fraction, y in data: a column right of the axes
        for yi, v in zip(y, vals):
            ax.text(1.01, yi, f"{v:.1f}", transform=column, va="center", ha="left", fontsize=7.5)
    if miou is not None and math.isfinite(miou):
        ax.axvline(miou, color="crimson", linestyle="--", linewidth=1.5)
        ax.annotate(f"mIoU {miou:.1f}", xy=(miou, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", color="crimson", fontsize=8.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_ylabel("class")
    plural = "class" if n_undefined == 1 else "classes"
    note = f" ({n_undefined} {plural} absent from GT and predictions)" if n_undefined else ""
    ax.set_title((title + "\n" if title else "") + "per-class IoU" + note, fontsize=10, pad=16)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_confusion_summary(pairs: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Bar chart of the most confused class pairs ("ground truth → predicted"), most pixels first: bar length =
    pixels of the ground-truth class predicted as the other class (the quantity the pairs are chosen and sorted
    by), annotated with that count and its share of the ground-truth class's pixels."""
    height = max(2.2, 0.32 * len(pairs) + 1.4)
    fig, ax = plt.subplots(figsize=(7.5, height))
    if pairs:
        pairs = sorted(pairs, key=lambda p: p["pixels"], reverse=True)
        labels = [f"{p['gt']} → {p['pred']}" for p in pairs]
        pixels = [int(p["pixels"]) for p in pairs]
        y = np.arange(len(pairs))
        ax.barh(y, pixels, color="indianred", edgecolor="black", linewidth=0.3)
        ax.set_yticks(y, labels=labels, fontsize=9)
        ax.invert_yaxis()
        top = max(pixels)
        for yi, p, n in zip(y, pairs, pixels):
            ax.text(n + top * 0.01, yi, f"{n:,} px ({100 * p['share']:.1f}% of {p['gt']})", va="center", fontsize=7.5)
        ax.set_xlim(0, top * 1.5)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    else:
        ax.text(0.5, 0.5, "no confusion: every labelled pixel is correct", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("pixels of the ground-truth class predicted as the other class")
    ax.set_ylabel("ground truth → predicted")
    ax.set_title((title + "\n" if title else "") + "most confused class pairs, by pixels", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_samples(samples: Sequence[Mapping[str, Any]], names: Sequence[str], palette: np.ndarray,
                 path: str | os.PathLike, title: str = "") -> Path:
    """Grid of images: one row per sample, columns image | ground truth | prediction in the dataset's palette,
    with a legend of the classes that appear (white = ignored pixels)."""
    if not samples:
        raise ValueError("no samples to draw")
    rows = len(samples)
    aspect = np.asarray(samples[0]["image"]).shape[1] / max(1, np.asarray(samples[0]["image"]).shape[0])
    cell = 2.6
    fig, axes = plt.subplots(rows, 3, figsize=(3 * cell * aspect, rows * cell + 0.9), squeeze=False)
    present: set = set()
    for r, s in enumerate(samples):
        mask, pred = np.asarray(s["mask"]), np.asarray(s["pred"])
        present |= {int(v) for v in np.unique(mask) if v != IGNORE_INDEX and v < len(names)}
        present |= {int(v) for v in np.unique(pred) if v < len(names)}
        panels = (np.asarray(s["image"]), colorize(mask, palette), colorize(pred, palette))
        for c, (ax, img) in enumerate(zip(axes[r], panels)):
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(("image", "ground truth", "prediction")[c], fontsize=10)
        axes[r][0].set_ylabel(str(s.get("key", r))[-24:], fontsize=8)
    handles = [Patch(facecolor=palette[i] / 255.0, edgecolor="black", label=names[i]) for i in sorted(present)]
    if any((np.asarray(s["mask"]) == IGNORE_INDEX).any() for s in samples):
        handles.append(Patch(facecolor="white", edgecolor="black", label="ignored"))
    ncol = max(1, min(len(handles), int(3 * cell * aspect / 1.3)))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    legend_rows = math.ceil(len(handles) / ncol)
    fig.tight_layout(rect=(0, min(0.4, 0.25 * legend_rows / (rows * cell + 0.9)), 1, 0.97 if title else 1))
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- report


#: Results written before variants were recorded: what a spec kind meant then, when it differs from now.
LEGACY_VARIANTS = {"maskclip": "maskclip-nores (before 2026-12-04, `maskclip:` was the residual-free value path)"}
UNRECORDED = "not recorded"


@dataclass
class ModelRun:
    """One model's results as the report sees them: a label and ``{dataset spec: result}``."""

    label: str
    results: Dict[str, Dict[str, Any]]
    source: str = ""
    failed: Dict[str, str] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """What produced the predictions (each result's ``"model_variant"``); for files written before variants
        were recorded, what the spec meant then (:data:`LEGACY_VARIANTS`), else ``"not recorded"``."""
        found = sorted({str(r["model_variant"]) for r in self.results.values() if r.get("model_variant")})
        if found:
            return " / ".join(found)
        return LEGACY_VARIANTS.get(self.label.split(":", 1)[0], UNRECORDED)


def load_results(path: str | os.PathLike) -> List[ModelRun]:
    """Model runs from a JSON file of ``simzss eval --out`` (one model, or ``{"runs": [...]}`` for several) or a
    trainer's ``RUN/eval.json``; ValueError naming the file when it is neither."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: cannot read results JSON ({e})") from None
    payloads = data.get("runs") if isinstance(data, dict) and "runs" in data else [data]
    runs = []
    for d in payloads:
        if not isinstance(d, dict) or not isinstance(d.get("results"), dict):
            raise ValueError(f"{p}: no 'results' mapping; expected the JSON of `simzss eval --out` or RUN/eval.json")
        if d.get("task", "segmentation") != "segmentation":
            raise ValueError(f"{p}: task {d.get('task')!r}; reports cover segmentation results only")
        label = d.get("model") or (f"{p.parent.name} step {d['step']}" if "step" in d else p.stem)
        runs.append(ModelRun(str(label), d["results"], source=str(p), failed=d.get("failed") or {}))
    return runs


def _dataset_names(result: Mapping[str, Any]) -> List[str]:
    return list(result.get("per_class", {}).keys())


def _fmt(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.1f}"


def comparison_table(runs: Sequence[ModelRun]) -> str:
    """Markdown table: one row per model, one mIoU column per dataset (best per column in bold), plus the mean."""
    datasets: List[str] = []
    for run in runs:
        datasets += [d for d in run.results if d not in datasets]
    def score(run: ModelRun, d: str) -> float:
        v = run.results.get(d, {}).get("mIoU")
        return -1.0 if v is None or math.isnan(v) else float(v)

    best = {d: max(score(r, d) for r in runs) for d in datasets}
    head = "| model | variant | " + " | ".join(f"{d} mIoU" for d in datasets) + " | mean |"
    lines = [head, "|" + "---|" * (len(datasets) + 3)]
    for run in runs:
        cells, vals = [], []
        for d in datasets:
            v = run.results.get(d, {}).get("mIoU")
            cell = _fmt(v)
            if v is not None and len(runs) > 1 and best[d] >= 0 and math.isclose(v, best[d]):
                cell = f"**{cell}**"
            cells.append(cell)
            if v is not None:
                vals.append(float(v))
        mean = _fmt(sum(vals) / len(vals)) if len(vals) == len(datasets) and vals else "—"
        lines.append(f"| `{run.label}` | {run.variant} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def variant_warnings(runs: Sequence[ModelRun]) -> List[str]:
    """Lines for ``report.md`` when a comparison could mix variants: a run whose variant is not recorded (or only
    inferred from an old spec), and one spec kind (``maskclip``, ``gem``, ...) present in different variants."""
    out = []
    for run in runs:
        if not any(r.get("model_variant") for r in run.results.values()):
            out.append(f"`{run.label}`: its results do not record the model variant (written before 2026-12-04); "
                       f"taken as: {run.variant}")
    kinds: Dict[str, set] = {}
    for run in runs:
        kinds.setdefault(run.label.split(":", 1)[0] if ":" in run.label else "", set()).add(run.variant)
    for kind, variants in kinds.items():
        if kind and len(variants) > 1:
            out.append(f"`{kind}:` appears in {len(variants)} variants: " + "; ".join(sorted(variants)))
    return out


def write_report(out_dir: str | os.PathLike, runs: Sequence[ModelRun], *, top_pairs: int = 10) -> Path:
    """Write the pictures of every (model, dataset) and ``report.md`` under ``out_dir``; returns the report path.

    Per model and dataset (folder ``MODEL/DATASET/``): ``iou.png`` always, ``confusion.png`` when the result has a
    confusion matrix, ``samples.png`` when it has samples. ``report.md`` starts with the comparison table.
    """
    if not runs:
        raise ValueError("no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Segmentation report", "", comparison_table(runs), ""]
    warnings = variant_warnings(runs)
    if warnings:
        md += ["Variants to check before comparing:", ""] + [f"- {w}" for w in warnings] + [""]
    failed = [(r.label, d, why) for r in runs for d, why in r.failed.items()]
    if failed:
        md += ["Failed datasets:", ""] + [f"- `{m}` / `{d}`: {why}" for m, d, why in failed] + [""]
    for mi, run in enumerate(runs):
        model_dir = f"{mi:02d}-{slug(run.label)}"
        md += [f"## `{run.label}`", "", f"Variant: {run.variant}", ""]
        for spec, res in run.results.items():
            names = _dataset_names(res)
            name = str(res.get("dataset") or spec.split(":", 1)[0])
            rel = Path(model_dir) / slug(spec)
            title = f"{run.label} — {spec}"
            miou = res.get("mIoU")
            md += [f"### {spec}", "",
                   f"mIoU **{_fmt(miou)}**, pixel accuracy {_fmt(res.get('pixel_acc'))}, "
                   f"{res.get('num_images', '?')} images, background: {res.get('background', 'none')}"
                   + (f" (threshold {res['bg_threshold']})" if res.get("bg_threshold") is not None else "")
                   + f", templates: {res.get('templates', '?')}", ""]
            plot_per_class_iou(res.get("per_class", {}), miou if miou is not None else float("nan"),
                               out / rel / "iou.png", title)
            md += [f"![per-class IoU]({(rel / 'iou.png').as_posix()})", ""]
            if res.get("confusion") is not None and names:
                pairs = confused_pairs(res["confusion"], names, top_pairs)
                plot_confusion_summary(pairs, out / rel / "confusion.png", title)
                md += [f"![most confused pairs]({(rel / 'confusion.png').as_posix()})", ""]
                if pairs:
                    md += ["| ground truth | predicted as | share of GT pixels | pixels |", "|---|---|---|---|"]
                    md += [f"| {p['gt']} | {p['pred']} | {100 * p['share']:.1f}% | {p['pixels']:,} |" for p in pairs]
                    md += [""]
            if res.get("samples") and names:
                has_bg = res.get("background") in ("threshold", "class")
                plot_samples(res["samples"], names, dataset_palette(name, len(names), has_bg),
                             out / rel / "samples.png", title)
                md += [f"![samples: image, ground truth, prediction]({(rel / 'samples.png').as_posix()})", ""]
    report = out / "report.md"
    atomic_write_bytes(report, ("\n".join(md).rstrip() + "\n").encode("utf-8"))
    return report


__all__ = [
    "CITYSCAPES_PALETTE", "voc_colormap", "distinct_colors", "dataset_palette", "colorize", "confused_pairs", "plot_per_class_iou",
    "plot_confusion_summary", "plot_samples", "ModelRun", "LEGACY_VARIANTS", "load_results", "comparison_table",
    "variant_warnings", "write_report",
]
