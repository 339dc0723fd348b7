"""Vision tower, text tower and the SimZSS model on tiny random-init networks (no downloads)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from simzss.config import ModelConfig, TextConfig, VisionConfig
from simzss.models import FrozenVisionTower, SimZSS, TextTower, vision_embed_dim

VIT = "vit_small_patch14_reg4_dinov2"
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
CAPTIONS = [
    "a dog on the grass", "a red car next to a tree", "two cats sleep on a sofa", "a tennis racket and a ball",
    "a man rides a horse", "the sky above the sea", "a dog and a cat", "a car on the road",
] * 4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from simzss.data.tokenize import train_bpe_tokenizer

    return train_bpe_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok"), vocab_size=300, min_frequency=1)


def _tiny_tower(img_size: int = 28, **overrides) -> FrozenVisionTower:
    return FrozenVisionTower(VIT, pretrained=False, img_size=img_size, model_kwargs={**TINY_VIT, **overrides})


def _tiny_config(**kw) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(name=VIT, pretrained=False, model_kwargs={**TINY_VIT, "img_size": 28}),
        text=TextConfig(layers=2, width=32, heads=2, context_length=24),
        **kw,
    )


def _batch(tokenizer, n: int = 4, with_concepts: bool = True, image_size: int = 28):
    """A real training Batch from the data modules: concept 'dog'/'car'/... spans mapped to tokens."""
    from simzss.data.stream import Batch
    from simzss.data.tokenize import tokenize_batch

    bank = {"dog": 0, "grass": 1, "car": 2, "tree": 3, "cats": 4, "sofa": 5, "racket": 6, "ball": 7}
    captions = CAPTIONS[:n]
    concepts = []
    for cap in captions:
        found = []
        for word, cid in bank.items():
            start = cap.find(word)
            if with_concepts and start >= 0:
                found.append((cid, [(start, start + len(word))]))
        concepts.append(found)
    enc = tokenize_batch(tokenizer, captions, concepts, context_length=24)
    g = torch.Generator().manual_seed(0)
    return Batch(images=torch.randn(n, 3, image_size, image_size, generator=g), captions=captions,
                 keys=[str(i) for i in range(n)], **enc)


# ------------------------------------------------------------------------------------------ vision
def test_vision_tower_outputs_and_register_dropping() -> None:
    tower = _tiny_tower()
    assert tower.num_prefix_tokens == 5 and tower.patch_size == 14 and tower.embed_dim == 32
    x = torch.randn(2, 3, 56, 42)  # not the configured 28 px: dynamic image size
    cls, patches = tower(x)
    assert cls.shape == (2, 32) and patches.shape == (2, 4, 3, 32)
    tokens = tower.model.forward_features(x)  # includes the final norm
    assert tokens.shape[1] == 5 + 12
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patches.reshape(2, 12, 32), tokens[:, 5:])
    ln = tower.model.norm  # patch tokens are layer-normed: zero mean / unit variance before the affine
    torch.testing.assert_close(((patches - ln.bias) / ln.weight).mean(-1), torch.zeros(2, 4, 3), atol=1e-4, rtol=0)


def test_vision_tower_is_frozen_and_stays_in_eval() -> None:
    tower = _tiny_tower(drop_path_rate=0.5)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not any(m.training for m in tower.modules())
    x = torch.randn(1, 3, 28, 28, requires_grad=True)
    cls, patches = tower(x)
    # run under no_grad: no autograd graph at all, and no bf16 autocast off CUDA
    assert not cls.requires_grad and not patches.requires_grad
    assert cls.grad_fn is None and patches.grad_fn is None
    assert cls.dtype == patches.dtype == torch.float32
    torch.testing.assert_close(tower(x)[0], cls)  # deterministic: drop-path inactive
    assert tower.mean == pytest.approx((0.485, 0.456, 0.406)) and tower.std == pytest.approx((0.229, 0.224, 0.225))


def test_vision_tower_rejects_bad_sizes_and_clip_normalisation() -> None:
    tower = _tiny_tower()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tower(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="not ImageNet's"):
        FrozenVisionTower("vit_base_patch16_clip_224.openai", pretrained=False,
                          model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2})
    with pytest.raises(ValueError, match="cannot create"):
        FrozenVisionTower("no_such_model_xyz", pretrained=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vision_tower_loads_local_weights(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    source = _tiny_tower()
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    torch.manual_seed(1)
    loaded = FrozenVisionTower(VIT, pretrained=True, weights=str(path), img_size=28, model_kwargs=TINY_VIT)
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(loaded(x)[1], source(x)[1])


def test_vision_tower_weight_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny_tower(depth=1).model.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"(?s)cannot load vision weights.*Missing key"):
        FrozenVisionTower(VIT, weights=str(path), img_size=28, model_kwargs=TINY_VIT)
    with pytest.raises(FileNotFoundError):
        FrozenVisionTower(VIT, weights=str(tmp_path / "missing.pth"), img_size=28, model_kwargs=TINY_VIT)
    pickled = tmp_path / "obj.pth"
    torch.save({"model": _tiny_tower()}, pickled)  # a whole pickled module: refused by weights_only
    with pytest.raises(ValueError, match="cannot load vision weights"):
        FrozenVisionTower(VIT, weights=str(pickled), img_size=28, model_kwargs=TINY_VIT)


def test_vision_embed_dim_without_weights() -> None:
    assert vision_embed_dim(VIT, TINY_VIT) == 32
    assert vision_embed_dim("vit_base_patch14_reg4_dinov2.lvd142m") == 768


# -------------------------------------------------------------------------------------------- text
def _text(**kw) -> TextTower:
    cfg = TextConfig(**{"layers": 2, "width": 32, "heads": 2, "context_length": 12, **kw})
    return TextTower(cfg, vocab_size=50, pad_token_id=0, output_dim=24).eval()


def test_text_tower_eos_pooling_is_last_non_pad_token_and_causal() -> None:
    torch.manual_seed(0)
    tower = _text()
    ids = torch.randint(1, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    tokens, pooled = tower(ids, mask)
    assert tokens.shape == (3, 8, 32) and pooled.shape == (3, 32) and tower.proj.out_features == 24
    last = mask.sum(1) - 1
    torch.testing.assert_close(pooled, tokens[torch.arange(3), last])
    # causal: the prefix of a sequence does not see what follows (so right padding is harmless)
    short_tokens, _ = tower(ids[1:2, :5], mask[1:2, :5])
    torch.testing.assert_close(short_tokens[0], tokens[1, :5], atol=1e-5, rtol=1e-5)


def test_text_tower_cls_and_mean_pooling() -> None:
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    tower = _text(pooling="mean")
    tokens, pooled = tower(ids, mask)
    torch.testing.assert_close(pooled[1], tokens[1, :3].mean(0))
    tower.pooling = "cls"
    torch.testing.assert_close(tower(ids, mask)[1], tokens[:, 0])


def test_text_tower_rejects_bad_config_and_long_input() -> None:
    with pytest.raises(ValueError, match="pooling"):
        _text(pooling="max")
    with pytest.raises(ValueError, match="kind"):
        _text(kind="rnn")
    with pytest.raises(ValueError, match="name_or_path"):
        _text(kind="pretrained")
    with pytest.raises(ValueError, match="context length"):
        _text()(torch.ones(1, 13, dtype=torch.long), torch.ones(1, 13, dtype=torch.long))


def test_text_tower_pretrained_from_local_folder(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=20)).save_pretrained(tmp_path)
    cfg = TextConfig(kind="pretrained", name_or_path=str(tmp_path), pooling="cls")
    tower = TextTower(cfg, vocab_size=60, pad_token_id=0, output_dim=8)
    assert tower.width == 16 and tower.context_length == 20
    tokens, pooled = tower(torch.randint(1, 60, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    assert tokens.shape == (2, 5, 16) and pooled.shape == (2, 16) and tower.proj(pooled).shape == (2, 8)
    with pytest.raises(ValueError, match="larger than"):
        TextTower(cfg, vocab_size=100, pad_token_id=0, output_dim=8)
    with pytest.raises(ValueError, match="cannot load"):
        TextTower(TextConfig(kind="pretrained", name_or_path=str(tmp_path / "nope")), 60, 0, 8)


def test_text_tower_right_padding_runs_without_mask_and_matches_masked_run() -> None:
    """Causal scratch tower: real tokens' outputs do not depend on a right-padding mask, so none is passed."""
    from simzss.models.text import is_right_padded

    torch.manual_seed(0)
    tower = _text(pooling="mean")
    ids = torch.randint(1, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    seen: list[object] = []
    tower.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    fast_tokens, fast_pooled = tower(ids, mask)
    masked_tokens, masked_pooled = tower(ids, mask, right_padded=False)
    assert seen[0] is None and seen[1] is mask
    real = mask.bool()
    torch.testing.assert_close(fast_tokens[real], masked_tokens[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_pooled, masked_pooled, atol=1e-5, rtol=1e-5)
    for pooling in ("eos", "cls"):
        tower.pooling = pooling
        torch.testing.assert_close(tower(ids, mask)[1], tower(ids, mask, right_padded=False)[1], atol=1e-5, rtol=1e-5)

    left = mask.flip(1)  # left padding: the mask is needed and is passed on
    assert bool(is_right_padded(mask)) and not bool(is_right_padded(left))
    assert bool(is_right_padded(torch.ones(2, 1, dtype=torch.long)))
    tower(ids.flip(1), left)
    assert seen[-1] is left


def test_text_tower_built_from_config_only(tmp_path: Path) -> None:
    """hf_config builds the pretrained architecture (same keys) with no access to the weights; fp32 always."""
    from transformers import AutoConfig, BertConfig, BertModel

    BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=20)).half().save_pretrained(tmp_path / "bert")
    cfg = TextConfig(kind="pretrained", name_or_path=str(tmp_path / "bert"), pooling="cls")
    loaded = TextTower(cfg, vocab_size=60, pad_token_id=0, output_dim=8).eval()
    assert loaded.transformer.dtype == torch.float32  # trainable weights: fp32 even from an fp16 checkpoint
    loaded.hf_config.save_pretrained(tmp_path / "cfg")
    elsewhere = TextConfig(kind="pretrained", name_or_path=str(tmp_path / "missing"), pooling="cls")
    for source in (tmp_path / "cfg", AutoConfig.from_pretrained(tmp_path / "cfg")):
        built = TextTower(elsewhere, vocab_size=60, pad_token_id=0, output_dim=8, hf_config=source).eval()
        assert built.state_dict().keys() == loaded.state_dict().keys() and built.width == 16
        built.load_state_dict(loaded.state_dict())
        ids, mask = torch.randint(1, 60, (2, 5)), torch.ones(2, 5, dtype=torch.long)
        torch.testing.assert_close(built(ids, mask)[1], loaded(ids, mask)[1])
    with pytest.raises(ValueError, match="only for text kind 'pretrained'"):
        TextTower(TextConfig(layers=1, width=16, heads=2), 60, 0, 8, hf_config=tmp_path / "cfg")
    with pytest.raises(ValueError, match="cannot build the text model"):
        TextTower(elsewhere, 60, 0, 8, hf_config=tmp_path / "nope")
    with pytest.raises(ValueError, match="larger than"):
        TextTower(elsewhere, 100, 0, 8, hf_config=tmp_path / "cfg")


