"""Each benchmark's id -> name table matches the masks its loader reads.

The expected orders are mmsegmentation 1.x ``METAINFO`` class tuples (mmseg/datasets/voc.py, pascal_context.py,
coco_stuff.py, cityscapes.py, ade.py) and TCL/GroupViT's COCO-Object list (background + the first 80 COCO-Stuff
names), written out here independently of ``simzss/resources/classnames``. Every stored mask value is written into a
generated dataset of the native layout, read back through ``build_segmentation_dataset``, and the name the loader
gives that pixel must be the METAINFO name of the stored value (cleaned spellings allowed, moved ids not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from simzss.eval.datasets import build_segmentation_dataset

VOC21 = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

CONTEXT60 = ("background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
             "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
             "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
             "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant",
             "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track",
             "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood")

COCO_STUFF171 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "banner",
    "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood")

COCO_OBJECT81 = ("background",) + COCO_STUFF171[:80]

CITYSCAPES19 = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                "bicycle")

ADE150 = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")

# Readable spellings the project uses instead of the METAINFO strings (names only; ids never move).
RENAMES: Dict[str, str] = {
    "aeroplane": "airplane", "diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
    "building-other": "building", "ceiling-other": "ceiling", "desk-stuff": "desk", "door-stuff": "door",
    "floor-marble": "marble floor", "floor-other": "floor", "floor-stone": "stone floor", "floor-tile": "tile floor",
    "floor-wood": "wood floor", "food-other": "food", "furniture-other": "furniture", "ground-other": "ground",
    "mirror-stuff": "mirror", "plant-other": "plant", "playingfield": "playing field", "sky-other": "sky",
    "solid-other": "solid", "structural-other": "structural", "textile-other": "textile", "wall-brick": "brick wall",
    "wall-concrete": "concrete wall", "wall-other": "wall", "wall-panel": "panel wall", "wall-stone": "stone wall",
    "wall-tile": "tile wall", "wall-wood": "wood wall", "water-other": "water", "waterdrops": "water drops",
    "window-blind": "window blind", "window-other": "window",
}


def clean(raw: str) -> str:
    """The project's spelling of a METAINFO name: an explicit rename, else lower-case with '-' as a space."""
    raw = raw.strip()
    return RENAMES.get(raw, " ".join(raw.lower().replace("-", " ").split()))


# ---------------------------------------------------------------------------------- generated native layouts
def _image(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)


def _voc_dir(root: Path, year: str, mask_dir: str, split: str, values: np.ndarray) -> Path:
    base = root / "VOCdevkit" / year
    _image(base / "JPEGImages" / "a.jpg", *values.shape)
    _mask(base / mask_dir / "a.png", values)
    (base / "ImageSets" / split).mkdir(parents=True)
    (base / "ImageSets" / split / "val.txt").write_text("a\n")
    return root / "VOCdevkit"


def _coco_dir(root: Path, suffix: str, values: np.ndarray) -> Path:
    _image(root / "images" / "val2017" / "0001.jpg", *values.shape)
    _mask(root / "annotations" / "val2017" / f"0001{suffix}", values)
    return root


def _cityscapes_dir(root: Path, values: np.ndarray) -> Path:
    _image(root / "leftImg8bit" / "val" / "x" / "x_1_1_leftImg8bit.png", *values.shape)
    _mask(root / "gtFine" / "val" / "x" / "x_1_1_gtFine_labelTrainIds.png", values)
    return root


def _ade_dir(root: Path, values: np.ndarray) -> Path:
    base = root / "ADEChallengeData2016"
    _image(base / "images" / "validation" / "a.jpg", *values.shape)
    _mask(base / "annotations" / "validation" / "a.png", values)
    return root


# name -> (layout writer, {stored mask value: METAINFO name or None = ignored})
def _stored(metainfo, offset: int = 0, zero_ignored: bool = False) -> Dict[int, str | None]:
    """Stored value -> name: value v holds metainfo[v - offset]; 0 ignored when ``zero_ignored``."""
    table: Dict[int, str | None] = {v + offset: name for v, name in enumerate(metainfo)}
    if zero_ignored:
        table[0] = None
    table[255] = None
    return table


