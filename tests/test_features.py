"""Frozen-feature cache: ``simzss cache-features`` output (once per image, K views), the cached training stream
(disk / RAM serving, per-epoch views, resume), equivalence with the image path, compatibility checks, input
fingerprints and pickle safety. Random-init towers, toy-world data, CPU only."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from simzss.config import DataConfig, ModelConfig, TextConfig, VisionConfig
from simzss.data.shards import iter_samples, write_shard, write_sizes

VISION = "vit_small_patch14_reg4_dinov2"
VISION_KW = {"depth": 2}
IMAGE_SIZE = 56  # 4 x 4 patches of 14 px
GRID = IMAGE_SIZE // 14
DIM = 384


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _concepts_json(nlp_concepts: List[Any]) -> bytes:
    return json.dumps({"version": 1, "concepts": [c.to_json() for c in nlp_concepts]}).encode()


def _build(world: Dict[str, Any], out: Path, shards: Any = None, **kw: Any) -> Dict[str, Any]:
    from simzss.cli.cache_features import cache_features

    vision = VisionConfig(name=VISION, pretrained=False, weights=str(world["weights"]), model_kwargs=dict(VISION_KW))
    args = {"image_size": IMAGE_SIZE, "workers": 0, "progress": False, "device": "cpu", **kw}
    return cache_features(shards or [str(world["prepared"])], out, vision=vision, **args)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """Toy shards annotated with concepts.json, vision weights on disk, a BPE tokenizer and a cache."""
    from safetensors.torch import save_file

    from simzss.cli.cache_features import main
    from simzss.concepts import ConceptBank, ConceptExtractor
    from simzss.data.synthetic import generate_toy_world
    from simzss.data.tokenize import train_bpe_tokenizer
    from simzss.models.vision import FrozenVisionTower

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("features")
    info = generate_toy_world(root / "toy", num_train=24, num_val=0, image_size=64, shard_size=8, seed=3)
    prepared = root / "prepared"
    prepared.mkdir()
    extractor = ConceptExtractor("en_core_web_sm")
    sizes = {}
    captions: List[str] = []
    for name in info["shards"]:
        samples = list(iter_samples(Path(info["train_dir"]) / name))
        texts = [s["txt"].decode() for s in samples]
        captions += texts
        for s, concepts in zip(samples, extractor(texts)):
            s["concepts.json"] = _concepts_json(concepts)
        sizes[name] = write_shard(prepared / name, samples)
    write_sizes(prepared, sizes)

    # one fixed random-init tower, saved, so the cache and the model share weights
    torch.manual_seed(0)
    tower = FrozenVisionTower(VISION, pretrained=False, model_kwargs=VISION_KW)
    weights = root / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in tower.model.state_dict().items()}, str(weights))

    cache = root / "cache"
    rc = main([str(prepared), "--out", str(cache), "--vision", VISION, "--vision-kwargs", json.dumps(VISION_KW),
               "--weights", str(weights), "--image-size", str(IMAGE_SIZE), "--batch-size", "5", "--workers", "2",
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    tokenizer = train_bpe_tokenizer(captions * 4, root / "tok", vocab_size=300, min_frequency=1)
    world = {"root": root, "prepared": prepared, "cache": cache, "weights": weights, "tokenizer": tokenizer,
             "bank": ConceptBank.default(), "sizes": sizes, "captions": captions}
    world["views2"] = root / "views2"  # two augmented views per image
    _build(world, world["views2"], views=2, crop_scale=(0.3, 0.8), workers=2, batch_size=6, seed=1)
    return world


def _model_cfg(weights: Path) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(name=VISION, pretrained=False, weights=str(weights), model_kwargs=dict(VISION_KW)),
        text=TextConfig(layers=1, width=64, heads=2, context_length=32),
    )


def _loader(world: Dict[str, Any], batch_size: int = 4, workers: int = 0, cache: Any = None, **kw: Any) -> Any:
    from simzss.data.features import build_cached_loader

    cfg = DataConfig(feature_cache=str(cache or world["cache"]), workers=workers, **{"shuffle_buffer": 8, **kw})
    return build_cached_loader(cfg, world["tokenizer"], world["bank"], batch_size=batch_size, context_length=32)


def _same_batches(a: List[Any], b: List[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys and x.captions == y.captions
        for name in ("input_ids", "attention_mask", "concept_mask", "concept_labels", "vision_cls", "vision_patches"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.dtype == ty.dtype and torch.equal(tx, ty), name


# --------------------------------------------------------------------------------------------------------------
# the cache's layout


def test_cache_layout_meta_and_atomic_files(world: Dict[str, Any]) -> None:
    cache: Path = world["cache"]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["complete"] and meta["format"] == "simzss-feature-cache" and meta["version"] == 2
    assert meta["vision"]["name"] == VISION and meta["vision"]["model_kwargs"] == VISION_KW
    assert (meta["image_size"], meta["grid"], meta["dim"], meta["dtype"], meta["views"]) == (
        IMAGE_SIZE, [GRID, GRID], DIM, "fp16", 1)
    assert [Path(p).name for p in meta["source_shards"]] == sorted(world["sizes"])
    st = (world["prepared"] / "shard-000001.tar").stat()
    assert meta["source_fingerprint"]["shard-000001.tar"] == [st.st_size, st.st_mtime_ns]
    assert json.loads((cache / "sizes.json").read_text()) == world["sizes"]
    assert meta["num_samples"] == meta["num_images"] == 24  # the toy world has one caption per image
    assert not [p for p in cache.iterdir() if "tmp" in p.name]  # atomic writes leave no temporaries
    sample = next(iter_samples(cache / "shard-000000.tar"))
    assert set(sample) == {"__key__", "txt", "concepts.json", "image"}  # captions only: no pixels, no features
    cls = np.load(cache / "cls.npy", allow_pickle=False)
    patches = np.load(cache / "patches.npy", allow_pickle=False)
    assert cls.dtype == patches.dtype == np.float16
    assert cls.shape == (24, 1, DIM) and patches.shape == (24, 1, GRID, GRID, DIM)
    assert np.isfinite(patches).all() and np.abs(patches).sum(axis=(1, 2, 3, 4)).min() > 0  # every row written
    umask = os.umask(0)
    os.umask(umask)
    assert (cache / "patches.npy").stat().st_mode & 0o777 == 0o666 & ~umask


def test_captions_of_one_image_share_one_stored_feature(world: Dict[str, Any], tmp_path: Path) -> None:
    """COCO-like shards (3 captions per image): grouped by KEY.json image_id when present (even when the encoded
    bytes differ), else by identical image bytes; the arrays hold each image's views once."""
    from PIL import Image

    src = [s for name in sorted(world["sizes"]) for s in iter_samples(world["prepared"] / name)][:8]
    coco, plain = [], []
    for i, s in enumerate(src[:4]):  # by image id: the 2nd and 3rd captions carry a re-encoded copy of the image
        png = io.BytesIO()
        Image.open(io.BytesIO(s["jpg"])).save(png, format="PNG")
        for c, (ext, data) in enumerate([("jpg", s["jpg"]), ("png", png.getvalue()), ("png", png.getvalue())]):
            coco.append({"__key__": f"{i:06d}-{c}", ext: data, "txt": world["captions"][(i + c) % 24],
                         "json": {"image_id": 1000 + i, "caption_id": c}})
    for i, s in enumerate(src[4:]):  # no image id: identical bytes
        for c in range(3):
            plain.append({"__key__": f"p{i:05d}-{c}", "jpg": s["jpg"], "txt": world["captions"][(i + c) % 24]})
    shards = tmp_path / "coco"
    shards.mkdir()
    write_sizes(shards, {"a.tar": write_shard(shards / "a.tar", coco), "b.tar": write_shard(shards / "b.tar", plain)})
    meta = _build(world, tmp_path / "cache", [str(shards)], views=2, crop_scale=(0.5, 1.0), dtype="bf16")
    assert (meta["num_images"], meta["num_samples"]) == (8, 24)
    assert meta["image_identity"] == {"image_id": 4, "sha256": 4}
    # size check: 8 images x 2 views x (1 + 16) tokens x 384 x 2 bytes (+ the .npy headers), not 24 samples' worth
    feature_bytes = sum((tmp_path / "cache" / f).stat().st_size for f in ("cls.npy", "patches.npy"))
    assert 8 * 2 * 17 * DIM * 2 <= feature_bytes <= 8 * 2 * 17 * DIM * 2 + 2 * 256
    assert meta["feature_bytes"] == 8 * 2 * 17 * DIM * 2
    rows = {s["__key__"]: int(s["image"]) for n in ("a.tar", "b.tar") for s in iter_samples(tmp_path / "cache" / n)}
    assert sorted(set(rows.values())) == list(range(8))
    for prefix in [f"{i:06d}" for i in range(4)] + [f"p{i:05d}" for i in range(4)]:
        assert len({rows[f"{prefix}-{c}"] for c in range(3)}) == 1, prefix
    # served: the captions of one image carry identical features (bf16, from the stored bits)
    batch = next(iter(_loader(world, batch_size=24, cache=tmp_path / "cache", shuffle_buffer=0)))
    assert batch.vision_cls.dtype == torch.bfloat16
    by_row: Dict[int, torch.Tensor] = {}
    for k, feats in zip(batch.keys, batch.vision_patches):
        assert torch.equal(by_row.setdefault(rows[k], feats), feats)
    stored = np.load(tmp_path / "cache" / "cls.npy")
    assert stored.dtype == np.uint16  # bf16 bit patterns
    r0 = rows[batch.keys[0]]
    assert any(torch.equal(batch.vision_cls[0], torch.from_numpy(stored[r0, v].view(np.int16)).view(torch.bfloat16))
               for v in range(2))