# ------------------------------------------------------------------------------------------- model
def test_simzss_smoke_only_text_side_learns(tokenizer) -> None:
    torch.manual_seed(0)
    model = SimZSS.from_config(_tiny_config(), tokenizer)
    assert model.tokenizer is tokenizer and model.config is not None and model.embed_dim == 32
    model.train()
    assert not model.vision.training and model.text.training  # type: ignore[union-attr]
    batch = _batch(tokenizer)
    out = model(batch)
    assert math.isfinite(out.loss.item()) and out.num_concepts == 8 and out.num_classes == 8
    torch.testing.assert_close(out.loss, out.global_loss + 0.05 * out.concept_loss)
    assert 0.0 <= out.concept_accuracy.item() <= 1.0
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    out.loss.backward()
    assert model.logit_scale.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())  # type: ignore[union-attr]
    text_grads = [p.grad for p in model.text.parameters()]
    assert all(g is not None for g in text_grads) and sum(g.abs().sum() for g in text_grads) > 0


def test_simzss_one_step_lowers_the_loss(tokenizer) -> None:
    torch.manual_seed(0)
    model = SimZSS.from_config(_tiny_config(concept_weight=1.0), tokenizer).train()
    batch = _batch(tokenizer, n=6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = model(batch).loss
    for _ in range(5):
        opt.zero_grad()
        model(batch).loss.backward()
        opt.step()
    assert model(batch).loss.item() < first.item()


@pytest.mark.parametrize("query,scale", [("concept", 1 / 0.07), ("prototype", None)])
def test_simzss_query_modes_and_no_concept_batch(tokenizer, query: str, scale: float | None) -> None:
    torch.manual_seed(0)
    model = SimZSS.from_config(_tiny_config(query=query, concept_scale=scale, concept_target="argmax"), tokenizer)
    out = model(_batch(tokenizer))
    assert math.isfinite(out.concept_loss.item()) and out.concept_loss.item() > 0
    empty = _batch(tokenizer, with_concepts=False)
    assert empty.concept_labels.shape[1] == 0
    out = model(empty)
    assert out.concept_loss.item() == 0 and out.num_concepts == 0 and torch.isnan(out.concept_accuracy)
    out.loss.backward()  # no crash on a batch without concepts


def test_simzss_lit_skips_the_concept_branch(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import simzss.models.simzss as mod

    def boom(*a, **k):
        raise AssertionError("the concept branch must not run when concept_weight == 0")

    monkeypatch.setattr(mod, "pool_visual_concepts", boom)
    monkeypatch.setattr(mod, "slot_concept_loss", boom)
    monkeypatch.setattr(mod, "slot_classes", boom)
    model = SimZSS.from_config(_tiny_config(concept_weight=0.0), tokenizer)
    out = model(_batch(tokenizer))
    torch.testing.assert_close(out.loss, out.global_loss)
    assert out.concept_loss.item() == 0 and out.num_concepts == 0


def test_simzss_cached_features_without_vision_tower(tokenizer) -> None:
    torch.manual_seed(0)
    full = SimZSS.from_config(_tiny_config(), tokenizer)
    batch = _batch(tokenizer)
    cls, patches = full.vision(batch.images)  # type: ignore[misc]
    expected = full(batch)
    headless = SimZSS.from_config(_tiny_config(), tokenizer, build_vision=False)
    assert headless.vision is None and headless.embed_dim == 32
    headless.load_trainable_state_dict(full.trainable_state_dict())
    batch.images, batch.vision_cls, batch.vision_patches = None, cls.half(), patches.half()
    out = headless(batch)
    torch.testing.assert_close(out.loss, expected.loss, atol=2e-3, rtol=1e-3)  # fp16 cache, fp32 loss
    with pytest.raises(ValueError, match="without a vision tower"):
        headless.encode_image(torch.randn(1, 3, 28, 28))
    batch.vision_cls = batch.vision_patches = None
    with pytest.raises(ValueError, match="no cached vision features"):
        headless(batch)


def test_simzss_encoders_and_state_dict(tokenizer) -> None:
    torch.manual_seed(0)
    model = SimZSS.from_config(_tiny_config(), tokenizer).eval()
    cls, patches = model.encode_image(torch.randn(2, 3, 42, 28))
    assert cls.shape == (2, 32) and patches.shape == (2, 3, 2, 32)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(2, 3, 2))
    emb = model.encode_texts(["a dog", "a red car next to a tree " * 10])  # the 2nd is truncated to 24 tokens
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    enc = tokenizer(["a dog"], return_tensors="pt")
    torch.testing.assert_close(model.encode_text(enc["input_ids"], enc["attention_mask"])[0], emb[0])
    with pytest.raises(TypeError):
        model.encode_texts("a dog")

    state = model.trainable_state_dict()
    assert "logit_scale" in state and "text.proj.weight" in state and not any(k.startswith("vision.") for k in state)
    other = SimZSS.from_config(_tiny_config(), tokenizer)
    other.load_trainable_state_dict(state)
    torch.testing.assert_close(other.encode_texts(["a dog"]), emb[:1])
    with pytest.raises(ValueError, match="missing"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if k != "logit_scale"})


