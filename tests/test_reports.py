"""Evaluation reports and training curves: the PNGs are opened and checked, report.md links them, the comparison
table and confused pairs are checked against hand-computed values, and the commands fail cleanly on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simzss.cli.plot import main as plot_main
from simzss.cli.report import main as report_main
from simzss.reports.curves import plot_training_curves, read_metrics
from simzss.reports.segmentation_report import (
    ModelRun, comparison_table, confused_pairs, dataset_palette, load_results, variant_warnings, voc_colormap,
    write_report,
)

NAMES = ["background", "cat", "dog", "grass"]


def _result(miou: float, conf: np.ndarray | None = None, samples: list | None = None, dataset: str = "voc") -> dict:
    per_class = {n: v for n, v in zip(NAMES, [90.0, miou, 10.0, None])}
    r = {"mIoU": miou, "pixel_acc": 80.0, "per_class": per_class, "num_images": 3, "dataset": dataset,
         "background": "threshold", "bg_threshold": 0.95, "templates": "single"}
    if conf is not None:
        r["confusion"] = conf.tolist()
    if samples is not None:
        r["samples"] = samples
    return r


def _samples(n: int = 2) -> list:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        mask = np.zeros((40, 60), np.uint8)
        mask[:, 20:40] = 1  # cat
        mask[30:] = 3  # grass
        mask[:2] = 255  # ignored
        pred = mask.copy()
        pred[pred == 255] = 0
        pred[:, 50:] = 2  # dog, wrongly
        out.append({"key": f"img{i}", "image": rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), "mask": mask,
                    "pred": pred})
    return out


def _open_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _assert_picture(path: Path, min_w: int = 300, min_h: int = 150) -> np.ndarray:
    """A readable picture: big enough, not blank (many distinct colours, real contrast)."""
    a = _open_png(path)
    assert a.shape[1] >= min_w and a.shape[0] >= min_h, a.shape
    assert a.std() > 10 and len(np.unique(a.reshape(-1, 3), axis=0)) > 20
    return a


def _has_color(a: np.ndarray, rgb, min_pixels: int = 20) -> bool:
    return int((a.reshape(-1, 3) == np.asarray(rgb, np.uint8)).all(axis=1).sum()) >= min_pixels


def test_voc_palette_is_the_standard_one() -> None:
    cmap = voc_colormap(21)
    # Pascal VOC: background black, aeroplane (128,0,0), bicycle (0,128,0), bird (128,128,0), person (192,128,128)
    assert cmap[0].tolist() == [0, 0, 0] and cmap[1].tolist() == [128, 0, 0] and cmap[2].tolist() == [0, 128, 0]
    assert cmap[3].tolist() == [128, 128, 0] and cmap[15].tolist() == [192, 128, 128]
    # voc20 (no background channel) keeps each class's VOC colour
    assert dataset_palette("voc20", 20, False)[0].tolist() == [128, 0, 0]
    assert dataset_palette("cityscapes", 19, False)[0].tolist() == [128, 64, 128]  # road
    folder = dataset_palette("folder", 16, False).astype(int)  # no standard palette: clearly different colours
    gaps = np.abs(folder[:, None] - folder[None]).sum(-1) + 999 * np.eye(16, dtype=int)
    assert gaps.min() > 60


def test_confused_pairs_by_hand() -> None:
    conf = np.array([[50, 5, 0, 0],
                     [2, 30, 20, 0],   # cat -> dog: 20 px = 40% of cat
                     [0, 8, 40, 0],    # dog -> cat: 8 px = 1/6 of dog
                     [0, 0, 0, 0]])
    pairs = confused_pairs(conf, NAMES, top=3)
    assert [(p["gt"], p["pred"], p["pixels"]) for p in pairs] == [("cat", "dog", 20), ("dog", "cat", 8),
                                                                  ("background", "cat", 5)]
    assert pairs[0]["share"] == pytest.approx(20 / 52) and pairs[1]["share"] == pytest.approx(8 / 48)
    assert confused_pairs(np.eye(4, dtype=int) * 7, NAMES) == []  # nothing confused
    with pytest.raises(ValueError, match="does not match"):
        confused_pairs(conf, NAMES[:3])


def test_write_report_pictures_and_table(tmp_path) -> None:
    conf = np.array([[50, 5, 0, 0], [2, 30, 20, 0], [0, 8, 40, 0], [0, 0, 3, 60]])
    runs = [
        ModelRun("exports/simzss", {"voc:/d": _result(60.0, conf, _samples()), "context60:/d": _result(30.0)}),
        ModelRun("gem:ViT-B-16/openai", {"voc:/d": _result(45.5, conf), "context60:/d": _result(35.25)}),
    ]
    report = write_report(tmp_path / "rep", runs)
    md = report.read_text()
    links = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 2 + 1 + 1 + 2 + 1  # iou x4, confusion x2 (voc only), samples x1
    for link in links:
        assert (report.parent / link).is_file(), link
    pngs = sorted(report.parent.rglob("*.png"))
    assert len(pngs) == len(links)
    for png in pngs:
        _assert_picture(png)
    # comparison table: a row per model, best per dataset in bold, the mean over datasets
    assert "| `exports/simzss` | not recorded | **60.0** | 30.0 | 45.0 |" in md
    assert "| `gem:ViT-B-16/openai` | not recorded | 45.5 | **35.2** | 40.4 |" in md  # 35.25 -> 35.2 (half to even)
    assert "| cat | dog | 38.5% | 20 |" in md  # the top confused pair, share of the cat pixels
    # the sample grid shows ground truth and prediction in the VOC palette (cat = VOC class 1, dog = class 2)
    grid = _open_png(next(p for p in pngs if p.name == "samples.png"))
    pal = dataset_palette("voc", 4, True)
    assert _has_color(grid, pal[1]) and _has_color(grid, pal[2]) and _has_color(grid, pal[3])


def test_per_class_chart_sorted_best_first(tmp_path) -> None:
    """The bars are sorted by IoU: the longest bar is at the top (checked on the pixels of the chart)."""
    from simzss.reports.segmentation_report import plot_per_class_iou

    path = plot_per_class_iou({"a": 10.0, "b": 80.0, "c": 40.0, "d": None}, 43.3, tmp_path / "iou.png")
    a = _assert_picture(path)
    dark = (a.sum(axis=2) < 600) & (np.abs(a.astype(int) - a.mean(axis=2, keepdims=True)).sum(axis=2) > 30)
    dark &= ~((a[..., 0] > 150) & (a[..., 1] < 110))  # not the crimson mIoU line and its label
    rows = [r for r in range(a.shape[0]) if dark[r].sum() > 15]  # rows crossing a coloured bar
    bars = np.split(rows, np.where(np.diff(rows) > 1)[0] + 1)
    lengths = [int(dark[b[len(b) // 2]].sum()) for b in bars if len(b) > 3]
    assert len(lengths) == 3 and lengths == sorted(lengths, reverse=True)


def test_report_command_from_eval_json(tmp_path, capsys) -> None:
    a = {"model": "exports/a", "task": "segmentation", "results": {"voc:/d": _result(50.0)}}
    b = {"step": 300, "results": {"voc:/d": _result(40.0)}}  # a trainer's RUN/eval.json
    (tmp_path / "run").mkdir()
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "run" / "eval.json").write_text(json.dumps(b))
    out = tmp_path / "rep"
    assert report_main([str(tmp_path / "a.json"), str(tmp_path / "run" / "eval.json"), "--out", str(out),
                        "--labels", "A", "B"]) == 0
    md = (out / "report.md").read_text()
    assert "| `A` | not recorded | **50.0** | 50.0 |" in md and "| `B` | not recorded | 40.0 | 40.0 |" in md
    assert len(list(out.rglob("iou.png"))) == 2 and not list(out.rglob("confusion.png"))
    assert [r.label for r in load_results(tmp_path / "run" / "eval.json")] == ["run step 300"]
    # bad input named by the user: one line, exit 2 (the CLI convention for usage errors)
    (tmp_path / "bad.json").write_text("{not json")
    assert report_main([str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "cannot read results JSON" in capsys.readouterr().err
    (tmp_path / "cls.json").write_text(json.dumps({"task": "classification", "results": {}}))
    assert report_main([str(tmp_path / "cls.json"), "--out", str(out)]) == 2
    assert "segmentation results only" in capsys.readouterr().err
    assert report_main([str(tmp_path / "a.json"), "--labels", "x", "y", "--out", str(out)]) == 2
    assert "2 names for 1 models" in capsys.readouterr().err


def test_comparison_table_with_missing_dataset() -> None:
    runs = [ModelRun("a", {"voc:/d": _result(50.0), "ade20k:/d": _result(20.0)}), ModelRun("b", {"voc:/d": _result(60.0)})]
    table = comparison_table(runs)
    assert "| `a` | not recorded | 50.0 | **20.0** | 35.0 |" in table and "| `b` | not recorded | **60.0** | — | — |" in table


def test_report_names_the_variant_and_flags_mixed_ones(tmp_path) -> None:
    """A comparison can never mix MaskCLIP variants silently: the table names each run's variant, results written
    before variants were recorded are flagged (an old `maskclip:` file was the residual-free variant), and one
    spec kind in two variants is called out."""
    new = "maskclip (authors' code: value path + last block's residual and MLP; bicubic pos-embed, no antialias)"
    nores = "maskclip-nores (value path only, no residual or MLP; bicubic pos-embed, no antialias)"
    runs = [
        ModelRun("maskclip:ViT-B-16/openai", {"voc:/d": {**_result(40.0), "model_variant": new}}),
        ModelRun("maskclip-nores:ViT-B-16/openai", {"voc:/d": {**_result(30.0), "model_variant": nores}}),
        ModelRun("maskclip:ViT-B-16/openai", {"voc:/d": _result(20.0)}),  # an old eval.json, no variant
    ]
    assert runs[0].variant == new and runs[1].variant == nores
    assert runs[2].variant.startswith("maskclip-nores (before 2026-12-04")
    table = comparison_table(runs)
    assert f"| `maskclip:ViT-B-16/openai` | {new} | **40.0** | 40.0 |" in table
    assert f"| `maskclip-nores:ViT-B-16/openai` | {nores} | 30.0 | 30.0 |" in table
    md = write_report(tmp_path / "rep", runs).read_text()
    assert "Variants to check before comparing:" in md
    assert "do not record the model variant" in md and "`maskclip:` appears in 2 variants" in md
    assert md.count("Variant: ") == 3
    # recorded variants, one per kind: nothing to flag
    assert variant_warnings(runs[:2]) == []


def _drawn(monkeypatch, draw):
    """Run ``draw`` and return its figure as it is saved (the PNG is still written), drawn for measuring."""
    import simzss.reports.segmentation_report as rep

    figs = []
    real = rep.save_figure

    def keep(fig, path):
        fig.canvas.draw()
        figs.append((fig, fig.canvas.get_renderer()))
        return real(fig, path)

    monkeypatch.setattr(rep, "save_figure", keep)
    path = draw()
    return path, figs[0]


def test_iou_value_labels_never_touch_the_miou_line(tmp_path, monkeypatch) -> None:
    from simzss.reports.segmentation_report import plot_per_class_iou

    per_class = {f"class {i}": v for i, v in enumerate([91.0, 48.0, 47.5, 46.0, 44.0, 12.0, 3.0, 0.0])}
    path, (fig, renderer) = _drawn(monkeypatch, lambda: plot_per_class_iou(per_class, 46.4, tmp_path / "iou.png"))
    _assert_picture(path)
    ax = fig.axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_linestyle() == "--")
    x_line = ax.transData.transform((46.4, 0))[0]
    values = [t for t in ax.texts if t.get_text().replace(".", "").isdigit()]
    assert sorted(t.get_text() for t in values) == sorted(f"{v:.1f}" for v in per_class.values())
    bars = [b.get_window_extent(renderer) for b in ax.patches]
    for t in values:
        box = t.get_window_extent(renderer)
        assert not box.x0 - 2 <= x_line <= box.x1 + 2, t.get_text()  # clear of the dashed line
        assert all(box.x0 >= b.x1 for b in bars)  # and of every bar
    label = next(t for t in ax.texts if t.get_text() == "mIoU 46.4")
    assert label.get_window_extent(renderer).y0 >= ax.get_window_extent(renderer).y1 - 1  # above the plot
    assert line.get_xdata()[0] == 46.4


def test_confused_pairs_sorted_and_drawn_by_pixels(tmp_path, monkeypatch) -> None:
    from simzss.reports.segmentation_report import plot_confusion_summary

    # the pair with the most pixels has the smallest share of its class: bars must follow the pixels
    pairs = [{"gt": "sky", "pred": "sea", "pixels": 5000, "share": 0.05},
             {"gt": "cat", "pred": "dog", "pixels": 900, "share": 0.60},
             {"gt": "cup", "pred": "table", "pixels": 40, "share": 0.90}]
    path, (fig, renderer) = _drawn(monkeypatch, lambda: plot_confusion_summary(pairs[::-1], tmp_path / "c.png"))
    _assert_picture(path, 300, 120)
    ax = fig.axes[0]
    widths = [b.get_width() for b in ax.patches]
    assert widths == [5000, 900, 40]  # drawn as pixels, most first (top to bottom)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sky → sea", "cat → dog", "cup → table"]
    assert "pixels" in ax.get_xlabel() and "ground truth" in ax.get_ylabel()
    assert any(t.get_text() == "5,000 px (5.0% of sky)" for t in ax.texts)


# ----------------------------------------------------------------------------------------------- curves


def _write_run(folder: Path, scale: float, eval_step: int | None = 20) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for step in range(5, 45, 5):
        lines.append(json.dumps({"step": step, "loss": scale * 5 / step, "global_loss": scale * 4 / step,
                                 "concept_loss": scale / step, "concept_accuracy": min(1, step / 40 * scale),
                                 "lr": 1e-3 * min(1, step / 10), "logit_scale": 14 + step / 10,
                                 "samples_per_s_per_gpu": 100 * scale, "grad_norm": float("nan")}))
        if eval_step and step == eval_step:
            lines.append(json.dumps({"step": step, "eval/folder:val/mIoU": 30 * scale}))
    lines.insert(3, "garbage that is not json")
    # a resume re-logs step 15 with a new value: the later one wins
    lines.append(json.dumps({"step": 15, "loss": 123.0}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_read_metrics_dedupes_and_counts_bad_lines(tmp_path) -> None:
    run = read_metrics(_write_run(tmp_path / "r", 1.0))
    steps, vals = run.series["loss"]
    assert steps.tolist() == [5, 10, 15, 20, 25, 30, 35, 40] and vals[2] == 123.0
    assert run.skipped_lines == 1 and "grad_norm" not in run.series  # NaN values are dropped
    assert run.series["eval/folder:val/mIoU"][0].tolist() == [20] and run.label == "r"


def test_plot_command_overlays_runs(tmp_path, capsys) -> None:
    a, b = _write_run(tmp_path / "simzss", 1.0), _write_run(tmp_path / "lit", 0.5, eval_step=None)
    out = tmp_path / "curves.png"
    assert plot_main([str(a), str(b), "--out", str(out), "--labels", "SimZSS", "LiT", "--title", "toy"]) == 0
    img = _assert_picture(out, 1200, 500)
    # both runs are drawn, each in its own colour (matplotlib's first two cycle colours)
    assert _has_color(img, (31, 119, 180), 200) and _has_color(img, (255, 127, 14), 200)
    assert plot_main([str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert plot_main([str(a), "--labels", "x", "y", "--out", str(out)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metrics"):
        plot_training_curves([read_metrics(empty)], tmp_path / "x.png")