CASES = {
    "voc": (lambda r, v: _voc_dir(r, "VOC2012", "SegmentationClass", "Segmentation", v), _stored(VOC21)),
    "voc20": (lambda r, v: _voc_dir(r, "VOC2012", "SegmentationClass", "Segmentation", v),
              _stored(VOC21[1:], offset=1, zero_ignored=True)),
    "context60": (lambda r, v: _voc_dir(r, "VOC2010", "SegmentationClassContext", "SegmentationContext", v),
                  _stored(CONTEXT60)),
    "context59": (lambda r, v: _voc_dir(r, "VOC2010", "SegmentationClassContext", "SegmentationContext", v),
                  _stored(CONTEXT60[1:], offset=1, zero_ignored=True)),
    "coco_object": (lambda r, v: _coco_dir(r, "_instanceTrainIds.png", v), _stored(COCO_OBJECT81)),
    "coco_stuff": (lambda r, v: _coco_dir(r, "_labelTrainIds.png", v), _stored(COCO_STUFF171)),
    "cityscapes": (_cityscapes_dir, _stored(CITYSCAPES19)),
    "ade20k": (_ade_dir, _stored(ADE150, offset=1, zero_ignored=True)),
}
EXPECTED_SIZES = {"voc": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff": 171,
                  "cityscapes": 19, "ade20k": 150}


def mismatches(classnames: List[str], pixel_ids: np.ndarray, stored: Dict[int, str | None], values: np.ndarray,
               ignore: int = 255) -> List[str]:
    """Stored values whose pixel the loader names differently from METAINFO (after cleaning)."""
    bad = []
    for v, raw in stored.items():
        got = pixel_ids[values == v]
        assert got.size, v
        ids = set(got.tolist())
        if raw is None:
            if ids != {ignore}:
                bad.append(f"{v}: expected ignore, got ids {sorted(ids)}")
            continue
        if len(ids) != 1 or ignore in ids:
            bad.append(f"{v}: expected {raw!r}, got ids {sorted(ids)}")
            continue
        name = classnames[ids.pop()]
        if name != clean(raw):
            bad.append(f"{v}: METAINFO {raw!r} (cleaned {clean(raw)!r}) but the loader names it {name!r}")
    return bad


@pytest.mark.parametrize("name", sorted(CASES))
def test_table_matches_the_masks_the_loader_reads(tmp_path: Path, name: str) -> None:
    write, stored = CASES[name]
    values = np.array(sorted(stored), dtype=np.uint8)[None].repeat(2, axis=0)  # every stored value, 2 rows
    ds = build_segmentation_dataset(f"{name}:{write(tmp_path, values)}")
    assert ds.num_classes == EXPECTED_SIZES[name]
    assert len(set(ds.classnames)) == ds.num_classes, "two ids share a name"
    _, pixel_ids = ds[0]
    assert mismatches(ds.classnames, pixel_ids, stored, values) == []
    assert ds.has_background == (name in ("voc", "context60", "coco_object"))
    if ds.has_background:
        assert ds.classnames[0] == "background"


def test_the_check_catches_moved_ids(tmp_path: Path) -> None:
    """The original 59-class order (the table before the fix) fails against mmseg's masks: most ids move."""
    paper_order = ["airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table",
                   "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
                   "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup", "door",
                   "fence", "floor", "flower", "food", "grass", "ground", "keyboard", "light", "mountain", "mouse",
                   "curtain", "platform", "sign", "plate", "road", "rock", "shelves", "sidewalk", "sky", "snow",
                   "bedclothes", "track", "tree", "truck", "wall", "water", "window", "wood"]
    write, stored = CASES["context59"]
    values = np.array(sorted(stored), dtype=np.uint8)[None].repeat(2, axis=0)
    _, pixel_ids = build_segmentation_dataset(f"context59:{write(tmp_path, values)}")[0]
    bad = mismatches(paper_order, pixel_ids, stored, values)
    assert len(bad) == 54  # only airplane, wall, water, window and wood keep their id