def test_simzss_logit_scale_is_clamped(tokenizer) -> None:
    model = SimZSS.from_config(_tiny_config(), tokenizer)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(_batch(tokenizer))
    assert out.logit_scale.item() == pytest.approx(100.0, rel=1e-5)


def test_simzss_rejects_bad_arguments(tokenizer) -> None:
    with pytest.raises(ValueError, match="query"):
        SimZSS.from_config(_tiny_config(query="patch"), tokenizer)
    with pytest.raises(ValueError, match="concept_target"):
        SimZSS.from_config(_tiny_config(concept_target="soft"), tokenizer)
    text = TextTower(TextConfig(layers=1, width=16, heads=2, context_length=8), 50, 0, 16)
    with pytest.raises(ValueError, match="embed_dim"):
        SimZSS(_tiny_tower(), text, embed_dim=16)


def test_simzss_segment_delegates_to_eval(tokenizer) -> None:
    pytest.importorskip("simzss.eval")
    torch.manual_seed(0)
    model = SimZSS.from_config(_tiny_config(), tokenizer).eval()
    pred, probs = model.segment(torch.randn(3, 30, 44), ["dog", "car", "tree"], short_side=28, crop=28, stride=14)
    assert probs.shape == (3, 30, 44) and pred.shape == (30, 44)
    torch.testing.assert_close(probs.sum(0), torch.ones(30, 44))
    assert F.one_hot(pred, 3).permute(2, 0, 1).bool().eq(probs == probs.max(0).values).all()


