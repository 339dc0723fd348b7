"""benchmarks/bench_e2e.py on the CPU path (small model, a few photo-like samples): it runs the real trainer and its
JSON is self-consistent (sample counts, fractions, rates against the wall clock and the model-only bound)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("bench_e2e", "photo_shards", "common"):
        sys.modules.pop(name, None)
    import bench_e2e

    return bench_e2e


def test_photo_like_jpegs_are_coco_sized() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from photo_shards import HEIGHT, WIDTH, photo_jpeg
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    data = photo_jpeg(3)
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (WIDTH, HEIGHT) == (640, 480) and img.format == "JPEG"
        assert len(set(img.convert("L").resize((64, 48)).getdata())) > 40  # not flat
    assert 70_000 < len(data) < 140_000  # about 100 KB, like a COCO photo
    assert photo_jpeg(3) == data and photo_jpeg(4) != data  # deterministic per seed


@pytest.mark.slow
def test_cpu_path_reports_consistent_figures(bench, tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    assert bench.main(["--device", "cpu", "--small", "--batch", "16", "--samples", "40", "--epochs", "2",
                       "--workers", "0", "--model-only-steps", "4", "--data", str(tmp_path / "shards"),
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["samples"] == 40 and 70 < report["mean_jpeg_kb"] < 140
    (run,) = report["runs"]
    assert run["batch"] == 16 and run["steps_per_epoch"] == 40 // 16 == 2
    assert run["steps"] == 2 * 2 and run["samples_trained"] == run["steps"] * 16
    for key in ("gpu_wait_fraction", "gpu_wait_fraction_incl_start"):
        assert 0.0 <= run[key] <= 1.0, key
    # the end-to-end run cannot be much faster than the same step with its batch already on the device (a wide
    # margin: on a shared 2-core machine the two runs see different loads), and its rate fits the wall time
    assert run["wall_img_per_s"] > 0 and run["model_only_img_per_s"] > 0
    assert run["wall_img_per_s"] <= 3 * run["model_only_img_per_s"]
    assert run["wall_img_per_s"] * run["measured_seconds"] <= run["samples_trained"] + 1e-6
    assert run["ratio_to_model_only"] == pytest.approx(run["wall_img_per_s"] / run["model_only_img_per_s"], rel=1e-3)
    assert run["measured_seconds"] <= sum(run["epoch_seconds"]) + 1e-6
    # the logged windows account for every trained sample, and lie inside fit() as timed from outside the trainer
    assert run["wall_img_per_s_incl_start"] * run["measured_seconds_incl_start"] == pytest.approx(
        run["samples_trained"], rel=1e-3)
    assert run["measured_seconds_incl_start"] <= run["fit_seconds"]
    assert run["fit_img_per_s"] <= run["wall_img_per_s_incl_start"] * 1.001
    assert len(run["epoch_seconds"]) == 2
    # shards are reused by a second call with the same sample count (the marker records it)
    marker = json.loads((tmp_path / "shards" / "photo_shards.json").read_text())
    assert marker["samples"] == 40 and len(list((tmp_path / "shards").glob("*.tar"))) == 1
    assert run["shards_indexed"] == 1  # indexed as simzss's own shard writers index them


@pytest.mark.slow
def test_variants_run_the_same_shards_through_other_input_paths(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "e2e.json"
    assert bench.main(["--device", "cpu", "--small", "--batch", "16", "--samples", "32", "--epochs", "1",
                       "--workers", "0", "--model-only-steps", "2", "--data", str(tmp_path / "shards"),
                       "--variants", "resized", "pil", "--resize-short", "128", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [run["variant"] for run in report["runs"]] == ["resized", "pil"]
    resized, pil = report["runs"]
    assert resized["shards_indexed"] == pil["shards_indexed"] == 1
    assert report["resize_short"] == 128 and report["resize_seconds"] >= 0
    # the resized shards hold the same samples with smaller images; pil reads the originals
    assert resized["mean_jpeg_kb"] < pil["mean_jpeg_kb"] / 3 and pil["mean_jpeg_kb"] == report["mean_jpeg_kb"]
    for path in sorted((tmp_path / "shards_resized128").glob("*.tar")):
        import tarfile

        with tarfile.open(path) as tar:
            jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
            assert len(jpgs) == 32
            with Image.open(tar.extractfile(jpgs[0])) as img:
                assert min(img.size) == 128
    assert resized["steps"] == pil["steps"] == 2
    # each finished run was written to stderr as it ended (what survives a time limit)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [line["variant"] for line in lines] == ["resized", "pil"] and lines[0] == resized


def test_gpu_variant_needs_a_gpu(bench) -> None:
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench.main(["--device", "cpu", "--small", "--variants", "gpu"])