def test_augmented_views_are_the_stream_crops_and_seeded(world: Dict[str, Any], tmp_path: Path) -> None:
    """The stored views are the training stream's decode + random resized crops (data.decode=cpu: decode_crop,
    the same scale, ratios and interpolation) drawn under a per-image seed: independent of workers and batching,
    recomputable here."""
    from simzss.data.decode import decode_crop
    from simzss.data.features.format import image_identity
    from simzss.data.features.writer import image_seed
    from simzss.data.transforms import normalize_batch
    from simzss.models.vision import build_vision_tower

    shard = [str(world["prepared"] / "shard-000000.tar")]
    kw = dict(views=2, crop_scale=(0.3, 0.8), seed=1)
    a, b = _build(world, tmp_path / "a", shard, **kw), _build(world, tmp_path / "b", shard, workers=2, batch_size=3, **kw)
    assert a["augment"] and a["views"] == 2 and a["decode"] == "cpu"
    for f in ("cls.npy", "patches.npy", "shard-000000.tar"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    patches = np.load(tmp_path / "a" / "patches.npy")
    assert not np.array_equal(patches[:, 0], patches[:, 1])
    # reference: crop image 0 as the stream would under its seed, run the tower, compare to the stored rows
    s = next(iter_samples(shard[0]))
    kind, ident = image_identity(s, s["jpg"])
    torch.manual_seed(image_seed(1, f"{kind}:{ident}"))
    views = normalize_batch(torch.stack([decode_crop(s["jpg"], IMAGE_SIZE, (0.3, 0.8), "bicubic") for _ in range(2)]))
    tower = build_vision_tower(VisionConfig(name=VISION, pretrained=False, weights=str(world["weights"]),
                                            model_kwargs=dict(VISION_KW)))
    with torch.no_grad():
        _, ref = tower(views)
    torch.testing.assert_close(torch.from_numpy(patches[0].astype(np.float32)), ref, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------------------------------------------
# serving


def test_cached_loader_views_per_epoch_and_exact_resume(world: Dict[str, Any]) -> None:
    """Two data workers, two views: each epoch serves every image in another view (a function of seed, epoch and
    image); resuming mid-epoch 1 gives the uninterrupted run's remaining batches, features included."""
    loader = _loader(world, batch_size=4, workers=2, cache=world["views2"])
    assert len(loader) == 6 and loader.meta["views"] == 2
    epoch0, epoch1 = list(loader), list(loader)
    b = epoch0[0]
    assert b.images is None and b.vision_patches.dtype == torch.float16
    assert b.vision_cls.shape == (4, DIM) and b.vision_patches.shape == (4, GRID, GRID, DIM)
    assert sum(int((x.concept_labels >= 0).sum()) for x in epoch0) > 10  # toy captions name bank classes
    # the shuffle buffer mixes neighbouring ranges of the workers, so an epoch covers the captions approximately
    assert {k for x in epoch0 for k in x.keys} <= {f"{i:09d}" for i in range(24)}
    feats0 = {k: f for x in epoch0 for k, f in zip(x.keys, x.vision_cls)}
    feats1 = {k: f for x in epoch1 for k, f in zip(x.keys, x.vision_cls)}
    both = feats0.keys() & feats1.keys()
    assert len(both) >= 12 and all(not torch.equal(feats0[k], feats1[k]) for k in both)  # another view each epoch
    stored = np.load(world["views2"] / "cls.npy")
    rows = {s["__key__"]: int(s["image"]) for n in world["sizes"] for s in iter_samples(world["views2"] / n)}
    for k, f in feats0.items():  # the served rows are stored views
        assert any(np.array_equal(f.numpy(), stored[rows[k], v]) for v in range(2))

    resumed = _loader(world, batch_size=4, workers=2, cache=world["views2"])
    resumed.load_state_dict({**loader.state_dict(), "epoch": 1, "batches_consumed": 3, "worker_batches": [2, 1]})
    _same_batches(list(resumed), epoch1[3:])


def test_disk_and_ram_serving_give_identical_batches(world: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from simzss.data.features import CacheError, FeatureStore
    from simzss.data.features import reader

    disk = _loader(world, batch_size=4, workers=2, cache=world["views2"], feature_cache_device="disk")
    ram = _loader(world, batch_size=4, workers=2, cache=world["views2"], feature_cache_device="ram")
    assert ram.store is not None and disk.store is None
    assert ram.store.nbytes == world_nbytes(world["views2"])
    for _ in range(2):  # two epochs: the per-epoch views agree too
        from_disk, from_ram = list(disk), list(ram)
        _same_batches(from_disk, from_ram)
        # ram: the workers send row numbers in feature_rows and the loader swaps in the features
        assert all(b.feature_rows is None and b.vision_cls.dtype == torch.float16 for b in from_disk + from_ram)

    if not torch.cuda.is_available():
        with pytest.raises(CacheError, match=r"^data.feature_cache_device=gpu needs a CUDA GPU"):
            _loader(world, cache=world["views2"], feature_cache_device="gpu")
    monkeypatch.setattr(reader, "_host_available_bytes", lambda: 1000)
    need = world_nbytes(world["views2"]) / 1e9
    with pytest.raises(CacheError, match=rf"need {need:.2f} GB of host RAM but 0.00 GB are available"):
        FeatureStore(world["views2"], ram.meta, where="ram")
    with pytest.raises(CacheError, match="feature_cache_device must be one of disk, ram, gpu"):
        _loader(world, cache=world["views2"], feature_cache_device="ssd")


def world_nbytes(cache: Path) -> int:
    return sum(np.load(cache / f, mmap_mode="r").nbytes for f in ("cls.npy", "patches.npy"))


def test_cached_stream_matches_image_stream_text_side(world: Dict[str, Any]) -> None:
    """Same shards, seed and (no) shuffling: the cached stream's keys, tokens and concepts equal the image
    stream's, so the overridden decode/collate stay in step with simzss.data.stream."""
    from simzss.data.stream import build_train_loader

    cached = list(_loader(world, batch_size=8, workers=0, shuffle_buffer=0))
    cfg = DataConfig(shards=[str(world["prepared"] / n) for n in sorted(world["sizes"])], workers=0,
                     shuffle_buffer=0, image_size=IMAGE_SIZE)
    images = list(build_train_loader(cfg, world["tokenizer"], world["bank"], batch_size=8, context_length=32))
    assert len(cached) == len(images) == 3
    for c, i in zip(cached, images):
        assert c.keys == i.keys and c.captions == i.captions
        for name in ("input_ids", "attention_mask", "concept_mask", "concept_labels"):
            assert torch.equal(getattr(c, name), getattr(i, name)), name


def test_forward_on_cached_batch_equals_forward_on_images(world: Dict[str, Any]) -> None:
    from simzss.data.stream import Batch
    from simzss.data.transforms import decode_image, eval_transform
    from simzss.models.simzss import SimZSS

    torch.manual_seed(0)
    model = SimZSS.from_config(_model_cfg(world["weights"]), world["tokenizer"]).eval()
    cached = next(iter(_loader(world, batch_size=8)))
    source = {s["__key__"]: s for name in world["sizes"] for s in iter_samples(world["prepared"] / name)}
    tf = eval_transform(IMAGE_SIZE)
    images = torch.stack([tf(decode_image(source[k]["jpg"], IMAGE_SIZE)) for k in cached.keys])
    with_images = Batch(images=images, input_ids=cached.input_ids, attention_mask=cached.attention_mask,
                        concept_mask=cached.concept_mask, concept_labels=cached.concept_labels,
                        captions=cached.captions, keys=cached.keys)
    cls, patches = model.vision(images)
    torch.testing.assert_close(cached.vision_cls.float(), cls, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(cached.vision_patches.float(), patches, rtol=2e-3, atol=2e-3)
    assert int((cached.concept_labels >= 0).sum()) > 0
    with torch.no_grad():
        out_img, out_cache = model(with_images), model(cached)
    for name in ("loss", "global_loss", "concept_loss"):
        torch.testing.assert_close(getattr(out_cache, name), getattr(out_img, name), rtol=1e-3, atol=1e-3)


def test_cached_training_equals_on_the_fly_training(world: Dict[str, Any], tmp_path: Path) -> None:
    """The trainer from a cache that holds exactly the crops the on-the-fly stream takes (crop scale 1: the whole
    image; fp32 storage) logs the same losses, step by step, as the trainer with the tower in the loop."""
    from simzss.config import TrainConfig, load_config
    from simzss.engine.trainer import train

    cache = tmp_path / "exact"
    _build(world, cache, augment=True, crop_scale=(1.0, 1.0), dtype="fp32", batch_size=8)
    common = [
        f"output_dir={tmp_path / 'runs'}", "batch_size=8", "log_every=1", "checkpoint_every=0", "max_steps=4",
        f"data.shards=['{world['prepared']}']", f"data.image_size={IMAGE_SIZE}", "data.crop_scale=[1.0, 1.0]",
        "data.workers=0", "data.shuffle_buffer=8", f"model.tokenizer={world['root'] / 'tok'}",
        f"model.vision.name={VISION}", "model.vision.pretrained=false", f"model.vision.weights={world['weights']}",
        "model.vision.model_kwargs={depth: 2}", "model.text.layers=1", "model.text.width=64", "model.text.heads=2",
        "model.text.context_length=32", "optim.scale_lr=false", "optim.lr=1e-3", "optim.warmup=0", "eval.datasets=[]",
        "cpu=true",  # fp32 steps (mixed_precision auto) on any machine
    ]
    losses = {}
    runs = (("fly", []), ("cached", [f"data.feature_cache={cache}"]),
            ("ram", [f"data.feature_cache={cache}", "data.feature_cache_device=ram"]))
    for run, extra in runs:
        result = train(load_config(TrainConfig, None, [*common, f"run_name={run}", *extra]))
        rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        losses[run] = [(r["loss"], r["global_loss"], r["concept_loss"]) for r in rows if "loss" in r]
    assert len(losses["fly"]) == len(losses["cached"]) == 4
    assert losses["ram"] == losses["cached"]  # ram serving: the same features, bit for bit
    assert any(c > 0 for _, _, c in losses["fly"])  # the concept branch took part
    assert losses["fly"][0] != losses["fly"][-1]  # the model learned between the steps compared
    np.testing.assert_allclose(np.array(losses["cached"]), np.array(losses["fly"]), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# compatibility, stale input, damage


def test_incompatible_cache_is_refused(world: Dict[str, Any]) -> None:
    from simzss.data.features import CacheError, check_cache_compatible, read_cache_meta

    meta = read_cache_meta(world["cache"])
    cfg = _model_cfg(world["weights"])
    check_cache_compatible(meta, cfg, IMAGE_SIZE)  # the matching config passes
    with pytest.raises(CacheError, match="image size 56 != training image size 224"):
        check_cache_compatible(meta, cfg, 224)
    other = _model_cfg(world["weights"])
    other.vision.name = "vit_base_patch14_reg4_dinov2"
    with pytest.raises(CacheError, match="vision tower"):
        check_cache_compatible(meta, other, IMAGE_SIZE)
    deeper = _model_cfg(world["weights"])
    deeper.vision.model_kwargs = {"depth": 4}
    with pytest.raises(CacheError, match="model_kwargs"):
        check_cache_compatible(meta, deeper, IMAGE_SIZE)
    hub = _model_cfg(world["weights"])
    hub.vision.weights, hub.vision.pretrained = None, True
    with pytest.raises(CacheError, match="weights"):
        check_cache_compatible(meta, hub, IMAGE_SIZE)
    with pytest.raises(CacheError, match="fingerprint"):
        check_cache_compatible(meta, cfg, IMAGE_SIZE, fingerprint="0" * 16)
    with pytest.raises(CacheError, match="no meta.json"):
        read_cache_meta(world["prepared"])
    old = world["root"] / "v1"
    old.mkdir(exist_ok=True)
    (old / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(CacheError, match="version 1 not supported.*--overwrite"):
        read_cache_meta(old)


def test_outputs_of_other_input_are_never_reused(world: Dict[str, Any], tmp_path: Path) -> None:
    """issue 19: an up-to-date cache is kept; changed source shards or settings are refused naming --overwrite;
    an interrupted build is never served and is rebuilt by a rerun."""
    import shutil

    from simzss.data.features import CacheError

    src = tmp_path / "src"
    shutil.copytree(world["prepared"], src)
    cache = tmp_path / "cache"
    _build(world, cache, [str(src)])
    kept = (cache / "patches.npy").stat().st_mtime_ns
    _build(world, cache, [str(src)])  # same input and settings: nothing redone
    assert (cache / "patches.npy").stat().st_mtime_ns == kept
    with pytest.raises(CacheError, match=r"other input or settings \(image_size 56 != 70\).*--overwrite"):
        _build(world, cache, [str(src)], image_size=70)
    samples = list(iter_samples(src / "shard-000001.tar"))
    write_shard(src / "shard-000001.tar", samples[:-1])  # the input is rebuilt
    with pytest.raises(CacheError, match=r"source shards changed.*shard-000001.tar.*--overwrite"):
        _build(world, cache, [str(src)])
    meta = _build(world, cache, [str(src)], overwrite=True)
    assert meta["num_images"] == 23 and (cache / "patches.npy").stat().st_mtime_ns != kept

    (cache / "meta.json").write_text(json.dumps({**meta, "complete": False}))  # as an interrupted build leaves it
    with pytest.raises(CacheError, match="incomplete"):
        _loader(world, cache=cache)
    assert _build(world, cache, [str(src)])["complete"]
    assert len(_loader(world, cache=cache)) == 23 // 4
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty and holds no feature cache"):
        _build(world, other, [str(src)])


def test_damaged_caches_are_refused_or_counted(world: Dict[str, Any], tmp_path: Path) -> None:
    """Pickled arrays are never loaded (np.load without pickle: a one-line CacheError); a caption naming an
    image row the cache lacks is skipped and counted."""
    import shutil

    from simzss.data.features import CacheError

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    good = (cache / "cls.npy").read_bytes()
    np.save(cache / "cls.npy", np.array([{"boom": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CacheError, match="unreadable cls.npy"):
        _loader(world, cache=cache)
    (cache / "cls.npy").write_bytes(good[:-DIM])  # truncated
    with pytest.raises(CacheError, match="cls.npy"):
        _loader(world, cache=cache)
    (cache / "cls.npy").write_bytes(good)
    samples = list(iter_samples(cache / "shard-000000.tar"))
    samples[0]["image"] = b"9999"
    samples[1]["image"] = b"x"
    write_shard(cache / "shard-000000.tar", samples)
    batches = list(_loader(world, cache=cache, batch_size=4, shuffle_buffer=0))
    skipped: Dict[str, int] = {}
    for b in batches:
        for k, v in b.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped.get("bad_image_row") == 2
    assert not {samples[0]["__key__"], samples[1]["__key__"]} & {k for b in batches for k in b.keys}


def test_cli_convention_and_errors(world: Dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    from simzss.cli.cache_features import build_parser, main

    help_text = build_parser().format_help()
    for option in ("--device", "--overwrite", "--no-progress", "--max-pixels", "--views", "examples:"):
        assert option in help_text, option
    # --help without torch: the parser module imports only light modules
    code = "import sys, simzss.cli.cache_features; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

    base = ["--vision", VISION, "--image-size", "56", "--no-pretrained", "--device", "cpu", "--no-progress"]
    assert main([str(tmp_path / "missing.tar"), "--out", str(tmp_path / "o"), *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simzss cache-features: ") and "missing.tar: no such file" in err and len(err.splitlines()) == 1
    assert main([str(world["prepared"]), "--out", str(world["prepared"]), *base]) == 2  # would overwrite its input
    assert "holds the source shards" in capsys.readouterr().err
    assert main([str(world["prepared"]), "--out", str(world["cache"]), *base, "--views", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err  # another setting: refused, naming the option
    with pytest.raises(SystemExit) as e:
        main([str(world["prepared"]), "--out", str(tmp_path / "o"), "--vision", VISION])  # no image size
    assert e.value.code == 2 and "--image-size is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(world["prepared"]), "--out", str(tmp_path / "o"), *base, "--device", "gpu0"])
    assert e.value.code == 2 and "not a device" in capsys.readouterr().err