def _loop_forward(model: SimZSS, batch) -> tuple[torch.Tensor, torch.Tensor, float, int, int]:
    """(loss, concept loss, concept accuracy, concepts, classes) written from the method one concept at a time in
    plain Python, sharing no code with the concept branch: c_t pools the span's real tokens (g(mean), or the sum of
    normalize(g(token)) for "sum_normalized"); prototype h_c = normalize(Σ of the class's (normalised) c_t);
    query = h_c or c_t; c_v = normalize(Σ_patches s · z) with s = softmax(cos(z, query) / tau); logits = scale ·
    cos(c_v, h) over the present classes; cross-entropy against the label (or the argmax), averaged."""
    from simzss.losses import contrastive_loss  # checked against NumPy in tests/test_losses.py

    if batch.vision_cls is not None:
        cls, patches = batch.vision_cls.float(), batch.vision_patches.float()
    else:
        cls, patches = model.vision(batch.images, dtype=torch.float32)  # type: ignore[misc]
    tokens, pooled = model.text(batch.input_ids, batch.attention_mask, right_padded=False)
    scale = model.scale()
    global_loss = contrastive_loss(cls, model.text.proj(pooled), scale)
    unit = lambda x: x / x.norm().clamp(min=1e-12)  # noqa: E731
    concepts = []  # (sample, class, c_t)
    for b in range(batch.concept_labels.shape[0]):
        for k in range(batch.concept_labels.shape[1]):
            label = int(batch.concept_labels[b, k])
            span = [i for i in range(tokens.shape[1]) if batch.concept_mask[b, k, i] and batch.attention_mask[b, i]]
            if label < 0 or not span:
                continue
            if model.concept_pooling == "mean":
                c_t = model.text.proj(sum(tokens[b, i] for i in span) / len(span))
            else:
                c_t = sum(unit(model.text.proj(tokens[b, i])) for i in span)
            concepts.append((b, label, c_t))
    if not concepts:
        return global_loss, torch.zeros(()), float("nan"), 0, 0
    classes = sorted({c for _, c, _ in concepts})
    protos = {c: unit(sum(unit(t) if model.prototype_member_norm else t for _, l, t in concepts if l == c))
              for c in classes}
    concept_scale = scale if model.concept_scale is None else model.concept_scale
    losses, correct = [], 0
    for b, label, c_t in concepts:
        query = unit(protos[label] if model.query == "prototype" else c_t)
        z = [unit(p) for p in patches[b].reshape(-1, patches.shape[-1])]
        s = torch.softmax(torch.stack([torch.dot(zi, query) for zi in z]) / model.tau, 0)
        c_v = unit(sum(si * zi for si, zi in zip(s, z)))
        logits = torch.stack([concept_scale * torch.dot(c_v, protos[c]) for c in classes])
        best = max(range(len(classes)), key=lambda j: (float(logits[j].detach()), -j))  # the first maximum
        correct += classes[best] == label
        goal = best if model.concept_target == "argmax" else classes.index(label)
        losses.append(torch.logsumexp(logits, 0) - logits[goal])
    concept = torch.stack(losses).mean()
    return global_loss + model.concept_weight * concept, concept, correct / len(concepts), len(concepts), len(classes)


