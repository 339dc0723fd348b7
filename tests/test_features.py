"""Frozen-feature cache: ``simzss cache-features`` output, the cached training stream, equivalence with the
image path, compatibility checks and pickle safety. Random-init towers, toy-world data, CPU only."""

from __future__ import annotations

import io
import json
import tarfile
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


def _concepts_json(caption: str, nlp_concepts: List[Any]) -> bytes:
    return json.dumps({"version": 1, "concepts": [c.to_json() for c in nlp_concepts]}).encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """Toy shards annotated with concepts.json, vision weights on disk, a BPE tokenizer and a cache."""
    from simzss.concepts import ConceptBank, ConceptExtractor
    from simzss.data.synthetic import generate_toy_world
    from simzss.data.tokenize import train_bpe_tokenizer
    from simzss.cli.cache_features import main
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
            s["concepts.json"] = _concepts_json(s["txt"].decode(), concepts)
        sizes[name] = write_shard(prepared / name, samples)
    write_sizes(prepared, sizes)

    # one fixed random-init tower, saved, so the cache and the model share weights
    torch.manual_seed(0)
    tower = FrozenVisionTower(VISION, pretrained=False, model_kwargs=VISION_KW)
    from safetensors.torch import save_file

    weights = root / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in tower.model.state_dict().items()}, str(weights))

    cache = root / "cache"
    rc = main([str(prepared), "--out", str(cache), "--vision", VISION, "--vision-kwargs", json.dumps(VISION_KW),
               "--weights", str(weights), "--image-size", str(IMAGE_SIZE), "--batch-size", "5", "--workers", "2",
               "--device", "cpu"])
    assert rc == 0
    tokenizer = train_bpe_tokenizer(captions * 4, root / "tok", vocab_size=300, min_frequency=1)
    return {"root": root, "prepared": prepared, "cache": cache, "weights": weights, "tokenizer": tokenizer,
            "bank": ConceptBank.default(), "sizes": sizes}


def _model_cfg(weights: Path) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(name=VISION, pretrained=False, weights=str(weights), model_kwargs=dict(VISION_KW)),
        text=TextConfig(layers=1, width=64, heads=2, context_length=32),
    )


def _loader(world: Dict[str, Any], batch_size: int = 4, workers: int = 0, **kw: Any) -> Any:
    from simzss.data.features import build_cached_loader

    cfg = DataConfig(feature_cache=str(world["cache"]), workers=workers, **{"shuffle_buffer": 8, **kw})
    return build_cached_loader(cfg, world["tokenizer"], world["bank"], batch_size=batch_size, context_length=32)


# --------------------------------------------------------------------------------------------------------------


def test_cache_writes_shards_sizes_and_meta(world: Dict[str, Any]) -> None:
    cache: Path = world["cache"]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["complete"] and meta["format"] == "simzss-feature-cache"
    assert meta["vision"]["name"] == VISION and meta["vision"]["model_kwargs"] == VISION_KW
    assert (meta["image_size"], meta["grid"], meta["dim"], meta["dtype"], meta["views"]) == (
        IMAGE_SIZE, [GRID, GRID], DIM, "fp16", 1)
    assert [Path(p).name for p in meta["source_shards"]] == sorted(world["sizes"])
    assert json.loads((cache / "sizes.json").read_text()) == world["sizes"] and meta["num_samples"] == 24
    assert not [p for p in cache.iterdir() if "tmp" in p.name]  # atomic writes leave no temporaries
    sample = next(iter_samples(cache / "shard-000000.tar"))
    assert set(sample) == {"__key__", "txt", "concepts.json", "cls.npy", "patches.npy"}
    cls = np.load(io.BytesIO(sample["cls.npy"]), allow_pickle=False)
    patches = np.load(io.BytesIO(sample["patches.npy"]), allow_pickle=False)
    assert cls.dtype == patches.dtype == np.float16
    assert cls.shape == (1, DIM) and patches.shape == (1, GRID, GRID, DIM)
    assert np.isfinite(patches).all()


def test_cached_loader_yields_feature_batches(world: Dict[str, Any]) -> None:
    loader = _loader(world, batch_size=4, workers=2)
    assert len(loader) == 24 // 4 and loader.meta["grid"] == [GRID, GRID]
    batches = list(loader)
    assert len(batches) == 6
    b = batches[0]
    assert b.images is None
    assert b.vision_cls.shape == (4, DIM) and b.vision_patches.shape == (4, GRID, GRID, DIM)
    assert b.vision_patches.dtype == torch.float16
    assert b.input_ids.shape[0] == 4 and b.concept_labels.shape[0] == 4
    assert sum(int((x.concept_labels >= 0).sum()) for x in batches) > 10  # toy captions name bank classes
    # the stream's epochs are approximate (infinite per-worker streams), so only check the keys are real
    assert {k for x in batches for k in x.keys} <= {f"{i:09d}" for i in range(24)}
    # resume mid-epoch: the rest of the epoch is the same batches as an uninterrupted run
    resumed = _loader(world, batch_size=4, workers=2)
    resumed.load_state_dict({**loader.state_dict(), "epoch": 0, "batches_consumed": 2, "worker_batches": [1, 1]})
    assert [x.keys for x in resumed] == [x.keys for x in batches[2:]]


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


