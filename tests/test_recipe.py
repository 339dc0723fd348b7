"""The official release's recipe: SimZSS's loss under configs/*_official.yaml equals a reference written from the
release's SimZSS.forward + ZSLoss (tileb1/simzss src/open_clip/model.py, loss.py), and the configs hold its values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simzss.concepts.bank import ConceptBank
from simzss.config import ModelConfig, TextConfig, TrainConfig, load_config
from simzss.data.stream import Batch
from simzss.models.simzss import SimZSS
from simzss.models.text import TextTower

ROOT = Path(__file__).resolve().parents[1]
VOCAB, PAD, EOT = 50, 0, 49  # the end-of-text id is the largest, as in CLIP's vocabulary
WIDTH, DIM, GRID, N_CLASSES = 32, 24, (3, 4), 10


# ----------------------------------------------------------------------------------------------------------------
# Reference: the release's concept branch and loss, transcribed into plain torch from reading its code
# (indices with 0 = padding, scatter-sum class weights, shallow decoder, masked logits, argmax targets).
# ----------------------------------------------------------------------------------------------------------------
def release_loss(
    tokens_proj: torch.Tensor,  # [B, L, D] ln_final(x) @ text_projection, every token
    input_ids: torch.Tensor,  # [B, L]
    concept_indices: torch.Tensor,  # [B, N, T] token positions of each concept, 0 = padding
    concept_labels: torch.Tensor,  # [B, N] class ids, -1 = padding
    cls: torch.Tensor,  # [B, D]
    patches: torch.Tensor,  # [B, P, D]
    logit_scale: torch.Tensor,  # learned, before exp
    n_classes: int,
    temp_decoder: float = 0.1,
    logit_scale_local: float = math.log(1 / 0.07),
    lambda_loss: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, d = tokens_proj.shape
    eos = tokens_proj[torch.arange(b), input_ids.argmax(dim=-1)]
    tokens_txt = F.normalize(tokens_proj, dim=-1)
    eos_txt = F.normalize(eos, dim=-1)
    img_cls = F.normalize(cls, dim=-1)
    img_patches = F.normalize(patches, dim=-1)

    idx = concept_indices.clone()
    idx[idx == 0] = n
    tokens_pad = torch.cat([tokens_txt, tokens_txt.new_zeros(b, 1, d)], dim=1)
    seq = torch.gather(tokens_pad[:, None].expand(-1, idx.shape[1], -1, -1), 2, idx[..., None].expand(-1, -1, -1, d))
    seq = seq.sum(dim=2)  # [B, N, D]: sum of the normalised span tokens
    valid = (idx.min(dim=-1).values != n).reshape(-1)

    labels = concept_labels.clone()
    labels[labels == -1] = n_classes
    flat_labels = labels.reshape(-1)
    weights = torch.zeros(n_classes + 1, d, dtype=seq.dtype)
    weights = torch.scatter_reduce(weights, 0, flat_labels[:, None].expand(-1, d), seq.reshape(-1, d), reduce="sum")
    weights = F.normalize(weights, dim=-1)  # beta_ema = 0: the EMA is the batch's weights
    queries = F.normalize(weights[flat_labels], dim=-1).reshape(b, -1, d)

    # ShallowDecoder, softmax over patches
    attn = F.softmax(torch.einsum("bkd,bnd->bkn", queries, img_patches) / temp_decoder, dim=2)
    visual = F.normalize(torch.einsum("bnd,bkn->bkd", img_patches, attn).reshape(-1, d), dim=-1)[valid]
    kept_labels = flat_labels[valid]

    logits_i = logit_scale.exp() * img_cls @ eos_txt.T
    target = torch.arange(b)
    clip = (F.cross_entropy(logits_i, target) + F.cross_entropy(logits_i.T, target)) / 2

    counts = torch.zeros(n_classes).scatter_add(0, kept_labels, torch.ones(kept_labels.shape[0]))
    logits = math.exp(logit_scale_local) * visual @ weights[:-1].T
    masked = logits.detach().clone()
    masked[:, counts == 0] = -float("inf")
    pseudo = masked.argmax(dim=-1)
    logits = logits.masked_fill((counts == 0)[None], -float("inf"))
    dense = F.cross_entropy(logits, pseudo)
    return clip + lambda_loss * dense, dense


# ----------------------------------------------------------------------------------------------------------------
def official_model_config() -> ModelConfig:
    """The model knobs of configs/coco_vitb14_official.yaml on a tiny text tower."""
    cfg = load_config(TrainConfig, ROOT / "configs" / "coco_vitb14_official.yaml").model
    cfg.text = TextConfig(layers=1, width=WIDTH, heads=2, context_length=16, pooling=cfg.text.pooling,
                          proj_bias=cfg.text.proj_bias, activation=cfg.text.activation)
    return cfg


def build_model(cfg: ModelConfig) -> SimZSS:
    torch.manual_seed(0)
    text = TextTower(cfg.text, vocab_size=VOCAB, pad_token_id=PAD, output_dim=DIM)
    return SimZSS(
        None, text, embed_dim=DIM, tau=cfg.tau, query=cfg.query, concept_weight=cfg.concept_weight,
        concept_target=cfg.concept_target, concept_scale=cfg.concept_scale, logit_scale_init=cfg.logit_scale_init,
        logit_scale_max=cfg.logit_scale_max, concept_pooling=cfg.concept_pooling,
        prototype_member_norm=cfg.prototype_member_norm,
    )


# caption lengths (real tokens incl. start and end) and concepts: (class id, token positions)
CAPTIONS = [
    (9, [(3, [1, 2, 3]), (7, [5])]),  # a three-token concept
    (6, [(3, [2]), (1, [3, 4])]),  # class 3 again (prototype of two members with different token counts)
    (12, [(7, [1, 2]), (3, [4]), (5, [6, 7, 8, 9]), (1, [10])]),
    (5, [(5, [1, 2]), (2, [])]),  # class 2 has a label but no token left (truncated): dropped, as in the release
    (4, []),  # no concept
]


def make_batch(seed: int = 1) -> tuple[Batch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, length, k = len(CAPTIONS), max(n for n, _ in CAPTIONS), max(len(c) for _, c in CAPTIONS)
    ids = torch.full((b, length), PAD, dtype=torch.long)
    attn = torch.zeros(b, length, dtype=torch.long)
    cmask = torch.zeros(b, k, length, dtype=torch.bool)
    labels = torch.full((b, k), -1, dtype=torch.long)
    cidx = torch.zeros(b, k, 6, dtype=torch.long)
    for i, (n, concepts) in enumerate(CAPTIONS):
        ids[i, :n] = torch.randint(1, EOT - 1, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = EOT - 1, EOT  # start id, then the end id (the largest)
        attn[i, :n] = 1
        for j, (label, pos) in enumerate(concepts):
            labels[i, j] = label
            cmask[i, j, pos] = True
            cidx[i, j, : len(pos)] = torch.tensor(pos, dtype=torch.long)
    h, w = GRID
    batch = Batch(
        images=None, input_ids=ids, attention_mask=attn, concept_mask=cmask, concept_labels=labels,
        captions=[""] * b, keys=[str(i) for i in range(b)],
        vision_cls=torch.randn(b, DIM, generator=g), vision_patches=torch.randn(b, h, w, DIM, generator=g),
    )
    return batch, cidx


def reference_for(model: SimZSS, batch: Batch, cidx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, _ = model.text(batch.input_ids, batch.attention_mask)
    tokens_proj = tokens @ model.text.proj.weight.T  # text_projection: no bias
    b, h, w, d = batch.vision_patches.shape
    return release_loss(tokens_proj, batch.input_ids, cidx, batch.concept_labels, batch.vision_cls,
                        batch.vision_patches.reshape(b, h * w, d), model.logit_scale, N_CLASSES)


def test_official_recipe_loss_matches_release_reference():
    cfg = official_model_config()
    model = build_model(cfg)
    assert model.text.proj.bias is None
    batch, cidx = make_batch()

    out = model(batch)
    ref_total, ref_dense = reference_for(model, batch, cidx)
    assert out.num_concepts == 9  # the token-less concept of caption 3 is dropped
    assert out.num_classes == 4  # classes 1, 3, 5, 7 present; 0, 2, 4, 6, 8, 9 absent (masked)
    torch.testing.assert_close(out.concept_loss, ref_dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_total, rtol=1e-5, atol=1e-6)

    # same gradients into the text tower and the learned logit scale
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want = torch.autograd.grad(reference_for(model, batch, cidx)[0], params, allow_unused=True)
    for (name, _), a, e in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], got, want):
        if e is None:
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_recipe_knobs_matter():
    """Each release knob changes the loss on this batch (so the comparison above is not vacuous)."""
    batch, cidx = make_batch()
    ref = reference_for(build_model(official_model_config()), batch, cidx)[1]
    for change in (dict(concept_pooling="mean"), dict(prototype_member_norm=True), dict(concept_scale=None),
                   dict(query="concept")):
        cfg = official_model_config()
        for key, value in change.items():
            setattr(cfg, key, value)
        model = build_model(cfg)
        if change.get("concept_scale", 0) is None:
            with torch.no_grad():
                model.logit_scale.fill_(math.log(30.0))
        loss = model(batch).concept_loss
        assert not torch.allclose(loss, ref, rtol=1e-4, atol=1e-6), change


def test_sum_normalized_pooling_is_a_sum_of_unit_vectors():
    """A concept of k tokens pools to a vector of norm <= k that equals the sum of its normalised projections."""
    model = build_model(official_model_config())
    batch, _ = make_batch()
    tokens, _ = model.text(batch.input_ids, batch.attention_mask)
    mask = batch.concept_mask & batch.attention_mask.bool().unsqueeze(1)
    slots = torch.tensor([0, 1])  # caption 0: the three-token concept, then the one-token concept
    pooled = model._text_concepts(tokens, mask)[slots]  # [B*K, D]: slot k of caption b at row b*K + k
    unit = F.normalize(model.text.proj(tokens[0]), dim=-1)
    torch.testing.assert_close(pooled[0], unit[1] + unit[2] + unit[3])
    torch.testing.assert_close(pooled[1].norm(), torch.tensor(1.0))
    assert 1.0 < float(pooled[0].detach().norm()) <= 3.0 + 1e-5


def test_bad_pooling_name_is_refused():
    cfg = official_model_config()
    cfg.concept_pooling = "max"
    with pytest.raises(ValueError, match="concept_pooling"):
        build_model(cfg)


# ----------------------------------------------------------------------------------------------------------------
# The configs hold the release's values (README launch command, args_coco.json, model config, main.py)
# ----------------------------------------------------------------------------------------------------------------
RELEASE = {
    "batch_size": 1024, "epochs": 10, "seed": 0,
    "model.tau": 0.1, "model.concept_weight": 0.05, "model.query": "prototype", "model.concept_target": "argmax",
    "model.concept_pooling": "sum_normalized", "model.prototype_member_norm": False,
    "model.concept_scale": 1 / 0.07, "model.logit_scale_init": math.log(1 / 0.07), "model.logit_scale_max": math.log(100),
    "model.vision.name": "vit_base_patch14_reg4_dinov2.lvd142m", "model.vision.denoiser": "dvt",
    "model.text.layers": 12, "model.text.width": 512, "model.text.heads": 8, "model.text.context_length": 77,
    "model.text.pooling": "argmax", "model.text.proj_bias": False, "model.text.activation": "gelu",
    "model.tokenizer": "open_clip",
    "data.image_size": 224, "data.crop_scale": (0.9, 1.0), "data.interpolation": "bicubic", "data.max_concepts": 32,
    "data.concept_bank": "builtin:release574", "data.synonyms": None, "data.spacy_model": "en_core_web_trf",
    "optim.lr": 3e-5, "optim.scale_lr": True, "optim.weight_decay": 0.2, "optim.betas": (0.9, 0.98),
    "optim.eps": 1e-6, "optim.warmup": 0.1, "optim.grad_clip": None,
}


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name,num_samples,resampled", [
    ("coco_vitb14_official.yaml", 400_000, False), ("laion_vitb14_official.yaml", 40_000_000, True)])
def test_official_configs_hold_release_values(name, num_samples, resampled):
    cfg = load_config(TrainConfig, ROOT / "configs" / name)
    for key, want in RELEASE.items():
        got = _get(cfg, key)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-12), key
        else:
            assert (tuple(got) if isinstance(got, (list, tuple)) else got) == want, key
    assert cfg.data.num_samples == num_samples and cfg.data.resampled is resampled
    # lr as launched on 2 nodes x 8 GPUs: 3e-5 x (1024 x 16) / 256
    assert cfg.optim.lr * cfg.batch_size * 16 / 256 == pytest.approx(1.92e-3)


def test_release_bank_is_the_release_file():
    """574 lines in the release's order; 573 distinct names once stripped (the release's "bed " duplicate)."""
    from simzss.resources import resource_text

    lines = [ln for ln in resource_text("banks/release574.txt").splitlines() if not ln.startswith("#")]
    assert len(lines) == 574
    assert lines[:4] == ["aeroplane", "air conditioner", "airplane", "ambulance"] and lines[-1] == "zebra"
    assert lines[36:38] == ["bed", "bed "]
    bank = ConceptBank.from_file("builtin:release574")
    # the release indexes sorted(set(stripped lower-cased lines)); ids may differ, the vocabulary may not
    assert sorted(bank.names) == sorted({ln.strip().lower() for ln in lines})
    assert len(bank) == 573
    assert bank.lookup("aeroplane") != bank.lookup("airplane")  # two classes, as in the release
    with pytest.raises(FileNotFoundError, match="builtin:release574"):
        ConceptBank.from_file("builtin:nope")
