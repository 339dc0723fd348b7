"""Official segmentation-benchmark downloads -> the layouts :mod:`simzss.eval.datasets` reads (mmseg's).

Conversions (label ids remapped with a lookup table; images are linked, never copied or re-encoded):

* ``cityscapes``: ``gtFine/SPLIT/CITY/*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` (19 train ids,
  255 ignore; cityscapesscripts' table).
* ``coco_stuff``: COCO-Stuff 164k ``stuffthingmaps_trainval2017/SPLIT/ID.png`` (values = COCO category id - 1,
  255 unlabeled) -> ``annotations/SPLIT/ID_labelTrainIds.png`` (171 classes: 80 things then 91 stuff, 255 ignore;
  as mmseg's ``coco_stuff164k.py``).
* ``coco_object``: the same stuffthingmaps -> ``annotations/SPLIT/ID_instanceTrainIds.png`` (0 = background incl.
  all stuff, 1..80 = things, 255 ignore; as GroupViT's ``convert_coco_object.py``).
* ``context59`` / ``context60``: Pascal Context's official ``trainval.tar.gz`` (``trainval/ID.mat``, ``LabelMap`` in
  the 459-label space) + VOC2010 -> ``VOC2010/SegmentationClassContext/ID.png`` (0 = background incl. the 400
  other labels, 1..59 in mmseg's alphabetical order) and ``ImageSets/SegmentationContext/val.txt`` (VOC2010
  ``ImageSets/Main/val.txt`` images that have an annotation). Needs scipy to read the ``.mat`` files.
* ``voc`` / ``voc20`` / ``ade20k``: read as downloaded (VOCtrainval_11-May-2012.tar, ADEChallengeData2016.zip).

A source pixel whose value is no label of its label space (a Cityscapes labelId above 33, a stuffthingmap value
that is no COCO category) becomes 255 like every unevaluated label, and is counted (``unknown_label_values`` in
the result, one warning line): the evaluation never sees a value that is neither a class nor 255 from a converter.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from simzss.data.shards import atomic_path
from simzss.logs import progress

log = logging.getLogger(__name__)

IGNORE = 255

#: cityscapesscripts labels.py: labelId -> trainId for the 19 evaluated classes (all other ids -> 255).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
#: cityscapesscripts labels.py: the labelIds a ``*_gtFine_labelIds.png`` can hold (0 unlabeled .. 33 bicycle).
CITYSCAPES_LABEL_IDS = range(0, 34)
#: COCO category ids (1-based) that no thing uses; the 80 things are the other ids in 1..90.
COCO_UNUSED_THING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
#: COCO-Stuff stuff classes: category ids 92..182 (91 classes).
COCO_STUFF_IDS = range(92, 183)
#: The 59 Pascal Context classes as ids of the full 459-label list (labels.txt), ascending = alphabetical
#: (aeroplane, bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus, cabinet, car, ...).
CONTEXT59_LABEL_IDS = (2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115,
                       144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347,
                       349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)

BENCHMARKS = ("voc", "voc20", "context59", "context60", "coco_object", "coco_stuff", "cityscapes", "ade20k")


class ConversionError(ValueError):
    """A raw download that is missing or not in the expected layout (the message names the path expected)."""


def cityscapes_lut() -> np.ndarray:
    """uint8[256]: Cityscapes labelId -> trainId (255 for ids not evaluated)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def _coco_thing_ids() -> List[int]:
    return [i for i in range(1, 91) if i not in COCO_UNUSED_THING_IDS]


def coco_stuffthingmaps_values() -> List[int]:
    """The values a COCO-Stuff 164k stuffthingmap holds: category id - 1 of the 80 things and the 91 stuff
    classes, and 255 (unlabeled)."""
    return [cat - 1 for cat in _coco_thing_ids() + list(COCO_STUFF_IDS)] + [IGNORE]


def coco_stuff_lut() -> np.ndarray:
    """uint8[256]: stuffthingmaps value (COCO category id - 1) -> 171-class train id (things 0..79, stuff 80..170)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for train_id, cat in enumerate(_coco_thing_ids() + list(COCO_STUFF_IDS)):
        lut[cat - 1] = train_id
    return lut


def coco_object_lut() -> np.ndarray:
    """uint8[256]: stuffthingmaps value -> COCO-Object id (things 1..80, stuff 0 = background, unlabeled 255)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for cat in COCO_STUFF_IDS:
        lut[cat - 1] = 0
    for i, cat in enumerate(_coco_thing_ids()):
        lut[cat - 1] = i + 1
    return lut