@pytest.mark.parametrize("query,scale", [("concept", 1 / 0.07), ("prototype", None)])
def test_simzss_forward_matches_reference_algorithm(tokenizer, query: str, scale: float | None) -> None:
    """The forward on images (frozen tower under inference mode, fixed-shape concept branch) gives the per-concept
    loop's loss and gradients, and only the text side gets gradients: the frozen tower is never in autograd.

    The reference pools concepts as the paper does (mean over the span, normalised prototype members, true-label
    targets); the release's knobs are checked against the release's own loss in tests/test_recipe.py."""
    torch.manual_seed(0)
    paper = dict(concept_pooling="mean", prototype_member_norm=True, concept_target="label")
    model = SimZSS.from_config(_tiny_config(query=query, concept_scale=scale, concept_weight=0.5, **paper),
                               tokenizer).train()
    batch = _batch(tokenizer, n=6)
    assert (batch.attention_mask == 0).any() and (batch.concept_labels < 0).any()  # padding of both kinds
    batch.concept_mask[0, 0, -1] = True  # a span reaching into padding: pad tokens are never pooled
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(batch)
    grads = torch.autograd.grad(out.loss, params)
    ref_loss, ref_concept = _loop_forward(model, batch)[:2]
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.concept_loss, ref_concept, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in model.vision.parameters())  # type: ignore[union-attr]
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"text", "logit_scale"}
    assert all(g.abs().sum() > 0 for n, g in zip([n for n, p in model.named_parameters() if p.requires_grad], grads)
               if n.startswith("text.proj") or n == "logit_scale")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs are only observable on CUDA")
