"""One bad sample never costs more than itself: prepare and the on-the-fly training stream."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from fault_helpers import jpeg_bytes
from simzss.concepts import ConceptBank
from simzss.config import DataConfig
from simzss.data.prepare import prepare_shards
from simzss.data.shards import MAX_CAPTION_CHARS, iter_samples, write_sizes
from simzss.data.stream import build_train_loader

HUGE_CAPTION = ("a cat on a mat " * 140_000)[:2_000_000]  # spaCy refuses texts over 1,000,000 characters (E088)


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _hostile_shard(path: Path, good: int = 6) -> None:
    """``good`` plain samples plus: a 2M-character caption, absolute and ``..`` member names, an object-dtype
    ``.npy`` and an invalid ``.json`` next to otherwise good samples (raw tarfile: our writer refuses such names)."""
    img = jpeg_bytes()
    members = []
    for i in range(good):
        members += [(f"k{i:03d}.jpg", img), (f"k{i:03d}.txt", f"a cat number {i} on the grass".encode())]
    members += [("long.jpg", img), ("long.txt", HUGE_CAPTION.encode())]
    members += [("/abs/evil.jpg", img), ("/abs/evil.txt", b"a cat")]
    members += [("../../evil.jpg", img), ("../../evil.txt", b"a dog")]
    members += [("npy.jpg", img), ("npy.npy", _object_npy()), ("npy.txt", b"a dog on the grass")]
    members += [("meta.jpg", img), ("meta.json", b"{not json"), ("meta.txt", b"a bird in a tree")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_prepare_skips_and_counts_only_the_bad_samples(tmp_path: Path) -> None:
    src = tmp_path / "in" / "shard-0.tar"
    src.parent.mkdir()
    _hostile_shard(src)
    summary = prepare_shards(str(src), tmp_path / "out", progress=False, bank=ConceptBank.from_names(["cat", "dog"]))
    assert summary["shards_done"] == 1 and summary["shards_failed"] == 0
    assert summary["skipped"] == {"caption_too_long": 1}
    assert summary["dropped_members"] == {"bad_json": 1, "unknown_member": 1, "unsafe_name": 4}
    out = list(iter_samples(tmp_path / "out" / "shard-0.tar"))
    assert sorted(s["__key__"] for s in out) == ["k000", "k001", "k002", "k003", "k004", "k005", "meta", "npy"]
    for s in out:  # only understood members, under safe names
        assert set(s) - {"__key__"} <= {"jpg", "txt", "json", "concepts.json"}, s.keys()
    with tarfile.open(tmp_path / "out" / "shard-0.tar") as tar:
        names = tar.getnames()
    assert not [n for n in names if n.startswith("/") or ".." in n or n.endswith(".npy")]
    assert summary["samples"] == 8


def test_stream_without_concepts_skips_huge_caption_in_worker(tmp_path: Path) -> None:
    """Shards without concepts.json: spaCy runs in the DataLoader worker and must never see the huge caption."""
    from conftest import tiny_tokenizer

    img = jpeg_bytes()
    members = []
    for i in range(7):
        members += [(f"k{i:03d}.jpg", img), (f"k{i:03d}.txt", f"a cat on the grass, take {i}".encode())]
    members[6:6] = [("long.jpg", img), ("long.txt", HUGE_CAPTION.encode())]
    shard = tmp_path / "shards" / "s.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_sizes(shard.parent, {"s.tar": 8})
    assert len(HUGE_CAPTION) > MAX_CAPTION_CHARS
    cfg = DataConfig(shards=[str(shard)], image_size=16, crop_scale=(0.9, 1.0), workers=1, shuffle_buffer=0)
    loader = build_train_loader(cfg, tiny_tokenizer(tmp_path / "tok"), ConceptBank.from_names(["cat"]),
                                batch_size=7, context_length=16)
    batches = list(loader)
    assert len(batches) == 1
    # 8 samples, batch 7: positions k000-k002, long, k003-k005 (k006 is the partial batch); long's place is taken by
    # the next epoch's first sample (k000 again: one shard, no shuffling)
    assert batches[0].keys == [f"k{i:03d}" for i in range(6)] + ["k000"]
    skipped: Counter[str] = Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert skipped == {"caption_too_long": 2}  # counted per chunk of work touched: the next epoch's holds it too
    assert (batches[0].concept_labels >= 0).any()  # concepts were extracted on the fly for the good ones
