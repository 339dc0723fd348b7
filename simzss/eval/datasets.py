"""Evaluation datasets in their native on-disk layouts, addressed by spec strings ``NAME:PATH``.

Segmentation (each sample: RGB PIL image, ``uint8 [H, W]`` mask with 255 = ignore, class ids in
``dataset.classnames`` order):

=============  ===========================================================================================
spec name      layout under PATH (PATH may also be the parent folder named in brackets)
=============  ===========================================================================================
voc / voc20    [VOCdevkit/]VOC2012/{JPEGImages/ID.jpg, SegmentationClass/ID.png (palette PNG),
               ImageSets/Segmentation/val.txt}. voc: 21 classes, 0 = background. voc20: background -> 255,
               1..20 -> 0..19. The 255 object border is ignored in both.
context60 /    [VOCdevkit/]VOC2010/{JPEGImages/ID.jpg, SegmentationClassContext/ID.png (0 = background,
context59      1..59), ImageSets/SegmentationContext/val.txt} (the mmseg layout). context59: background -> 255.
coco_object    images/val2017/ID.jpg + annotations/val2017/ID_instanceTrainIds.png: GroupViT's
               ``convert_coco_object.py`` masks made from COCO-Stuff (0 = background incl. all stuff, 1..80 =
               things, 255 ignore); 81 classes.
coco_stuff     images/val2017/ID.jpg + annotations/val2017/ID_labelTrainIds.png (mmseg's
               ``coco_stuff164k.py``: 0..170, 255 ignore); 171 classes.
cityscapes     leftImg8bit/val/CITY/X_leftImg8bit.png + gtFine/val/CITY/X_gtFine_labelTrainIds.png
               (cityscapesscripts ``createTrainIdLabelImgs``; 0..18, 255 ignore).
ade20k         [ADEChallengeData2016/]{images/validation/ID.jpg, annotations/validation/ID.png};
               0 = "other" -> 255 and 1..150 -> 0..149 (reduce_zero_label).
folder         images/ID.jpg|jpeg|png, masks/ID.png (uint8 class ids, 255 ignore), classes.txt (one name a
               line, in id order; a first line ``background`` marks class 0 as background).
=============  ===========================================================================================

Classification: ``imagenet:PATH`` and ``imagefolder:PATH`` (class = sub-folder; names from ``PATH/classes.txt``
in sorted-folder order if present, else folder names with ``_`` -> space). ImageNet's 50,000 ILSVRC2012 val
images (labels = the packaged ``imagenet1k`` names in sorted synset order) may be laid out either way:

* synset folders: ``PATH/n01440764/ILSVRC2012_val_00000293.JPEG``, ... (1000 folders), e.g. made from the flat
  ``ILSVRC2012_img_val.tar`` with the standard ``valprep.sh`` script (soumith/imagenetloader.torch), or the
  torchvision ``ImageNet(root, split="val")`` preparation (``val/`` of its root);
* flat: ``PATH/ILSVRC2012_val_00000001.JPEG``, ... with ``LOC_val_solution.csv`` (Kaggle ImageNet
  localization challenge: header ``ImageId,PredictionString``, first token of PredictionString = the synset) in
  PATH or one of its four parent folders (the Kaggle download keeps it four levels above
  ``ILSVRC/Data/CLS-LOC/val``). Every image in PATH must have a row; the csv must name all 1000 synsets.

Retrieval: ``wds:SHARDS`` (webdataset tar shards, brace patterns and ``::`` lists allowed;
``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` (UTF-8); each non-empty line of the txt is one caption, and a key seen
again, in the same or another shard, adds its captions to the first occurrence's image; pickle members are never
read; a shard that cannot be read to its end keeps the samples before the damage and counts ``read_error``, a
caption file that is not UTF-8 drops its sample as ``caption_not_utf8``) and ``karpathy:dataset_coco.json`` (Karpathy split
json: ``images[].filepath/filename/split/sentences[].raw``; images under the json's folder, or ``image_root``).

A missing or malformed dataset raises :class:`DatasetError` naming the exact path expected.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from simzss.data.convert.benchmarks import raw_download_hint
from simzss.data.shards import ShardReadError, expand_urls, iter_samples
from simzss.data.transforms import open_image
from simzss.eval.metrics import IGNORE_INDEX
from simzss.resources import load_classnames

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DatasetError(ValueError):
    """A dataset folder or file that is missing or not in the expected layout."""


def parse_spec(spec: str) -> Tuple[str, str]:
    """Split ``"name:/path"`` into ``("name", "/path")`` (name lower-cased; only the first ``:`` splits)."""
    name, sep, path = spec.partition(":")
    if not sep or not name or not path:
        raise ValueError(f"dataset spec must look like NAME:PATH (e.g. voc:/data/VOCdevkit), got {spec!r}")
    return name.strip().lower(), path


# ----------------------------------------------------------------------------------------------- helpers


def _require(path: Path, what: str, dataset: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{dataset}: {what} not found: expected {path}")
    return path


def _pick_root(root: Path, subdirs: Sequence[str], marker: str, dataset: str) -> Path:
    """First of ``root/sub`` (sub in subdirs, "" = root itself) that contains ``marker``."""
    candidates = [root / s if s else root for s in subdirs]
    for c in candidates:
        if (c / marker).exists():
            return c
    raise DatasetError(
        f"{dataset}: expected {candidates[0] / marker}"
        + (f" (also looked in {', '.join(str(c / marker) for c in candidates[1:])})" if len(candidates) > 1 else "")
    )


def _read_split(path: Path, dataset: str) -> List[str]:
    ids = [ln.strip() for ln in _require(path, "split file", dataset).read_text().splitlines() if ln.strip()]
    if not ids:
        raise DatasetError(f"{dataset}: split file {path} is empty")
    return ids


def _check_exist(paths: Sequence[Path], what: str, dataset: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{dataset}: {len(missing)} of {len(paths)} {what} missing, e.g. expected {missing[0]}")


def read_mask(path: Path) -> np.ndarray:
    """Read a label PNG as ``uint8 [H, W]`` class ids (palette indices for palette PNGs, never colours)."""
    with open_image(path, reduce=False) as im:  # the decode pixel cap applies (ImageTooLargeError)
        if im.mode in ("P", "L"):
            arr = np.array(im)  # palette PNG: the indices themselves (convert("L") would give luminance)
        elif im.mode in ("I", "I;16", "I;16B", "I;16L"):
            arr = np.array(im)
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise DatasetError(f"mask {path} has label values outside 0..255")
        else:
            raise DatasetError(f"mask {path} has mode {im.mode}; expected a single-channel (L or palette) label PNG")
    return arr.astype(np.uint8, copy=False)


def read_image(path: Path) -> Image.Image:
    """Decode an image file as RGB with its EXIF orientation applied, as training, segment and serve do (fully
    loaded, file closed; under the decode pixel cap, never reduced)."""
    with open_image(path, reduce=False) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def _lut_reduce_zero() -> np.ndarray:
    """0 -> ignore, v -> v - 1, 255 stays ignore (mmseg reduce_zero_label)."""
    lut = np.arange(256, dtype=np.int16) - 1
    lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut.astype(np.uint8)


# ------------------------------------------------------------------------------------------ segmentation


@dataclass(eq=False)
class SegmentationDataset(torch.utils.data.Dataset):
    """Image/mask pairs with class names; ``ds[i]`` -> ``(PIL RGB image, uint8 [H, W] mask)``.

    ``label_lut`` (uint8[256]) maps stored mask values to evaluation class ids (e.g. reduce_zero_label).
    """

    name: str
    root: Path
    classnames: List[str]
    has_background: bool
    items: List[Tuple[str, Path, Path]]  # (key, image path, mask path)
    label_lut: Optional[np.ndarray] = None
    ignore_index: int = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def key(self, i: int) -> str:
        return self.items[i][0]

    def __getitem__(self, i: int) -> Tuple[Image.Image, np.ndarray]:
        key, img_path, mask_path = self.items[i]
        image = read_image(img_path)
        mask = read_mask(mask_path)
        if self.label_lut is not None:
            mask = self.label_lut[mask]
        if mask.shape != (image.height, image.width):
            raise DatasetError(
                f"{self.name}: mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {img_path} is "
                f"{image.width}x{image.height}"
            )
        return image, mask


def _voc_layout(path: Path, name: str, version: str, marker: str, mask_folder: str, split_folder: str, classes: str,
                with_background: bool) -> SegmentationDataset:
    """A VOCdevkit-style dataset (Pascal VOC, Pascal Context): JPEGImages, a PNG mask folder, a val split file.

    ``marker`` is the folder that identifies the dataset's root. Mask value 0 is background: a class of its own
    ``with_background``, else ignored (labels shift down by one).
    """
    root = _pick_root(path, [version, f"VOCdevkit/{version}", ""], marker, name)
    img_dir = _require(root / "JPEGImages", "image folder", name)
    mask_dir = _require(root / mask_folder, "mask folder", name)
    ids = _read_split(root / "ImageSets" / split_folder / "val.txt", name)
    items = [(i, img_dir / f"{i}.jpg", mask_dir / f"{i}.png") for i in ids]
    _check_exist([it[1] for it in items], "images", name)
    _check_exist([it[2] for it in items], "masks", name)
    fg = load_classnames(classes)
    if with_background:
        return SegmentationDataset(name, root, ["background"] + fg, True, items)
    return SegmentationDataset(name, root, fg, False, items, label_lut=_lut_reduce_zero())


def _voc(path: Path, with_background: bool) -> SegmentationDataset:
    name = "voc" if with_background else "voc20"
    return _voc_layout(path, name, "VOC2012", "JPEGImages", "SegmentationClass", "Segmentation", "voc20", with_background)


def _context(path: Path, with_background: bool) -> SegmentationDataset:
    name = "context60" if with_background else "context59"
    masks = "SegmentationClassContext"
    return _voc_layout(path, name, "VOC2010", masks, masks, "SegmentationContext", "context59", with_background)


def _coco_layout(path: Path, name: str, suffix: str) -> Tuple[Path, List[Tuple[str, Path, Path]]]:
    img_dir = _require(path / "images" / "val2017", "image folder", name)
    ann_dir = _require(path / "annotations" / "val2017", "annotation folder", name)
    masks = sorted(ann_dir.glob(f"*{suffix}"))
    if not masks:
        raise DatasetError(f"{name}: no masks found: expected {ann_dir}/<id>{suffix}")
    items = [(m.name[: -len(suffix)], img_dir / (m.name[: -len(suffix)] + ".jpg"), m) for m in masks]
    _check_exist([it[1] for it in items], "images", name)
    return path, items


def _coco_object(path: Path) -> SegmentationDataset:
    root, items = _coco_layout(path, "coco_object", "_instanceTrainIds.png")
    return SegmentationDataset("coco_object", root, ["background"] + load_classnames("coco_object80"), True, items)


def _coco_stuff(path: Path) -> SegmentationDataset:
    root, items = _coco_layout(path, "coco_stuff", "_labelTrainIds.png")
    return SegmentationDataset("coco_stuff", root, load_classnames("coco_stuff171"), False, items)


def _cityscapes(path: Path) -> SegmentationDataset:
    name = "cityscapes"
    img_dir = _require(path / "leftImg8bit" / "val", "image folder", name)
    gt_dir = _require(path / "gtFine" / "val", "annotation folder", name)
    images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DatasetError(f"{name}: no images found: expected {img_dir}/<city>/<id>_leftImg8bit.png")
    items = []
    for p in images:
        key = p.name[: -len("_leftImg8bit.png")]
        items.append((f"{p.parent.name}/{key}", p, gt_dir / p.parent.name / f"{key}_gtFine_labelTrainIds.png"))
    missing = [it[2] for it in items if not it[2].is_file()]
    if missing:
        raise DatasetError(
            f"{name}: {len(missing)} of {len(items)} masks missing, e.g. expected {missing[0]} "
            "(generate *_labelTrainIds.png with cityscapesscripts' createTrainIdLabelImgs)"
        )
    return SegmentationDataset(name, path, load_classnames("cityscapes19"), False, items)


def _ade20k(path: Path) -> SegmentationDataset:
    name = "ade20k"
    root = _pick_root(path, ["ADEChallengeData2016", ""], "images/validation", name)
    img_dir = root / "images" / "validation"
    ann_dir = _require(root / "annotations" / "validation", "annotation folder", name)
    images = sorted(img_dir.glob("*.jpg"))
    if not images:
        raise DatasetError(f"{name}: no images found: expected {img_dir}/<id>.jpg")
    items = [(p.stem, p, ann_dir / f"{p.stem}.png") for p in images]
    _check_exist([it[2] for it in items], "masks", name)
    return SegmentationDataset(name, root, load_classnames("ade20k150"), False, items, label_lut=_lut_reduce_zero())


def _folder(path: Path) -> SegmentationDataset:
    name = "folder"
    img_dir = _require(path / "images", "image folder", name)
    mask_dir = _require(path / "masks", "mask folder", name)
    cls_file = _require(path / "classes.txt", "class list", name)
    classnames = [ln.strip() for ln in cls_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not classnames:
        raise DatasetError(f"{name}: class list {cls_file} is empty")
    if len(classnames) > 255:
        raise DatasetError(f"{name}: {len(classnames)} classes in {cls_file}; at most 255 fit a uint8 mask")
    masks = sorted(mask_dir.glob("*.png"))
    if not masks:
        raise DatasetError(f"{name}: no masks found: expected {mask_dir}/<id>.png")
    by_stem: Dict[str, Path] = {}
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS:
            by_stem.setdefault(p.stem, p)
    missing = [m for m in masks if m.stem not in by_stem]
    if missing:
        raise DatasetError(
            f"{name}: {len(missing)} of {len(masks)} masks have no image, e.g. expected {img_dir / missing[0].stem}.jpg"
        )
    items = [(m.stem, by_stem[m.stem], m) for m in masks]
    has_bg = classnames[0].lower() == "background"
    return SegmentationDataset(name, path, classnames, has_bg, items)


SEGMENTATION_DATASETS: Dict[str, Callable[[Path], SegmentationDataset]] = {
    "voc": lambda p: _voc(p, True),
    "voc20": lambda p: _voc(p, False),
    "context60": lambda p: _context(p, True),
    "context59": lambda p: _context(p, False),
    "coco_object": _coco_object,
    "coco_stuff": _coco_stuff,
    "cityscapes": _cityscapes,
    "ade20k": _ade20k,
    "folder": _folder,
}


def build_segmentation_dataset(spec: str) -> SegmentationDataset:
    """Open a segmentation dataset from ``"name:/path"`` (names: see :data:`SEGMENTATION_DATASETS`)."""
    name, path = parse_spec(spec)
    if name not in SEGMENTATION_DATASETS:
        raise ValueError(f"unknown segmentation dataset {name!r} in {spec!r}; known: {sorted(SEGMENTATION_DATASETS)}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{name}: dataset folder not found: expected {root}")
    try:
        return SEGMENTATION_DATASETS[name](root)
    except DatasetError as e:
        hint = raw_download_hint(name, root)  # the official download, not yet converted
        if hint is None:
            raise
        raise DatasetError(f"{e}; {hint}") from None


# ---------------------------------------------------------------------------------------- classification


@dataclass(eq=False)
class ClassificationDataset(torch.utils.data.Dataset):
    """(image path, label) pairs; ``ds[i]`` -> ``(PIL RGB image, int label)``."""

    name: str
    root: Path
    classnames: List[str]
    samples: List[Tuple[Path, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Image.Image, int]:
        path, label = self.samples[i]
        return read_image(path), label


def _image_folder_samples(root: Path, name: str) -> Tuple[List[str], List[Tuple[Path, int]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{name}: no class folders found: expected {root}/<class>/<image>.jpg")
    samples = []
    for label, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        samples += [(p, label) for p in files]
    if not samples:
        raise DatasetError(f"{name}: no images found under {root}/<class>/")
    return classes, samples


IMAGENET_LAYOUT_HELP = (
    "expected either 1000 synset folders (PATH/n01440764/ILSVRC2012_val_00000293.JPEG, ...; sort the flat "
    "ILSVRC2012_img_val.tar into them with the standard valprep.sh script) or the flat val images "
    "(PATH/ILSVRC2012_val_00000001.JPEG, ...) with LOC_val_solution.csv (ImageId,PredictionString) in PATH or one "
    "of its four parent folders"
)
VAL_SOLUTION_CSV = "LOC_val_solution.csv"


def _is_synset(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def _imagenet_synset_folders(root: Path, folders: List[str]) -> None:
    """Check an ImageFolder-style ImageNet val folder (exactly 1000 synset folders)."""
    bad = [f for f in folders if not _is_synset(f)]
    if bad:
        raise DatasetError(f"imagenet: folder {root / bad[0]} is not a synset id; {IMAGENET_LAYOUT_HELP}")
    if len(folders) != 1000:
        raise DatasetError(f"imagenet: {root} has {len(folders)} class folders, expected 1000; {IMAGENET_LAYOUT_HELP}")


def _imagenet_flat(root: Path) -> List[Tuple[Path, int]]:
    """Samples of flat ILSVRC2012 val images labelled by ``LOC_val_solution.csv`` (label = sorted-synset index)."""
    candidates = [root, *list(root.resolve().parents)[:4]]
    csv_path = next((c / VAL_SOLUTION_CSV for c in candidates if (c / VAL_SOLUTION_CSV).is_file()), None)
    if csv_path is None:
        raise DatasetError(f"imagenet: no class folders and no {VAL_SOLUTION_CSV} in {root} or its parents; "
                           f"{IMAGENET_LAYOUT_HELP}")
    synset_of: Dict[str, str] = {}
    try:
        with csv_path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                tokens = (row.get("PredictionString") or "").split()
                image_id = (row.get("ImageId") or "").strip()
                if not image_id or not tokens or not _is_synset(tokens[0]):
                    raise DatasetError(f"imagenet: {csv_path} line {reader.line_num}: expected ImageId,PredictionString "
                                       f"with a synset first (e.g. ILSVRC2012_val_00000001,n01751748 ...), got {row}")
                synset_of[image_id] = tokens[0]
    except UnicodeDecodeError as e:
        raise DatasetError(f"imagenet: {csv_path} is not a UTF-8 csv: {e}") from None
    synsets = sorted(set(synset_of.values()))
    if len(synsets) != 1000:
        raise DatasetError(f"imagenet: {csv_path} names {len(synsets)} synsets, expected 1000")
    label_of = {s: i for i, s in enumerate(synsets)}
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DatasetError(f"imagenet: no images found in {root}; {IMAGENET_LAYOUT_HELP}")
    unlabelled = [p for p in files if p.stem not in synset_of]
    if unlabelled:
        raise DatasetError(f"imagenet: {len(unlabelled)} of {len(files)} images in {root} have no row in {csv_path}, "
                           f"e.g. {unlabelled[0].name}")
    if len(files) < len(synset_of):
        log.warning("imagenet: %s lists %d images, %d found in %s (evaluating those)",
                    csv_path, len(synset_of), len(files), root)
    return [(p, label_of[synset_of[p.stem]]) for p in files]


def build_classification_dataset(spec: str) -> ClassificationDataset:
    """Open ``imagenet:PATH`` or ``imagefolder:PATH`` (see the module docstring)."""
    name, path = parse_spec(spec)
    root = Path(path).expanduser()
    if name not in ("imagenet", "imagefolder"):
        raise ValueError(f"unknown classification dataset {name!r} in {spec!r}; known: ['imagefolder', 'imagenet']")
    if not root.is_dir():
        raise DatasetError(f"{name}: dataset folder not found: expected {root}")
    if name == "imagenet":
        names = load_classnames("imagenet1k")
        folders = sorted(d.name for d in root.iterdir() if d.is_dir())
        if folders:
            _imagenet_synset_folders(root, folders)
            _, samples = _image_folder_samples(root, name)
        else:
            samples = _imagenet_flat(root)
        return ClassificationDataset(name, root, names, samples)
    folders, samples = _image_folder_samples(root, name)
    cls_file = root / "classes.txt"
    if cls_file.is_file():
        classnames = [ln.strip() for ln in cls_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(classnames) != len(folders):
            raise DatasetError(f"imagefolder: {cls_file} lists {len(classnames)} names for {len(folders)} folders")
    else:
        classnames = [f.replace("_", " ") for f in folders]
    return ClassificationDataset(name, root, classnames, samples)


# --------------------------------------------------------------------------------------------- retrieval

# One retrieval record: (image key, zero-arg image loader, captions). Keys may repeat (wds): captions add up.
RetrievalRecord = Tuple[str, Callable[[], Image.Image], List[str]]


def _decode_bytes(data: bytes) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with open_image(io.BytesIO(data)) as im:
            return ImageOps.exif_transpose(im).convert("RGB")

    return load


def _count(skipped: Dict[str, int], reason: str) -> int:
    skipped[reason] = skipped.get(reason, 0) + 1
    return skipped[reason]


def _iter_wds(pattern: str, skipped: Dict[str, int]) -> Iterator[RetrievalRecord]:
    """Records of webdataset shards, read with :func:`simzss.data.shards.iter_samples` (raw bytes, no pickle).

    A shard that cannot be read to its end (missing, not a tar, truncated) keeps the samples read before the
    damage and is counted as ``read_error``; if no shard can be read at all it is a :class:`DatasetError`.
    """
    try:
        urls = expand_urls(pattern)
    except ValueError as e:
        raise DatasetError(f"wds: {e}") from None
    n = 0
    errors: List[ShardReadError] = []
    for url in urls:
        try:
            for sample in iter_samples(url):
                n += 1
                key = sample["__key__"]
                img = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
                if img is None:
                    _count(skipped, "no_image")
                    continue
                try:
                    text = sample["txt"].decode("utf-8") if "txt" in sample else ""
                except UnicodeDecodeError as e:
                    if _count(skipped, "caption_not_utf8") <= 3:
                        log.warning("wds: %s: sample %s skipped: caption is not UTF-8 (%s)", url, key, e)
                    continue
                yield key, _decode_bytes(img), [ln.strip() for ln in text.splitlines() if ln.strip()]
        except ShardReadError as e:
            errors.append(e)
            _count(skipped, "read_error")
            log.warning("wds: %s (samples before the damage kept)", e)
    if len(errors) == len(urls):
        raise DatasetError(f"wds: no shard of {pattern} could be read, e.g. {errors[0]}")
    if n == 0:
        raise DatasetError(f"wds: no samples read from {pattern}")


def _iter_karpathy(json_path: Path, image_root: Optional[Path], split: str, skipped: Dict[str, int]) -> Iterator[RetrievalRecord]:
    _require(json_path, "Karpathy split json", "karpathy")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        entries = [e for e in data["images"] if e.get("split") == split]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"karpathy: {json_path} is not a Karpathy split json (images[].split/filename): {e}") from None
    if not entries:
        raise DatasetError(f"karpathy: no images with split {split!r} in {json_path}")
    root = image_root or json_path.parent
    found = 0
    for e in entries:
        rel = Path(e.get("filepath", "")) / e["filename"]
        path = root / rel
        if not path.is_file():
            skipped["missing_image"] = skipped.get("missing_image", 0) + 1
            if skipped["missing_image"] <= 3:
                log.warning("karpathy: image missing: expected %s", path)
            continue
        found += 1
        caps = [s["raw"].strip() for s in e.get("sentences", []) if s.get("raw", "").strip()]
        yield str(rel), (lambda p=path: read_image(p)), caps
    if found == 0:
        raise DatasetError(f"karpathy: none of the {len(entries)} images found, e.g. expected {root / Path(entries[0].get('filepath', '')) / entries[0]['filename']}")


def iter_retrieval_records(
    spec: str, *, image_root: Optional[str] = None, split: str = "test", skipped: Optional[Dict[str, int]] = None
) -> Iterator[RetrievalRecord]:
    """Stream ``(key, load_image, captions)`` from ``wds:SHARDS`` or ``karpathy:JSON`` (see module docstring).

    Skipped records are counted by reason in ``skipped`` (the caller's dict) and logged.
    """
    name, path = parse_spec(spec)
    skipped = {} if skipped is None else skipped
    if name == "wds":
        return _iter_wds(path, skipped)
    if name == "karpathy":
        return _iter_karpathy(Path(path).expanduser(), Path(image_root) if image_root else None, split, skipped)
    raise ValueError(f"unknown retrieval dataset {name!r} in {spec!r}; known: ['karpathy', 'wds']")


__all__ = [
    "DatasetError",
    "parse_spec",
    "read_mask",
    "read_image",
    "SegmentationDataset",
    "SEGMENTATION_DATASETS",
    "build_segmentation_dataset",
    "ClassificationDataset",
    "build_classification_dataset",
    "RetrievalRecord",
    "iter_retrieval_records",
]