def context59_lut() -> np.ndarray:
    """int-indexed uint8[460]: 459-label id -> Pascal Context mask value (1..59; everything else 0 = background)."""
    lut = np.zeros(460, dtype=np.uint8)
    for i, label_id in enumerate(CONTEXT59_LABEL_IDS):
        lut[label_id] = i + 1
    return lut


# ---------------------------------------------------------------------------------------------- helpers


def _save_mask(mask: np.ndarray, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        Image.fromarray(mask.astype(np.uint8, copy=False), mode="L").save(tmp, format="PNG")


def _read_ids(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ConversionError(f"{path}: mode {im.mode}; expected a single-channel label PNG")
        arr = np.array(im)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ConversionError(f"{path}: label values outside 0..255")
    return arr.astype(np.uint8, copy=False)


def _link(src: Path, dst: Path) -> None:
    """Make ``dst`` point at the folder ``src`` (nothing to do when it already does, or is ``src``)."""
    if dst.exists() and dst.resolve() == src.resolve():
        return
    if dst.exists() or dst.is_symlink():
        raise ConversionError(f"{dst} exists and is not {src}; remove it or choose another --out")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst, target_is_directory=True)


def _first_dir(candidates: Sequence[Path], what: str, name: str) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise ConversionError(f"{name}: {what} not found: expected {candidates[0]}"
                          + (f" (or {', '.join(map(str, candidates[1:]))})" if len(candidates) > 1 else ""))


@dataclass
class ConversionResult:
    """What a conversion wrote, and the source pixels whose value is no label of the source's label space
    (``unknown_values``: value -> pixels). Those become 255 (ignored), as the official converters do, and are
    counted and logged rather than silently lost."""

    name: str
    out: Path
    written: int = 0
    existing: int = 0
    unknown_values: Dict[int, int] = field(default_factory=dict)

    @property
    def unknown_pixels(self) -> int:
        return sum(self.unknown_values.values())

    def to_json(self) -> Dict[str, object]:
        return {"dataset": self.name, "out": str(self.out), "masks_written": self.written,
                "masks_existing": self.existing, "unknown_label_pixels": self.unknown_pixels,
                "unknown_label_values": {str(k): v for k, v in sorted(self.unknown_values.items())}}


def known_values(values: Iterator[int] | Sequence[int]) -> np.ndarray:
    """bool[256]: which stored source values are labels of the source's label space."""
    known = np.zeros(256, dtype=bool)
    known[list(values)] = True
    return known


def _lut_converter(lut: np.ndarray, known: np.ndarray, res: ConversionResult) -> Callable[[Path], np.ndarray]:
    """Map a source mask through ``lut``, counting into ``res`` the pixels whose value is not ``known``."""

    def convert(path: Path) -> np.ndarray:
        ids = _read_ids(path)
        counts = np.bincount(ids.ravel(), minlength=256)
        for value in np.flatnonzero((counts > 0) & ~known):
            res.unknown_values[int(value)] = res.unknown_values.get(int(value), 0) + int(counts[value])
        return lut[ids]

    return convert


def _convert_masks(name: str, jobs: Sequence[Tuple[Path, Path]], convert: Callable[[Path], np.ndarray],
                   out: Path, overwrite: bool, show_progress: bool, res: Optional[ConversionResult] = None
                   ) -> ConversionResult:
    res = res or ConversionResult(name, out)
    for src, dst in progress(jobs, desc=name, unit="mask", enabled=show_progress):
        if dst.is_file() and not overwrite:
            res.existing += 1
            continue
        _save_mask(convert(src), dst)
        res.written += 1
    if res.unknown_values:
        shown = ", ".join(f"{v}: {n:,} px" for v, n in sorted(res.unknown_values.items())[:10])
        log.warning("%s: %d source pixels had values that are no label of the source (%s); they are ignored (255) "
                    "in the converted masks", name, res.unknown_pixels, shown)
    return res


# ------------------------------------------------------------------------------------------ converters


def convert_cityscapes(raw: Path, out: Path, *, split: str = "val", overwrite: bool = False,
                       show_progress: bool = True) -> ConversionResult:
    """``RAW/gtFine/SPLIT/CITY/*_gtFine_labelIds.png`` -> ``OUT/gtFine/SPLIT/CITY/*_gtFine_labelTrainIds.png``;
    ``OUT/leftImg8bit`` links to the raw images (``OUT`` may be ``RAW``)."""
    name = "cityscapes"
    gt = _first_dir([raw / "gtFine" / split], "annotation folder", name)
    images = _first_dir([raw / "leftImg8bit" / split], "image folder (leftImg8bit_trainvaltest.zip)", name)
    sources = sorted(gt.glob("*/*_gtFine_labelIds.png"))
    if not sources:
        raise ConversionError(f"{name}: no *_gtFine_labelIds.png in {gt}/<city>/ (gtFine_trainvaltest.zip)")
    if out.resolve() != raw.resolve():
        _link(images, out / "leftImg8bit" / split)
    res = ConversionResult(name, out)
    convert = _lut_converter(cityscapes_lut(), known_values(CITYSCAPES_LABEL_IDS), res)
    jobs = [(p, out / "gtFine" / split / p.parent.name / p.name.replace("_labelIds.png", "_labelTrainIds.png"))
            for p in sources]
    return _convert_masks(name, jobs, convert, out, overwrite, show_progress, res)


def _coco_sources(raw: Path, split: str, name: str) -> Tuple[Path, List[Path]]:
    """(image folder, raw stuffthingmaps masks) of a COCO-Stuff 164k download."""
    images = _first_dir([raw / split, raw / "images" / split], "image folder (val2017.zip)", name)
    candidates = [raw / "stuffthingmaps_trainval2017" / split, raw / "annotations" / split]
    masks: List[Path] = []
    for c in candidates:
        masks = sorted(p for p in c.glob("*.png") if not p.name.endswith("TrainIds.png")) if c.is_dir() else []
        if masks:
            break
    if not masks:
        raise ConversionError(f"{name}: no COCO-Stuff label maps found: expected {candidates[0]}/<id>.png (unzip "
                              f"stuffthingmaps_trainval2017.zip in {raw}) or {candidates[1]}/<id>.png")
    return images, masks


def _convert_coco(name: str, suffix: str, lut: np.ndarray, raw: Path, out: Path, split: str, overwrite: bool,
                  show_progress: bool) -> ConversionResult:
    images, masks = _coco_sources(raw, split, name)
    target = out / "images" / split
    if target.resolve() != images.resolve():
        _link(images, target)
    jobs = [(p, out / "annotations" / split / f"{p.stem}{suffix}") for p in masks]
    res = ConversionResult(name, out)
    convert = _lut_converter(lut, known_values(coco_stuffthingmaps_values()), res)
    return _convert_masks(name, jobs, convert, out, overwrite, show_progress, res)


def convert_coco_stuff(raw: Path, out: Path, *, split: str = "val2017", overwrite: bool = False,
                       show_progress: bool = True) -> ConversionResult:
    """COCO-Stuff 164k stuffthingmaps -> ``OUT/annotations/SPLIT/ID_labelTrainIds.png`` (171 classes)."""
    return _convert_coco("coco_stuff", "_labelTrainIds.png", coco_stuff_lut(), raw, out, split, overwrite,
                         show_progress)


def convert_coco_object(raw: Path, out: Path, *, split: str = "val2017", overwrite: bool = False,
                        show_progress: bool = True) -> ConversionResult:
    """COCO-Stuff 164k stuffthingmaps -> ``OUT/annotations/SPLIT/ID_instanceTrainIds.png`` (bg + 80 things)."""
    return _convert_coco("coco_object", "_instanceTrainIds.png", coco_object_lut(), raw, out, split, overwrite,
                         show_progress)


def _load_label_map(path: Path) -> np.ndarray:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ConversionError("reading Pascal Context's .mat annotations needs scipy: pip install scipy") from None
    try:
        data = loadmat(path)
    except Exception as e:  # scipy raises several types for a damaged file
        raise ConversionError(f"{path}: cannot read the .mat file ({type(e).__name__}: {e})") from None
    if "LabelMap" not in data:
        raise ConversionError(f"{path}: no LabelMap variable (expected Pascal Context's trainval/<id>.mat)")
    arr = np.asarray(data["LabelMap"])
    if arr.ndim != 2 or arr.size and (arr.min() < 0 or arr.max() > 459):
        raise ConversionError(f"{path}: LabelMap is not a 2-D map of the 459 Pascal Context labels")
    return arr.astype(np.int64)


def convert_context(raw: Path, out: Path, *, overwrite: bool = False, show_progress: bool = True) -> ConversionResult:
    """Pascal Context ``trainval/ID.mat`` + VOC2010 -> ``OUT/VOC2010/SegmentationClassContext/ID.png`` and
    ``OUT/VOC2010/ImageSets/SegmentationContext/val.txt``; ``OUT/VOC2010/JPEGImages`` links to VOC2010's."""
    name = "context"
    voc = _first_dir([raw / "VOCdevkit" / "VOC2010", raw / "VOC2010"], "VOC2010 (VOCtrainval_03-May-2010.tar)", name)
    mats = _first_dir([raw / "trainval", raw / "VOCdevkit" / "trainval", voc / "trainval"],
                      "Pascal Context annotations (trainval/ from trainval.tar.gz)", name)
    split_file = voc / "ImageSets" / "Main" / "val.txt"
    if not split_file.is_file():
        raise ConversionError(f"{name}: VOC2010 split not found: expected {split_file}")
    val = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
    have = {p.stem for p in mats.glob("*.mat")}
    ids = [i for i in val if i in have]
    if not ids:
        raise ConversionError(f"{name}: none of the {len(val)} VOC2010 val images has an annotation in {mats} "
                              "(expected <id>.mat, e.g. 2008_000002.mat)")
    out_voc = voc if out.resolve() == raw.resolve() else out / "VOC2010"  # in place: next to the raw files
    if out_voc.resolve() != voc.resolve():
        _link(voc / "JPEGImages", out_voc / "JPEGImages")
    lut = context59_lut()
    jobs = [(mats / f"{i}.mat", out_voc / "SegmentationClassContext" / f"{i}.png") for i in ids]
    res = _convert_masks(name, jobs, lambda p: lut[_load_label_map(p)], out, overwrite, show_progress)
    split_out = out_voc / "ImageSets" / "SegmentationContext" / "val.txt"
    split_out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(split_out) as tmp:
        tmp.write_text("".join(f"{i}\n" for i in ids))
    return res


#: How to get each benchmark into the loader's layout: a converter, or None when the download is read as is.
CONVERTERS: Dict[str, Optional[Callable[..., ConversionResult]]] = {
    "voc": None,
    "voc20": None,
    "context59": convert_context,
    "context60": convert_context,
    "coco_object": convert_coco_object,
    "coco_stuff": convert_coco_stuff,
    "cityscapes": convert_cityscapes,
    "ade20k": None,
}

AS_DOWNLOADED = {
    "voc": "VOCtrainval_11-May-2012.tar, extracted (VOCdevkit/VOC2012): read as is",
    "voc20": "VOCtrainval_11-May-2012.tar, extracted (VOCdevkit/VOC2012): read as is",
    "ade20k": "ADEChallengeData2016.zip, extracted (ADEChallengeData2016/): read as is",
}


def convert_command(name: str, path: str | os.PathLike) -> str:
    """The command that converts the raw download at ``path`` for ``name`` (in place)."""
    return f"simzss convert-benchmark {name} {path} --out {path}"


def raw_download_hint(name: str, path: str | os.PathLike) -> Optional[str]:
    """When ``path`` holds the raw download of benchmark ``name`` instead of the converted layout, a sentence
    saying which command converts it; else None."""
    root = Path(path)
    found: Iterator[Path]
    if name == "cityscapes":
        found = root.glob("gtFine/val/*/*_gtFine_labelIds.png")
    elif name in ("coco_stuff", "coco_object"):
        found = (p for d in (root / "stuffthingmaps_trainval2017" / "val2017", root / "annotations" / "val2017")
                 if d.is_dir() for p in d.glob("*.png") if not p.name.endswith("TrainIds.png"))
    elif name in ("context59", "context60"):
        found = (p for d in (root / "trainval", root / "VOCdevkit" / "trainval") if d.is_dir() for p in d.glob("*.mat"))
    else:
        return None
    if next(found, None) is None:
        return None
    return f"{root} looks like the raw download; convert it with: {convert_command(name, root)}"


__all__ = ["AS_DOWNLOADED", "BENCHMARKS", "CITYSCAPES_LABEL_IDS", "CITYSCAPES_TRAIN_IDS", "CONTEXT59_LABEL_IDS", "CONVERTERS",
           "ConversionError", "ConversionResult", "cityscapes_lut", "coco_object_lut", "coco_stuff_lut",
           "coco_stuffthingmaps_values", "context59_lut", "convert_cityscapes", "convert_coco_object", "convert_coco_stuff", "convert_command",
           "convert_context", "known_values", "raw_download_hint"]