def test_simzss_forward_syncs_with_the_host_once_on_cuda(tokenizer) -> None:
    """The SimZSS forward never reads the device with right padding promised, once (the padding check) without."""
    import warnings

    torch.manual_seed(0)
    model = SimZSS.from_config(_tiny_config(), tokenizer).cuda().train()
    model.concept_classes = 8  # the bank of _batch: a class table by id, no class count read back
    batch = _batch(tokenizer, n=6).to("cuda")
    model(batch)  # warm-up: lazy inits may sync once
    for weight, promised in ((0.05, True), (0.0, True), (0.05, False)):
        model.concept_weight, model.right_padded_inputs = weight, promised
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= (0 if promised else 1), [str(w.message) for w in syncs]


def _random_batch(seed: int, b: int = 6, k: int = 4, length: int = 12, classes: int = 5, grid: int = 3,
                  no_concepts: bool = False):
    """Random cached-feature batch: right padding, 1-3 token concept spans (some reaching into padding), -1 slots,
    repeated classes; ``no_concepts``: every slot empty."""
    from simzss.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (b,), generator=g)
    ids = torch.randint(1, 40, (b, length), generator=g)
    attn = (torch.arange(length) < lengths.unsqueeze(1)).long()
    ids[attn == 0] = 0
    cmask = torch.zeros(b, k, length, dtype=torch.bool)
    labels = torch.randint(0, classes, (b, k), generator=g)
    labels[torch.rand(b, k, generator=g) < 0.35] = -1
    if no_concepts:
        labels[:] = -1
    for i in range(b):
        for j in range(k):
            start = int(torch.randint(0, int(lengths[i]), (1,), generator=g))
            cmask[i, j, start : start + int(torch.randint(1, 4, (1,), generator=g))] = True
    return Batch(images=None, input_ids=ids, attention_mask=attn, concept_mask=cmask, concept_labels=labels,
                 captions=[""] * b, keys=[str(i) for i in range(b)], vision_cls=torch.randn(b, 32, generator=g),
                 vision_patches=torch.randn(b, grid, grid, 32, generator=g))


