"""`simzss convert-benchmark` on tiny generated raw downloads: label ids after conversion, loaders before and after."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simzss.cli import main as simzss
from simzss.eval.datasets import DatasetError, build_segmentation_dataset


def _png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode=mode).save(path)


def _image(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, dtype=np.uint8)).save(path)


def test_cityscapes_label_ids_to_train_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "cityscapes"
    # labelIds -> trainIds, written out by hand from cityscapesscripts' table
    pairs = {7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18, 0: 255, 5: 255, 34: 255}
    ids = np.array(list(pairs), dtype=np.uint8)
    mask = np.tile(ids, (4, 1))
    stem = "frankfurt_000000_000294"
    _png(raw / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", mask)
    _image(raw / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", *mask.shape)
    with pytest.raises(DatasetError, match=r"simzss convert-benchmark cityscapes"):
        build_segmentation_dataset(f"cityscapes:{raw}")

    assert simzss(["convert-benchmark", "cityscapes", str(raw), "--out", str(raw), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["masks_written"] == 1
    # 34 is no Cityscapes labelId: ignored like the unevaluated ids, but counted, never silently
    assert summary["unknown_label_pixels"] == 4 and summary["unknown_label_values"] == {"34": 4}
    ds = build_segmentation_dataset(f"cityscapes:{raw}")
    _, got = ds[0]
    assert got.tolist() == np.tile(np.array(list(pairs.values())), (4, 1)).tolist()
    assert ds.classnames[13] == "car" and ds.classnames[18] == "bicycle"

    # into another folder: images are linked, not copied; a rerun keeps what exists
    out = tmp_path / "converted"
    assert simzss(["convert-benchmark", "cityscapes", str(raw), "--out", str(out), "--no-progress"]) == 0
    assert (out / "leftImg8bit" / "val").is_symlink()
    assert simzss(["convert-benchmark", "cityscapes", str(raw), "--out", str(out), "--no-progress"]) == 0
    assert "masks_existing" in capsys.readouterr().out
    assert build_segmentation_dataset(f"cityscapes:{out}")[0][1].tolist() == got.tolist()


def test_coco_stuff_and_object_from_stuffthingmaps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "coco"
    # stuffthingmaps value = COCO category id - 1. Expected ids written out by hand:
    # value: (coco_stuff 171-class id, coco_object id)
    table = {
        0: (0, 1),      # person (id 1), first thing
        2: (2, 3),      # car (id 3)
        12: (11, 12),   # stop sign (id 13): id 12 is unused, so things shift down by one from here
        89: (79, 80),   # toothbrush (id 90), last thing
        91: (80, 0),    # banner (id 92), first stuff -> background for coco_object
        181: (170, 0),  # wood (id 182), last stuff
        255: (255, 255),  # unlabeled
        11: (255, 255),  # an unused thing id never appears in real maps; it must not become a class
        200: (255, 255),  # no COCO category at all
    }
    values = np.array(list(table), dtype=np.uint8)
    mask = np.tile(values, (3, 1))
    _png(raw / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", mask)
    _image(raw / "val2017" / "000000000139.jpg", *mask.shape)

    for name, col in (("coco_stuff", 0), ("coco_object", 1)):
        out = tmp_path / name
        with pytest.raises(DatasetError, match=rf"simzss convert-benchmark {name}"):
            build_segmentation_dataset(f"{name}:{raw}")
        assert simzss(["convert-benchmark", name, str(raw), "--out", str(out), "--no-progress"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["unknown_label_values"] == {"11": 3, "200": 3}  # counted, stored as 255
        ds = build_segmentation_dataset(f"{name}:{out}")
        image, got = ds[0]
        assert got.tolist() == np.tile(np.array([v[col] for v in table.values()]), (3, 1)).tolist()
        assert image.size == (mask.shape[1], mask.shape[0])
    stuff = build_segmentation_dataset(f"coco_stuff:{tmp_path / 'coco_stuff'}")
    obj = build_segmentation_dataset(f"coco_object:{tmp_path / 'coco_object'}")
    assert len(stuff.classnames) == 171 and stuff.classnames[0] == "person" and stuff.classnames[2] == "car"
    assert len(obj.classnames) == 81 and obj.classnames[1] == "person" and obj.classnames[80] == "toothbrush"


def test_pascal_context_from_official_mat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    raw = tmp_path / "pascal"
    voc = raw / "VOCdevkit" / "VOC2010"
    # 459-label ids -> Context mask values (1..59 in alphabetical order, everything else background 0)
    table = {2: 1, 9: 2, 284: 37, 458: 59, 1: 0, 0: 0, 100: 0}  # aeroplane, bag, person, wood, accordion, -, other
    label_map = np.tile(np.array(list(table), dtype=np.uint16), (5, 1))
    (raw / "trainval").mkdir(parents=True)
    scipy_io.savemat(raw / "trainval" / "2008_000002.mat", {"LabelMap": label_map})
    scipy_io.savemat(raw / "trainval" / "2008_000008.mat", {"LabelMap": label_map})  # a train image
    for i in ("2008_000002", "2008_000003", "2008_000008"):
        _image(voc / "JPEGImages" / f"{i}.jpg", *label_map.shape)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000002\n2008_000003\n")  # 000003: no annotation

    with pytest.raises(DatasetError, match=r"simzss convert-benchmark context59"):
        build_segmentation_dataset(f"context59:{raw}")
    out = tmp_path / "context"
    assert simzss(["convert-benchmark", "context59", str(raw), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    c60 = build_segmentation_dataset(f"context60:{out}")
    assert len(c60) == 1 and c60.key(0) == "2008_000002"
    _, got60 = c60[0]
    assert got60.tolist() == np.tile(np.array(list(table.values())), (5, 1)).tolist()
    c59 = build_segmentation_dataset(f"context59:{out}")
    _, got59 = c59[0]
    assert c59.classnames[int(got59[0, 2])] == "person" and c59.classnames[int(got59[0, 3])] == "wood"
    assert int(got59[0, 4]) == 255  # background is ignored in context59


def test_read_as_downloaded_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert simzss(["convert-benchmark", "voc", str(tmp_path), "--out", str(tmp_path)]) == 0
    assert "nothing to convert" in capsys.readouterr().out
    assert simzss(["convert-benchmark", "cityscapes", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "cs" / "gtFine" / "val").mkdir(parents=True)
    (tmp_path / "cs" / "leftImg8bit" / "val").mkdir(parents=True)
    assert simzss(["convert-benchmark", "cityscapes", str(tmp_path / "cs"), "--out", str(tmp_path / "o")]) == 2
    assert "gtFine_labelIds.png" in capsys.readouterr().err
