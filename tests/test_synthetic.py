"""The synthetic toy world: determinism, layout, masks, captions, webdataset compatibility."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simzss.cli import demo_data
from simzss.data import synthetic
from simzss.data.shards import iter_samples, read_sizes
from simzss.data.synthetic import IGNORE_INDEX, TOY_CLASSES, generate_toy_world

SMALL = dict(num_train=24, num_val=4, image_size=64, shard_size=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    generate_toy_world(out, seed=3, **SMALL)
    return out


def _tree(root: Path) -> dict[str, bytes]:
    """Every file's bytes, except fingerprints.json and the shard indexes (they record the shards' mtimes, which
    differ per run)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "fingerprints.json" and not p.name.endswith(".idx")}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(world: Path, tmp_path: Path) -> None:
    generate_toy_world(tmp_path / "again", seed=3, **SMALL)
    generate_toy_world(tmp_path / "other", seed=4, **SMALL)
    first, again, other = _tree(world), _tree(tmp_path / "again"), _tree(tmp_path / "other")
    assert first == again
    assert first.keys() == other.keys()
    assert first["train/shard-000000.tar"] != other["train/shard-000000.tar"]


def test_layout_and_sizes(world: Path) -> None:
    shards = sorted(p.name for p in (world / "train").glob("*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert read_sizes(world / "train", missing_ok=False) == {shards[0]: 10, shards[1]: 10, shards[2]: 4}
    assert sorted(p.name for p in (world / "val" / "images").iterdir()) == [f"{i:06d}.jpg" for i in range(4)]
    assert sorted(p.name for p in (world / "val" / "masks").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    classes = (world / "val" / "classes.txt").read_text().splitlines()
    assert classes == TOY_CLASSES and "background" not in classes
    assert len(set(classes)) == len(classes) == 16
    meta = json.loads((world / "toy_world.json").read_text())
    assert meta["seed"] == 3 and meta["classes"] == TOY_CLASSES
    keys = [s["__key__"] for p in sorted((world / "train").glob("*.tar")) for s in iter_samples(p)]
    assert keys == [f"{i:09d}" for i in range(24)]


def test_masks_match_images_and_hold_valid_labels(world: Path) -> None:
    saw_ignore = False
    for mask_path in sorted((world / "val" / "masks").glob("*.png")):
        mask_img = Image.open(mask_path)
        assert mask_img.mode == "L"
        mask = np.asarray(mask_img)
        image = Image.open(world / "val" / "images" / mask_path.with_suffix(".jpg").name)
        assert image.size == (64, 64) and mask.shape == (64, 64) and mask.dtype == np.uint8
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(TOY_CLASSES))) | {IGNORE_INDEX}
        assert values - {IGNORE_INDEX}, "a mask must label something"
        saw_ignore |= IGNORE_INDEX in values
        assert (mask == IGNORE_INDEX).mean() < 0.25  # thin borders only
    assert saw_ignore


def test_ignore_marks_only_thing_borders() -> None:
    labels = np.zeros((12, 12), np.uint8)  # sky everywhere
    labels[6:, :] = TOY_CLASSES.index("grass")  # a stuff/stuff border: kept
    labels[3:6, 3:6] = TOY_CLASSES.index("ball")  # a thing: its rim is ignored
    out = synthetic.ignore_borders(labels)
    grass, ball = TOY_CLASSES.index("grass"), TOY_CLASSES.index("ball")
    assert out[5, 0] == 0 and out[6, 0] == grass and out[5, 11] == 0  # stuff/stuff border kept
    assert out[4, 4] == ball  # interior kept
    assert out[3, 3] == out[4, 2] == out[2, 4] == out[6, 4] == IGNORE_INDEX  # rim on both sides
    assert out[1, 4] == 0 and out[7, 4] == grass  # one pixel wide
    assert (out == IGNORE_INDEX).sum() == 8 + 12  # 3x3 thing: its 8 rim pixels + 12 outside it (4-neighbours)


def _names_in(caption: str) -> set[str]:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return {c.name for c in synthetic.CLASSES if c.name in words or c.plural in words}


def test_captions_mention_present_classes(tmp_path: Path) -> None:
    generate_toy_world(tmp_path, num_train=300, num_val=0, image_size=64, shard_size=300, seed=0)
    samples = list(iter_samples(tmp_path / "train" / "shard-000000.tar"))
    visible = mentioned = 0
    captions = []
    for s in samples:
        caption = s["txt"].decode("utf-8")
        meta = json.loads(s["json"])
        captions.append(caption)
        assert meta["caption"] == caption and meta["classes"]
        assert set(meta["mentioned"]) <= set(meta["classes"]), caption
        assert meta["mentioned"], caption
        assert _names_in(caption) == set(meta["mentioned"]), caption  # names no absent class
        big = {i["class"] for i in meta["instances"] if i["area"] > 0.01}
        visible += len(big)
        mentioned += len(big & set(meta["mentioned"]))
        image = Image.open(io.BytesIO(s["jpg"]))
        assert image.size == (64, 64) and image.mode == "RGB"
    assert mentioned / visible > 0.85  # most visible things are named
    assert len(set(captions)) > 0.9 * len(captions)  # varied, not a handful of templates
    text = " ".join(captions).lower()
    for marker in ("two ", " and ", ", with ", "there are", " the ", "boats", "next to"):
        assert marker in text, marker  # plurals, several clauses, relations


def test_toy_classes_are_in_the_default_bank_and_extracted() -> None:
    from simzss.concepts import ConceptBank, ConceptExtractor

    bank = ConceptBank.default()
    assert all(bank.lookup(c) is not None for c in TOY_CLASSES)
    assert len({bank.lookup(c) for c in TOY_CLASSES}) == len(TOY_CLASSES)
    rng = np.random.default_rng(0)
    scenes = [synthetic.make_scene(rng, 64) for _ in range(60)]
    pairs = [synthetic.make_caption(rng, s) for s in scenes]
    concepts = ConceptExtractor()([c for c, _ in pairs])
    found = total = 0
    for (_, names), cs in zip(pairs, concepts):
        ids = {bank.lookup(c.concept) for c in cs}
        total += len(names)
        found += sum(bank.lookup(n) in ids for n in names)
    assert found / total > 0.85


def test_shards_iterate_with_webdataset(world: Path) -> None:
    wds = pytest.importorskip("webdataset")
    urls = [str(p) for p in sorted((world / "train").glob("*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    samples = list(ds)
    assert len(samples) == 24
    for s in samples:
        assert s["jpg"].size == (64, 64)
        assert isinstance(s["txt"], str) and s["txt"]
        assert s["json"]["key"] == s["__key__"]


def test_cli_refuses_non_empty_output_and_overwrites_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path), "--num-train", "3", "--num-val", "1", "--image-size", "48", "--shard-size", "2"]
    assert demo_data.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == ["shard-000000.tar", "shard-000001.tar"] and summary["num_train"] == 3
    assert demo_data.main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert demo_data.main(args[:3] + ["--num-val", "0", "--image-size", "48", "--shard-size", "5", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "fingerprints.json", "shard-000000.tar", "shard-000000.tar.idx", "sizes.json"]
    assert not any((tmp_path / "val" / "images").iterdir())


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        generate_toy_world(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="shard_size"):
        generate_toy_world(tmp_path, shard_size=0)