@pytest.mark.parametrize("seed,no_concepts", [(0, False), (1, False), (2, False), (3, True)])
@pytest.mark.parametrize("pooling,member_norm", [("mean", True), ("sum_normalized", False)])
@pytest.mark.parametrize("target", ["label", "argmax"])
@pytest.mark.parametrize("query", ["prototype", "concept"])
@pytest.mark.parametrize("concept_classes", [None, 5])
def test_slot_concept_branch_equals_the_per_concept_loop(tokenizer, seed, no_concepts, pooling, member_norm, target,
                                                           query, concept_classes) -> None:
    """The fixed-shape concept branch (masked slots, class table) gives the numbers of the per-concept loop, in
    every pooling, member norm, target and query mode; empty slots, spans into padding, repeated classes, no
    concept at all; with the class table sized by the bank or by the present classes."""
    torch.manual_seed(seed)
    cfg = _tiny_config(query=query, concept_weight=0.5, concept_pooling=pooling, prototype_member_norm=member_norm,
                       concept_target=target, concept_scale=None if seed % 2 else 1 / 0.07)
    cfg.text.context_length = 12
    model = SimZSS.from_config(cfg, tokenizer, build_vision=False).train()
    model.concept_classes = concept_classes
    model.right_padded_inputs = True
    batch = _random_batch(seed, no_concepts=no_concepts)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(batch)
    ref = _loop_forward(model, batch)
    torch.testing.assert_close(out.loss, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.concept_loss, ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.concept_accuracy, torch.as_tensor(ref[2]).float(), equal_nan=True)
    assert (int(out.num_concepts), int(out.num_classes)) == (ref[3], ref[4])
    assert no_concepts == (ref[3] == 0)
    for got, want in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref[0], params)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_slot_concept_branch_without_concept_columns(tokenizer) -> None:
    """A batch whose captions hold no concept at all (K = 0) trains on the global loss alone."""
    model = SimZSS.from_config(_tiny_config(concept_weight=0.5), tokenizer, build_vision=False).train()
    batch = _random_batch(0)
    batch.concept_mask, batch.concept_labels = batch.concept_mask[:, :0], batch.concept_labels[:, :0]
    out = model(batch)
    assert float(out.concept_loss.detach()) == 0 and int(out.num_concepts) == 0 and torch.isnan(out.concept_accuracy)
    torch.testing.assert_close(out.loss, out.global_loss)
    out.loss.backward()


