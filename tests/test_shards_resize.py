"""Pre-resized shards (issue 16 item 4): img2dataset's keep_ratio convention, `simzss shards resize` keeping every
other member, resumable with fingerprints, and `shards table --resize-short`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from simzss.cli import main as simzss
from simzss.data.convert.resize import ResizeOptions, resize_image, resized_size
from simzss.data.shards import iter_samples, read_fingerprints, read_sizes, write_shard


def _photo(width: int, height: int, seed: int = 0, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1).astype(np.float32)
    img += rng.normal(0, 6, img.shape)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(buf, format=fmt, exif=exif, quality=92)
    else:
        im.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_resized_size_is_img2dataset_keep_ratio() -> None:
    assert resized_size(640, 480, 288) == (384, 288)
    assert resized_size(480, 640, 288) == (288, 384)
    assert resized_size(1000, 333, 100) == (300, 100)
    assert resized_size(300, 200, 288) == (300, 200)  # short side 200 <= 288: never upscaled
    assert resized_size(288, 500, 288) == (288, 500)


def test_resize_image_matches_an_independent_reference() -> None:
    data = _photo(640, 480)
    out = resize_image(data, ResizeOptions(288, 95))
    assert out is not None and out[:2] == b"\xff\xd8"
    got = np.asarray(Image.open(io.BytesIO(out)).convert("RGB"), dtype=np.float32)
    ref_img = Image.open(io.BytesIO(data)).convert("RGB").resize((384, 288), Image.Resampling.LANCZOS)
    ref = np.asarray(ref_img, dtype=np.float32)
    assert got.shape == (288, 384, 3)
    assert np.abs(got - ref).mean() < 2.0  # JPEG re-encoding at q95 only
    assert len(out) < len(data)


def test_small_images_keep_their_bytes_and_orientation_is_applied() -> None:
    assert resize_image(_photo(300, 200), ResizeOptions(288)) is None  # short side 200: kept as is
    # EXIF orientation 6 (rotate 90 cw on display): stored 640x480, displayed 480x640
    rotated = _photo(640, 480, orientation=6)
    out = resize_image(rotated, ResizeOptions(288))
    assert Image.open(io.BytesIO(out)).size == (288, 384)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(rotated))).convert("RGB").resize((288, 384))
    got = Image.open(io.BytesIO(out)).convert("RGB")
    assert np.abs(np.asarray(got, np.float32) - np.asarray(expected, np.float32)).mean() < 4.0
    png = resize_image(_photo(600, 400, fmt="PNG"), ResizeOptions(100))
    assert png[:2] == b"\xff\xd8" and Image.open(io.BytesIO(png)).size == (150, 100)
    with pytest.raises(ValueError, match="resize-short"):
        ResizeOptions(0)


def test_shards_resize_keeps_other_members_resumes_and_redoes_on_new_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    big, small = _photo(200, 160, 1), _photo(60, 40, 2)
    for n in range(2):
        write_shard(src / f"{n:05d}.tar", [
            {"__key__": f"{n}a", "jpg": big, "txt": "a dog", "json": {"id": 1}, "concepts.json": b'{"version": 1}'},
            {"__key__": f"{n}b", "png": _photo(120, 90, 3, fmt="PNG"), "txt": "a cat", "json": {"id": 2}},
            {"__key__": f"{n}c", "jpg": small, "txt": "a car"},
            {"__key__": f"{n}d", "jpg": b"\xff\xd8 not an image", "txt": "broken"},
        ])
    out = tmp_path / "out"
    argv = ["shards", "resize", str(src), "--out", str(out), "--resize-short", "64", "--no-progress"]
    assert simzss(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_written"] == 2 and summary["samples"] == 6
    assert summary["images"] == {"resized": 4, "kept_as_is": 2, "unreadable_image": 2}
    assert read_sizes(out) == {"00000.tar": 3, "00001.tar": 3}
    a, b, c = list(iter_samples(out / "00000.tar"))
    assert Image.open(io.BytesIO(a["jpg"])).size == (80, 64)
    assert (a["txt"], a["json"], a["concepts.json"]) == (b"a dog", b'{"id": 1}', b'{"version": 1}')
    assert "png" not in b and Image.open(io.BytesIO(b["jpg"])).size == (85, 64)  # re-encoded as JPEG
    assert c["jpg"] == small  # already small: the very bytes
    assert read_fingerprints(out)["00000.tar"]["made_with"] == {"resize_short": 64, "jpeg_quality": 95}

    assert simzss(argv) == 0  # nothing changed: kept
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 2
    assert simzss([*argv, "--jpeg-quality", "80"]) == 0  # other settings: redone
    assert json.loads(capsys.readouterr().out)["shards_written"] == 2
    assert simzss(["shards", "resize", str(tmp_path / "missing.tar"), "--out", str(out), "--resize-short", "8"]) == 2
    assert "not found" in capsys.readouterr().err


def test_the_light_parser_defaults_match_the_library() -> None:
    from simzss.cli import shards as cli
    from simzss.data.convert import coco, resize, table
    from simzss.data.transforms import DEFAULT_MAX_IMAGE_PIXELS

    assert cli.DEFAULT_JPEG_QUALITY == resize.DEFAULT_JPEG_QUALITY
    assert cli.DEFAULT_MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS
    assert (cli.DEFAULT_IMAGE_COLUMN, cli.DEFAULT_CAPTION_COLUMN) == (table.DEFAULT_IMAGE_COLUMN,
                                                                     table.DEFAULT_CAPTION_COLUMN)
    assert cli.KARPATHY_SPLITS == coco.KARPATHY_SPLITS


def test_shards_resize_redoes_a_changed_input_and_refuses_leftovers_of_a_gone_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19 item 1 for `shards resize`: an input rewritten under the same name is redone without being asked; an
    output whose input left the input folder would be read by train with the new ones: refused, then removed with
    --overwrite."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for n in range(2):
        write_shard(src / f"{n:05d}.tar", [{"__key__": f"{n}a", "jpg": _photo(120, 90, n), "txt": "a dog"}])
    argv = ["shards", "resize", str(src), "--out", str(out), "--resize-short", "32", "--no-progress"]
    assert simzss(argv) == 0
    capsys.readouterr()

    write_shard(src / "00000.tar", [{"__key__": f"new{i}", "jpg": _photo(100, 80, 9), "txt": "a cat"} for i in range(2)])
    assert simzss(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["shards_written"], summary["shards_skipped"]) == (1, 1)
    assert [s["__key__"] for s in iter_samples(out / "00000.tar")] == ["new0", "new1"]
    assert read_sizes(out) == {"00000.tar": 2, "00001.tar": 1}

    (src / "00001.tar").unlink()
    assert simzss(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "00001.tar" in err and "--overwrite" in err
    assert (out / "00001.tar").exists()  # refused: nothing touched
    assert simzss([*argv, "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stale_shards_removed"] == 1 and not (out / "00001.tar").exists()
    assert read_sizes(out) == {"00000.tar": 2}
