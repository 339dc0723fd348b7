"""Read COCO Captions (``captions_train2017.json`` / ``captions_val2017.json``, or Karpathy's
``dataset_coco.json`` / ``dataset_flickr30k.json`` with a split) as one :class:`Record` per (image, caption)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from simzss.data.convert.writer import Record

#: Karpathy split names (``restval`` is the part of COCO val2014 that the usual "train" uses as well).
KARPATHY_SPLITS = ("train", "restval", "val", "test")


class CocoFormatError(ValueError):
    """A captions file that is neither COCO Captions nor a Karpathy split json, or a bad split choice."""


def caption_key(image_id: int, caption_id: int) -> str:
    """The stable sample key of one caption: zero-padded image id, then the caption id (sorts by image)."""
    return f"{image_id:012d}-{caption_id:09d}"


def _coco_records(data: Dict[str, Any], images_dir: Path, path: Path) -> Tuple[List[Record], Counter]:
    try:
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        anns = [(int(a["image_id"]), int(a["id"]), a.get("caption")) for a in data["annotations"]]
    except (KeyError, TypeError, ValueError) as e:
        raise CocoFormatError(f"{path}: not a COCO Captions file (images[].id/file_name, "
                              f"annotations[].id/image_id/caption): {e!r}") from None
    skipped: Counter = Counter()
    records = []
    for image_id, ann_id, caption in sorted(anns, key=lambda a: (a[0], a[1])):
        if image_id not in files:
            skipped["unknown_image_id"] += 1  # an annotation of an image the file does not list
            continue
        file_name = files[image_id]
        records.append(Record(
            key=caption_key(image_id, ann_id),
            image=os.fspath(images_dir / file_name),
            caption=caption if isinstance(caption, str) else "",
            meta={"image_id": image_id, "caption_id": ann_id, "file_name": file_name},
        ))
    return records, skipped


def _karpathy_records(data: Dict[str, Any], images_dir: Path, path: Path, splits: Sequence[str]) -> List[Record]:
    records = []
    try:
        for im in data["images"]:
            if im.get("split") not in splits:
                continue
            image_id = int(im["cocoid"] if "cocoid" in im else im["imgid"])
            rel = Path(im.get("filepath", "")) / im["filename"]
            for s in im.get("sentences", []):
                records.append(Record(
                    key=caption_key(image_id, int(s["sentid"])),
                    image=os.fspath(images_dir / rel),
                    caption=s.get("raw") if isinstance(s.get("raw"), str) else "",
                    meta={"image_id": image_id, "caption_id": int(s["sentid"]), "file_name": rel.as_posix(),
                          "split": im["split"]},
                ))
    except (KeyError, TypeError, ValueError) as e:
        raise CocoFormatError(f"{path}: not a Karpathy split json (images[].filename/split/sentences[].sentid/raw "
                              f"and cocoid or imgid): {e!r}") from None
    records.sort(key=lambda r: r.key)
    return records


def read_coco_captions(captions: str | os.PathLike, images_dir: str | os.PathLike,
                       split: Optional[str] = None) -> Tuple[List[Record], Counter]:
    """Records of a COCO Captions json (``split`` must be None) or a Karpathy json (``split``: comma-separated
    names from :data:`KARPATHY_SPLITS`, e.g. ``train,restval``), sorted by key; plus counts of annotations that
    could not become records. Image paths: ``images_dir/file_name`` (COCO) or ``images_dir/filepath/filename``
    (Karpathy). Raises :class:`CocoFormatError` / ``FileNotFoundError`` with the path."""
    path = Path(captions)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoFormatError(f"{path}: expected a JSON object with an 'images' list (COCO Captions or Karpathy)")
    images = Path(images_dir)
    if "annotations" in data:
        if split:
            raise CocoFormatError(f"{path} is a COCO Captions file (one per split); --split is only for Karpathy's "
                                  "dataset_coco.json")
        return _coco_records(data, images, path)
    if not split:
        raise CocoFormatError(f"{path} is a Karpathy split json: choose --split from {', '.join(KARPATHY_SPLITS)} "
                              "(comma-separated, e.g. train,restval)")
    splits = [s.strip() for s in split.split(",") if s.strip()]
    bad = [s for s in splits if s not in KARPATHY_SPLITS]
    if bad or not splits:
        raise CocoFormatError(f"--split {split!r}: unknown split(s) {bad}; choose from {', '.join(KARPATHY_SPLITS)}")
    return _karpathy_records(data, images, path, splits), Counter()


__all__ = ["CocoFormatError", "KARPATHY_SPLITS", "caption_key", "read_coco_captions"]
