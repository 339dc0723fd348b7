"""Evaluation dataset loaders: each native layout written tiny by the test, label mapping, clear errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from PIL import Image

from simzss.eval.datasets import (
    DatasetError,
    build_classification_dataset,
    build_segmentation_dataset,
    iter_retrieval_records,
    parse_spec,
)

H, W = 6, 8
# Every label value a dataset may store, including 255 (ignore) and a background 0.
RAW = np.array([[0, 1, 2, 255, 3, 0, 1, 2]] * H, np.uint8)


def voc_palette() -> list:
    """The standard VOC colour map (index i -> bit-interleaved RGB)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_image(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def write_mask(path: Path, arr: np.ndarray = RAW, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
        im.putpalette(voc_palette())
    else:
        im = Image.fromarray(arr)
    im.save(path)


def make_voc(root: Path, year: str = "VOC2012", mask_dir: str = "SegmentationClass", split: str = "Segmentation") -> Path:
    base = root / "VOCdevkit" / year
    ids = ["2007_000033", "2007_000042"]
    for i in ids:
        write_image(base / "JPEGImages" / f"{i}.jpg")
        write_mask(base / mask_dir / f"{i}.png", palette=True)
    (base / "ImageSets" / split).mkdir(parents=True)
    (base / "ImageSets" / split / "val.txt").write_text("\n".join(ids) + "\n")
    return root / "VOCdevkit"


REDUCED = np.where(RAW == 0, 255, np.where(RAW == 255, 255, RAW.astype(np.int16) - 1)).astype(np.uint8)


def test_parse_spec() -> None:
    assert parse_spec("voc:/data/VOCdevkit") == ("voc", "/data/VOCdevkit")
    assert parse_spec("Folder:demo/data/val") == ("folder", "demo/data/val")
    assert parse_spec("folder:C:/x") == ("folder", "C:/x")
    for bad in ("voc", ":x", "voc:"):
        with pytest.raises(ValueError, match="NAME:PATH"):
            parse_spec(bad)


def test_voc_and_voc20(tmp_path: Path) -> None:
    devkit = make_voc(tmp_path)
    voc = build_segmentation_dataset(f"voc:{devkit}")
    assert len(voc) == 2 and voc.has_background and voc.num_classes == 21
    assert voc.classnames[0] == "background" and voc.classnames[1] == "airplane"
    image, mask = voc[0]
    assert image.mode == "RGB" and image.size == (W, H)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, RAW)  # palette indices, not colours
    voc20 = build_segmentation_dataset(f"voc20:{devkit}")
    assert not voc20.has_background and voc20.num_classes == 20 and voc20.classnames[0] == "airplane"
    np.testing.assert_array_equal(voc20[1][1], REDUCED)  # background -> ignore, 1..20 -> 0..19
    # The devkit's parent and the VOC2012 folder itself are accepted too.
    assert len(build_segmentation_dataset(f"voc:{tmp_path}")) == 2
    assert len(build_segmentation_dataset(f"voc:{devkit / 'VOC2012'}")) == 2


def test_voc_errors_name_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        build_segmentation_dataset(f"voc:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"VOC2012/JPEGImages"):
        build_segmentation_dataset(f"voc:{tmp_path / 'empty'}")
    devkit = make_voc(tmp_path / "a")
    (devkit / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation/val.txt"):
        build_segmentation_dataset(f"voc:{devkit}")
    devkit = make_voc(tmp_path / "b")
    (devkit / "VOC2012" / "SegmentationClass" / "2007_000042.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 masks missing.*SegmentationClass/2007_000042.png"):
        build_segmentation_dataset(f"voc20:{devkit}")
    with pytest.raises(ValueError, match="unknown segmentation dataset"):
        build_segmentation_dataset(f"pascal:{devkit}")


def test_bad_masks_give_clear_errors(tmp_path: Path) -> None:
    devkit = make_voc(tmp_path)
    Image.new("RGB", (W, H)).save(devkit / "VOC2012" / "SegmentationClass" / "2007_000033.png")
    write_mask(devkit / "VOC2012" / "SegmentationClass" / "2007_000042.png", RAW[:, :5], palette=True)
    ds = build_segmentation_dataset(f"voc:{devkit}")
    with pytest.raises(DatasetError, match="mode RGB"):
        ds[0]
    with pytest.raises(DatasetError, match="5x6 but image"):
        ds[1]


def test_pascal_context(tmp_path: Path) -> None:
    devkit = make_voc(tmp_path, "VOC2010", "SegmentationClassContext", "SegmentationContext")
    c60 = build_segmentation_dataset(f"context60:{devkit}")
    assert c60.num_classes == 60 and c60.has_background
    np.testing.assert_array_equal(c60[0][1], RAW)
    c59 = build_segmentation_dataset(f"context59:{devkit}")
    assert c59.num_classes == 59 and not c59.has_background
    np.testing.assert_array_equal(c59[0][1], REDUCED)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"VOC2010/SegmentationClassContext"):
        build_segmentation_dataset(f"context59:{tmp_path / 'empty'}")


def test_coco_object_and_stuff(tmp_path: Path) -> None:
    for key in ("000000000139", "000000000285"):
        write_image(tmp_path / "images" / "val2017" / f"{key}.jpg")
        write_mask(tmp_path / "annotations" / "val2017" / f"{key}_instanceTrainIds.png")
        write_mask(tmp_path / "annotations" / "val2017" / f"{key}_labelTrainIds.png")
        write_mask(tmp_path / "annotations" / "val2017" / f"{key}.png")  # the raw COCO-Stuff map: not picked up
    obj = build_segmentation_dataset(f"coco_object:{tmp_path}")
    assert len(obj) == 2 and obj.num_classes == 81 and obj.has_background and obj.key(0) == "000000000139"
    np.testing.assert_array_equal(obj[0][1], RAW)
    stuff = build_segmentation_dataset(f"coco_stuff:{tmp_path}")
    assert len(stuff) == 2 and stuff.num_classes == 171 and not stuff.has_background
    (tmp_path / "images" / "val2017" / "000000000285.jpg").unlink()
    with pytest.raises(DatasetError, match=r"images/val2017/000000000285.jpg"):
        build_segmentation_dataset(f"coco_stuff:{tmp_path}")


def test_cityscapes(tmp_path: Path) -> None:
    stem = "frankfurt_000000_000294"
    write_image(tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png")
    write_mask(tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png")
    ds = build_segmentation_dataset(f"cityscapes:{tmp_path}")
    assert len(ds) == 1 and ds.num_classes == 19 and ds.key(0) == f"frankfurt/{stem}"
    np.testing.assert_array_equal(ds[0][1], RAW)
    (tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DatasetError, match="createTrainIdLabelImgs"):
        build_segmentation_dataset(f"cityscapes:{tmp_path}")


def test_ade20k_reduce_zero_label(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    raw = RAW.copy()
    raw[0, 0] = 150
    write_image(base / "images" / "validation" / "ADE_val_00000001.jpg")
    write_mask(base / "annotations" / "validation" / "ADE_val_00000001.png", raw)
    for spec in (f"ade20k:{tmp_path}", f"ade20k:{base}"):
        ds = build_segmentation_dataset(spec)
        assert ds.num_classes == 150 and not ds.has_background
        mask = ds[0][1]
        assert mask[0, 0] == 149 and mask[0, 1] == 0 and mask[1, 0] == 255 and mask[0, 3] == 255


def test_folder_layout(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.jpg")
    write_image(tmp_path / "images" / "b.png")
    write_mask(tmp_path / "masks" / "a.png")
    write_mask(tmp_path / "masks" / "b.png")
    (tmp_path / "classes.txt").write_text("sky\ngrass\ncow\nroad\n")
    ds = build_segmentation_dataset(f"folder:{tmp_path}")
    assert len(ds) == 2 and ds.classnames == ["sky", "grass", "cow", "road"] and not ds.has_background
    np.testing.assert_array_equal(ds[1][1], RAW)
    (tmp_path / "classes.txt").write_text("background\nsky\n")
    assert build_segmentation_dataset(f"folder:{tmp_path}").has_background
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 masks have no image.*images/b.jpg"):
        build_segmentation_dataset(f"folder:{tmp_path}")
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"class list not found: expected .*classes.txt"):
        build_segmentation_dataset(f"folder:{tmp_path}")


# ---------------------------------------------------------------------------------------- classification


def test_imagefolder_and_imagenet(tmp_path: Path) -> None:
    folder = tmp_path / "if"
    write_image(folder / "golden_retriever" / "1.jpg")
    write_image(folder / "golden_retriever" / "2.jpg")
    write_image(folder / "tabby_cat" / "x" / "3.png")
    ds = build_classification_dataset(f"imagefolder:{folder}")
    assert ds.classnames == ["golden retriever", "tabby cat"]
    assert [label for _, label in ds.samples] == [0, 0, 1]
    assert ds[2][0].mode == "RGB" and ds[2][1] == 1
    (folder / "classes.txt").write_text("dog\ncat\n")
    assert build_classification_dataset(f"imagefolder:{folder}").classnames == ["dog", "cat"]

    inet = tmp_path / "val"
    synsets = [f"n{i:08d}" for i in range(1000)]
    for s in synsets:
        (inet / s).mkdir(parents=True)
    write_image(inet / synsets[0] / "ILSVRC2012_val_00000001.JPEG")
    write_image(inet / synsets[999] / "ILSVRC2012_val_00000002.JPEG")
    ds = build_classification_dataset(f"imagenet:{inet}")
    assert len(ds.classnames) == 1000 and ds.classnames[0] == "tench"
    assert [label for _, label in ds.samples] == [0, 999]
    (inet / synsets[5]).rmdir()
    with pytest.raises(DatasetError, match="999 class folders, expected 1000.*valprep.sh.*LOC_val_solution.csv"):
        build_classification_dataset(f"imagenet:{inet}")
    with pytest.raises(DatasetError, match=str(tmp_path / "missing")):
        build_classification_dataset(f"imagenet:{tmp_path / 'missing'}")


def test_imagenet_flat_val_with_solution_csv(tmp_path: Path) -> None:
    # Kaggle layout: LOC_val_solution.csv four levels above ILSVRC/Data/CLS-LOC/val.
    val = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    val.mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no class folders and no LOC_val_solution.csv.*valprep.sh"):
        build_classification_dataset(f"imagenet:{val}")
    synsets = [f"n{i:08d}" for i in range(1000)]
    rows = [f"ILSVRC2012_val_{i:08d},{s} 1 2 3 4 {s} 5 6 7 8" for i, s in enumerate(synsets, 1)]
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")
    write_image(val / "ILSVRC2012_val_00000001.JPEG")
    write_image(val / "ILSVRC2012_val_00001000.JPEG")
    ds = build_classification_dataset(f"imagenet:{val}")
    assert len(ds.classnames) == 1000 and ds.classnames[0] == "tench"
    assert [(p.name, label) for p, label in ds.samples] == [
        ("ILSVRC2012_val_00000001.JPEG", 0), ("ILSVRC2012_val_00001000.JPEG", 999)
    ]
    write_image(val / "ILSVRC2012_val_99999999.JPEG")  # an image the csv does not label
    with pytest.raises(DatasetError, match="1 of 3 images .* have no row in .*ILSVRC2012_val_99999999.JPEG"):
        build_classification_dataset(f"imagenet:{val}")
    csv_path.write_text("ImageId,PredictionString\n" + "\n".join(rows[:10]) + "\n")
    with pytest.raises(DatasetError, match="names 10 synsets, expected 1000"):
        build_classification_dataset(f"imagenet:{val}")
    csv_path.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,\n")
    with pytest.raises(DatasetError, match="line 2: expected ImageId,PredictionString"):
        build_classification_dataset(f"imagenet:{val}")


# --------------------------------------------------------------------------------------------- retrieval


def _jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: Dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_wds_records_multiline_and_repeated_keys(tmp_path: Path) -> None:
    write_tar(tmp_path / "shard-000000.tar", {
        "k1.jpg": _jpeg_bytes(1), "k1.txt": b"first caption\nsecond caption\n\n",
        "k2.png": _jpeg_bytes(2), "k2.txt": b"only one",
        "k3.txt": b"caption without image",
        "k4.jpg": _jpeg_bytes(4), "k4.pyd": b"\x80\x04not unpickled",
    })
    write_tar(tmp_path / "shard-000001.tar", {"k1.jpg": _jpeg_bytes(1), "k1.txt": b"third caption"})
    skipped: Dict[str, int] = {}
    recs = list(iter_retrieval_records(f"wds:{tmp_path}/shard-{{000000..000001}}.tar", skipped=skipped))
    assert [(k, caps) for k, _, caps in recs] == [
        ("k1", ["first caption", "second caption"]), ("k2", ["only one"]), ("k4", []), ("k1", ["third caption"])
    ]
    assert recs[0][1]().size == (8, 8)
    assert skipped == {"no_image": 1}


def test_karpathy_records(tmp_path: Path, caplog) -> None:
    write_image(tmp_path / "val2014" / "COCO_val2014_1.jpg")
    write_image(tmp_path / "val2014" / "COCO_val2014_2.jpg")
    data = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "split": "test",
         "sentences": [{"raw": "A cat. "}, {"raw": "A kitten."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_2.jpg", "split": "train", "sentences": [{"raw": "x"}]},
        {"filepath": "val2014", "filename": "COCO_val2014_3.jpg", "split": "test", "sentences": [{"raw": "gone"}]},
    ]}
    js = tmp_path / "dataset_coco.json"
    js.write_text(json.dumps(data))
    skipped: Dict[str, int] = {}
    recs = list(iter_retrieval_records(f"karpathy:{js}", skipped=skipped))
    assert [(k, caps) for k, _, caps in recs] == [("val2014/COCO_val2014_1.jpg", ["A cat.", "A kitten."])]
    assert skipped == {"missing_image": 1} and "COCO_val2014_3.jpg" in caplog.text
    with pytest.raises(DatasetError, match=r"none of the 2 images found.*elsewhere/val2014/COCO_val2014_1.jpg"):
        list(iter_retrieval_records(f"karpathy:{js}", split="test", image_root=str(tmp_path / "elsewhere")))
    js.write_text("{}")
    with pytest.raises(DatasetError, match="not a Karpathy split json"):
        list(iter_retrieval_records(f"karpathy:{js}"))


def test_wds_truncated_shard_keeps_complete_samples_and_counts_read_error(tmp_path: Path, caplog) -> None:
    members = {"a.jpg": _jpeg_bytes(1), "a.txt": b"cap a", "b.jpg": _jpeg_bytes(2), "b.txt": b"cap b"}
    write_tar(tmp_path / "s0.tar", members)
    data = (tmp_path / "s0.tar").read_bytes()
    # Cut inside b.jpg's data: "a" is complete, "b" is lost and must not vanish silently.
    cut = data.index(members["b.jpg"]) + 10
    (tmp_path / "s0.tar").write_bytes(data[:cut])
    write_tar(tmp_path / "s1.tar", {"c.jpg": _jpeg_bytes(3), "c.txt": b"cap c"})
    skipped: Dict[str, int] = {}
    recs = list(iter_retrieval_records(f"wds:{tmp_path}/s{{0..1}}.tar", skipped=skipped))
    assert [(k, caps) for k, _, caps in recs] == [("a", ["cap a"]), ("c", ["cap c"])]
    assert skipped == {"read_error": 1} and "s0.tar" in caplog.text


def test_wds_not_a_tar_and_missing_shards(tmp_path: Path) -> None:
    (tmp_path / "s0.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DatasetError, match=r"no shard of .*s\{0\.\.1\}\.tar could be read.*s0.tar"):
        list(iter_retrieval_records(f"wds:{tmp_path}/s{{0..1}}.tar"))  # s1.tar does not exist either
    write_tar(tmp_path / "s1.tar", {"c.jpg": _jpeg_bytes(3), "c.txt": b"cap c"})
    skipped: Dict[str, int] = {}
    recs = list(iter_retrieval_records(f"wds:{tmp_path}/s{{0..1}}.tar", skipped=skipped))
    assert [k for k, _, _ in recs] == ["c"] and skipped == {"read_error": 1}


def test_wds_non_utf8_caption_is_counted_not_mangled(tmp_path: Path) -> None:
    write_tar(tmp_path / "s0.tar", {
        "a.jpg": _jpeg_bytes(1), "a.txt": "caf\u00e9 cr\u00e8me".encode("latin-1"),
        "b.jpg": _jpeg_bytes(2), "b.txt": "caf\u00e9".encode("utf-8"),
    })
    skipped: Dict[str, int] = {}
    recs = list(iter_retrieval_records(f"wds:{tmp_path}/s0.tar", skipped=skipped))
    assert [(k, caps) for k, _, caps in recs] == [("b", ["caf\u00e9"])]
    assert skipped == {"caption_not_utf8": 1}
