"""`simzss shards` on a miniature COCO Captions download, then `prepare` and `train` on its output.

The download has real JPEG files, one image listed but missing, one file that is not an image, one empty
caption; every other caption must arrive exactly once, with its image bytes unchanged and the skips counted.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from simzss.cli import main as simzss
from simzss.data.shards import iter_samples, read_sizes

torch.set_num_threads(1)

WORDS = ["cat", "dog", "grass", "sky", "car", "tree"]


def _jpeg(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def make_mini_coco(root: Path, num_images: int = 12) -> Dict[str, object]:
    """COCO layout: annotations/captions_train2017.json + train2017/NNN.jpg; returns what should come out."""
    images_dir = root / "train2017"
    images_dir.mkdir(parents=True)
    images, anns, expected = [], [], {}
    ann_id = 100
    for i in range(num_images):
        image_id = 1000 + i
        name = f"{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": name, "width": 48, "height": 48})
        if i == 0:
            pass  # listed, never written: missing image
        elif i == 1:
            (images_dir / name).write_bytes(b"this is not a jpeg")  # unreadable
        else:
            (images_dir / name).write_bytes(_jpeg(i))
        for j in range(3):
            ann_id += 1
            caption = f"a {WORDS[(i + j) % len(WORDS)]} next to a {WORDS[(i + 2 * j + 1) % len(WORDS)]}"
            if i == 2 and j == 1:
                caption = "   "  # empty caption
            anns.append({"id": ann_id, "image_id": image_id, "caption": caption})
            if i >= 2 and caption.strip():
                expected[(image_id, ann_id)] = caption
    (root / "annotations").mkdir()
    captions = root / "annotations" / "captions_train2017.json"
    captions.write_text(json.dumps({"images": images, "annotations": anns[::-1]}))  # order must not matter
    return {"captions": captions, "images": images_dir, "expected": expected}


def read_all(folder: Path) -> List[dict]:
    out = []
    for shard in sorted(folder.glob("*.tar")):
        out.extend(iter_samples(shard))
    return out


def test_coco_shards_prepare_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import tiny_tokenizer

    coco = make_mini_coco(tmp_path / "coco")
    expected: Dict = coco["expected"]  # type: ignore[assignment]
    shards = tmp_path / "shards"
    argv = ["shards", "coco", "--captions", str(coco["captions"]), "--images", str(coco["images"]),
            "--out", str(shards), "--samples-per-shard", "8", "--processes", "2", "--no-progress"]
    assert simzss(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == {"empty_caption": 1, "missing_image": 3, "unreadable_image": 3}
    assert summary["samples"] == len(expected) == 29

    samples = read_all(shards)
    got = Counter()
    for s in samples:
        meta = json.loads(s["json"])
        key = (meta["image_id"], meta["caption_id"])
        got[key] += 1
        assert s["txt"].decode() == expected[key]
        assert s["__key__"] == f"{meta['image_id']:012d}-{meta['caption_id']:09d}"
        assert s["jpg"] == (coco["images"] / meta["file_name"]).read_bytes()  # bytes copied unchanged
    assert got == Counter({k: 1 for k in expected})  # every caption exactly once
    sizes = read_sizes(shards)
    assert sizes == {"00000.tar": 8, "00001.tar": 8, "00002.tar": 8, "00003.tar": 5}  # fixed size, screened first

    # resumable: a rerun keeps the finished shards; a deleted shard is rebuilt byte-identically
    first = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").unlink()
    assert simzss(argv) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert (rerun["shards_written"], rerun["shards_skipped"]) == (1, 3)
    assert (shards / "00001.tar").read_bytes() == first
    # another input into the same folder is refused by name
    other = make_mini_coco(tmp_path / "coco2", num_images=5)
    bad = ["shards", "coco", "--captions", str(other["captions"]), "--images", str(other["images"]),
           "--out", str(shards), "--samples-per-shard", "8"]
    assert simzss(bad) == 2
    assert "another source" in capsys.readouterr().err

    prepared = tmp_path / "prepared"
    assert simzss(["prepare", str(shards / "{00000..00003}.tar"), "--out", str(prepared), "--no-progress"]) == 0
    prep = json.loads(capsys.readouterr().out)
    assert prep["captions"] == len(expected) and prep["skipped_total"] == 0
    assert all("concepts.json" in s for s in read_all(prepared))

    tiny_tokenizer(tmp_path / "tok", [c for c in expected.values()])
    bank = tmp_path / "bank.txt"
    bank.write_text("\n".join(WORDS) + "\n")
    overrides = [
        f"output_dir={tmp_path / 'runs'}", "run_name=coco", "batch_size=4", "max_steps=3", "log_every=1",
        "checkpoint_every=0", f"data.shards=[{prepared}]", "data.image_size=56", "data.workers=0",
        "data.shuffle_buffer=8", f"data.concept_bank={bank}", f"model.tokenizer={tmp_path / 'tok'}",
        "model.vision.pretrained=false", "model.vision.model_kwargs={depth: 1, img_size: 56}",
        "model.text.layers=1", "model.text.width=32", "model.text.heads=2", "model.text.context_length=16",
        "optim.scale_lr=false", "eval.datasets=[]", "report_to=none",
    ]
    assert simzss(["train", *overrides]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "coco" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(np.isfinite(r["loss"]) for r in steps)
    assert any(r["concepts_per_batch"] > 0 for r in steps)
    assert steps[-1]["skipped_samples"] == 0


def test_karpathy_split_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "root" / "val2014"
    images.mkdir(parents=True)
    entries = []
    for i in range(4):
        (images / f"im{i}.jpg").write_bytes(_jpeg(i))
        entries.append({"filepath": "val2014", "filename": f"im{i}.jpg", "cocoid": 7 + i, "imgid": i,
                        "split": ["train", "restval", "val", "test"][i],
                        "sentences": [{"raw": f"a cat number {i}", "sentid": 10 * i}]})
    kjson = tmp_path / "dataset_coco.json"
    kjson.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    base = ["shards", "coco", "--captions", str(kjson), "--images", str(tmp_path / "root"), "--no-progress"]
    assert simzss([*base, "--out", str(tmp_path / "k")]) == 2
    assert "--split" in capsys.readouterr().err
    assert simzss([*base, "--out", str(tmp_path / "k"), "--split", "train,restval"]) == 0
    capsys.readouterr()
    caps = sorted(s["txt"].decode() for s in read_all(tmp_path / "k"))
    assert caps == ["a cat number 0", "a cat number 1"]

    # the release's CSV format: tab-separated, columns filepath / title, paths relative to the table
    table = tmp_path / "root" / "train.csv"
    table.write_text("filepath\ttitle\n" + "".join(f"val2014/im{i}.jpg\ta dog number {i}\n" for i in range(4))
                     + "val2014/gone.jpg\ta lost dog\nhttp://example.com/x.jpg\ta web dog\n")
    assert simzss(["shards", "table", str(table), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == {"image_is_url": 1, "missing_image": 1} and summary["samples"] == 4
    got = {s["__key__"]: s["txt"].decode() for s in read_all(tmp_path / "t")}
    assert got == {f"{i:09d}": f"a dog number {i}" for i in range(4)}
    # a column that is not there is named; a URL-only table points to img2dataset
    assert simzss(["shards", "table", str(table), "--caption-column", "caption", "--out", str(tmp_path / "t2")]) == 2
    assert "no column 'caption'" in capsys.readouterr().err
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://a/1.jpg,one\nhttps://a/2.jpg,two\n")
    assert simzss(["shards", "table", str(urls), "--image-column", "url", "--caption-column", "caption",
                   "--out", str(tmp_path / "t3")]) == 2
    assert "img2dataset" in capsys.readouterr().err


def test_shards_prepare_in_the_same_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = make_mini_coco(tmp_path / "coco", num_images=4)
    out = tmp_path / "out"
    assert simzss(["shards", "coco", "--captions", str(coco["captions"]), "--images", str(coco["images"]),
                   "--out", str(out), "--prepare", "--no-progress"]) == 0
    capsys.readouterr()
    samples = read_all(out)
    assert len(samples) == len(coco["expected"])  # type: ignore[arg-type]
    for s in samples:
        concepts = json.loads(s["concepts.json"])["concepts"]
        text = s["txt"].decode()
        assert concepts and all(text[a:b] for c in concepts for a, b in c["spans"])