# ------------------------------------------------------------------------------------------ speed settings
def _sdpa_spy(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every call of torch's fused attention (timm and transformers look it up at call time)."""
    calls: list = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append({"mask": attn_mask is not None, "causal": is_causal, "shape": tuple(q.shape)})
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_both_towers_use_fused_sdpa_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every attention layer goes through F.scaled_dot_product_attention, without a mask where the flash kernel
    needs none: the ViT always, the causal text tower with right padding (is_causal instead of a mask)."""
    calls = _sdpa_spy(monkeypatch)
    tower = _tiny_tower()
    assert all(block.attn.fused_attn for block in tower.model.blocks)
    tower(torch.randn(2, 3, 28, 28))
    assert len(calls) == len(tower.model.blocks) and not any(c["mask"] for c in calls)
    calls.clear()
    text = _text()
    assert text.transformer.config._attn_implementation == "sdpa"
    layers = text.transformer.config.num_hidden_layers
    ids, mask = torch.randint(1, 50, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    text(ids, mask, right_padded=True)
    assert len(calls) == layers and all(c["causal"] and not c["mask"] for c in calls)
    calls.clear()
    text(ids, mask.flip(1), right_padded=False)  # left padding: the mask is applied, still by SDPA
    assert len(calls) == layers and all(c["mask"] for c in calls)


def test_frozen_tower_runs_in_inference_mode_and_hands_out_ordinary_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    tower = _tiny_tower()
    seen = []
    real = tower.model.forward_features

    def record(x):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return real(x)

    monkeypatch.setattr(tower.model, "forward_features", record)
    cls, patches = tower(torch.randn(2, 3, 28, 28))
    assert seen == [(True, False)]
    assert not cls.is_inference() and not patches.is_inference() and not patches.requires_grad
    q = torch.randn(2, 1, patches.shape[-1], requires_grad=True)  # usable in autograd (saved for backward)
    (q @ patches.reshape(2, -1, patches.shape[-1]).transpose(1, 2)).sum().backward()
    assert q.grad is not None
    c64, _ = tower(torch.randn(2, 3, 28, 28), dtype=torch.float64)
    assert c64.dtype == torch.float64


@pytest.mark.parametrize("bf16", [False, True])
def test_training_step_on_images_with_the_frozen_tower_in_inference_mode(tokenizer, bf16: bool) -> None:
    """A full step on images (forward, backward, optimizer) with and without CPU bf16 autocast: the patch tokens
    the concept softmax is taken over come out of inference mode usable by autograd, the text side learns, the
    frozen tower gets no gradient; the bf16 loss stays near the fp32 one; encode_image still serves evaluation."""
    torch.manual_seed(0)
    model = SimZSS.from_config(_tiny_config(concept_weight=0.5), tokenizer).train()
    batch = _batch(tokenizer, n=6)
    with torch.no_grad():
        reference = model(batch).loss
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.text.proj.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch)
    assert int(out.num_concepts) > 0
    out.loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())  # type: ignore[union-attr]
    assert model.text.proj.weight.grad is not None and model.text.proj.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(model.text.proj.weight, before)
    torch.testing.assert_close(out.loss.detach().float(), reference, rtol=3e-2 if bf16 else 1e-6,
                               atol=3e-2 if bf16 else 1e-6)
    with torch.inference_mode():
        cls, patches = model.eval().encode_image(batch.images)
    assert cls.dtype == patches.dtype == torch.float32 and patches.shape[:1] == (6,)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(patches.shape[:-1]))