def test_interrupted_cache_is_refused_then_resumed(world: Dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from simzss.cli.cache_features import cache_features
    from simzss.data.features import CacheError

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    (cache / "shard-000002.tar").unlink()
    sizes = json.loads((cache / "sizes.json").read_text())
    del sizes["shard-000002.tar"]
    (cache / "sizes.json").write_text(json.dumps(sizes))
    with pytest.raises(CacheError, match="incomplete"):
        _loader({**world, "cache": cache})
    kept = (cache / "shard-000000.tar").stat().st_mtime_ns
    vision = VisionConfig(name=VISION, pretrained=False, weights=str(world["weights"]), model_kwargs=dict(VISION_KW))
    with pytest.raises(CacheError, match="other settings"):
        cache_features([str(world["prepared"])], cache, vision=vision, image_size=70, workers=0, progress=False)
    cache_features([str(world["prepared"])], cache, vision=vision, image_size=IMAGE_SIZE, workers=0, progress=False)
    assert (cache / "shard-000000.tar").stat().st_mtime_ns == kept  # finished shards are not redone
    assert (cache / "shard-000002.tar").read_bytes() == (world["cache"] / "shard-000002.tar").read_bytes()
    assert len(_loader({**world, "cache": cache})) == 6


def test_augmented_views_are_seeded(world: Dict[str, Any], tmp_path: Path) -> None:
    from simzss.cli.cache_features import cache_features

    vision = VisionConfig(name=VISION, pretrained=False, weights=str(world["weights"]), model_kwargs=dict(VISION_KW))
    shard = [str(world["prepared"] / "shard-000000.tar")]
    kw = dict(vision=vision, image_size=IMAGE_SIZE, views=2, crop_scale=(0.3, 0.6), progress=False, seed=1)
    meta = cache_features(shard, tmp_path / "a", workers=0, **kw)
    cache_features(shard, tmp_path / "b", workers=1, batch_size=3, **kw)
    assert meta["augment"] and meta["views"] == 2
    a = (tmp_path / "a" / "shard-000000.tar").read_bytes()
    assert a == (tmp_path / "b" / "shard-000000.tar").read_bytes()  # same views whatever workers / batching
    s = next(iter_samples(tmp_path / "a" / "shard-000000.tar"))
    patches = np.load(io.BytesIO(s["patches.npy"]), allow_pickle=False)
    assert patches.shape == (2, GRID, GRID, DIM) and not np.array_equal(patches[0], patches[1])


def test_pickled_arrays_are_never_loaded(world: Dict[str, Any], tmp_path: Path) -> None:
    """An object array (which only pickle can read) and a .pkl member in a cache shard: neither is unpickled;
    the sample is counted as skipped and training goes on."""
    import pickle
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    samples = list(iter_samples(cache / "shard-000000.tar"))
    evil = io.BytesIO()
    np.save(evil, np.array([{"boom": 1}], dtype=object), allow_pickle=True)
    samples[0]["cls.npy"] = evil.getvalue()
    with pytest.raises(ValueError):
        np.load(io.BytesIO(evil.getvalue()), allow_pickle=False)
    write_shard(cache / "shard-000000.tar", samples)
    with tarfile.open(cache / "shard-000001.tar", "a") as tar:  # append a pickle member to another sample
        data = pickle.dumps({"boom": 2})
        info = tarfile.TarInfo(f"{samples[1]['__key__']}x.pkl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    loader = _loader({**world, "cache": cache}, batch_size=4)
    batches = list(loader)
    skipped: Dict[str, int] = {}
    for b in batches:
        for k, v in b.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped.get("corrupt_features", 0) >= 1
    assert skipped.get("missing_features", 0) >= 1  # the lone .pkl member: read as raw bytes, then dropped
    assert samples[0]["__key__"] not in {k for b in batches for k in b.keys}


def test_cli_errors_are_clear(world: Dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simzss.cli.cache_features import main

    assert main([str(tmp_path / "missing.tar"), "--out", str(tmp_path / "o"), "--vision", VISION,
                 "--image-size", "56", "--no-pretrained"]) == 2
    assert "shard(s) not found" in capsys.readouterr().err
    assert main([str(world["prepared"]), "--out", str(world["prepared"]), "--vision", VISION, "--image-size", "56",
                 "--no-pretrained"]) == 2  # would overwrite its own input
    assert "holds the source shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(world["prepared"]), "--out", str(tmp_path / "o"), "--vision", VISION])  # no image size
    assert "--image-size is required" in capsys.readouterr().err
