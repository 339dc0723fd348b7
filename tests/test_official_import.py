"""`simzss import-official`: release-layout checkpoints (random weights) against a reference of the release's forward.

The reference below is written from the release's code (tileb1/simzss: open_clip ``TextTransformer`` with its
77 x 77 causal mask and ``text.argmax(-1)`` pooling; DenoisingViT's ViT wrapper and ``Denoiser``), independently of
simzss's towers; open_clip_torch's ``SimpleTokenizer`` is the reference tokenizer.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, Mlp
from torch import nn

from simzss.cli import import_official as official_cli
from simzss.io import official
from simzss.models.simzss import SimZSS

VOCAB, CONTEXT = 49408, 77
VISION = "vit_base_patch14_reg4_dinov2"  # the release's layout (ViT-B/14, 4 registers, 37x37 grid), depth cut
CAPTIONS = [
    "A Photo of a CAT on the GRASS.",
    "Crème brûlée à la française, naïve café — “quoted” &amp; ﬁne",
    "  a   dog\tunder\na blue sky  ",
    " ".join(f"Word{i} élan" for i in range(60)),  # far more than 77 tokens: truncated, end-of-text kept
    "car",
]


# --------------------------------------------------------------------------------------------------
# Reference: the release's modules and forward, as read from its code
# --------------------------------------------------------------------------------------------------


class RefBlock(nn.Module):
    """open_clip ResidualAttentionBlock: pre-norm, seq-first nn.MultiheadAttention, c_fc / GELU / c_proj."""

    def __init__(self, width: int, heads: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", act()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class RefText(nn.Module):
    """The fork's TextTransformer: the full context's causal mask, ln_final, @ text_projection, eos at argmax id."""

    def __init__(self, width: int, layers: int, heads: int, out_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, width)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, width) * 0.05)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(RefBlock(width, heads, act) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, out_dim) * width**-0.5)
        mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        x = x.permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)  # the release always feeds 77 tokens: the mask is never cut
        x = self.ln_final(x.permute(1, 0, 2)) @ self.text_projection
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)]


def ref_denoiser_block(dim: int) -> Block:
    """DVT's Denoiser block as the release builds it."""
    return Block(dim=dim, num_heads=dim // 64, mlp_ratio=4, qkv_bias=True, qk_norm=False, init_values=None,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, mlp_layer=Mlp)


def ref_image_features(vit: nn.Module, block: Block, pos_embed: torch.Tensor, images: torch.Tensor):
    """ViTWrapper.get_intermediate_layers(last block, norm, class token) then Denoiser.forward (transformer)."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.norm_pre(x)
    for blk in vit.blocks:
        x = blk(x)
    x = vit.norm(x)
    cls = x[:, 0]
    p = vit.patch_embed.patch_size[0]
    h, w = (images.shape[2] - p) // p + 1, (images.shape[3] - p) // p + 1
    patches = x[:, vit.num_prefix_tokens:].reshape(x.shape[0], h, w, -1)
    b, _, _, c = patches.shape
    y = patches.reshape(b, h * w, c) + resample_abs_pos_embed(pos_embed, (h, w), num_prefix_tokens=0).repeat(b, 1, 1)
    return cls, block(y).reshape(b, h, w, c)


def _jitter(module: nn.Module, scale: float = 0.05) -> None:
    """Move every weight away from its init (layer scales, norms, biases included) so nothing is trivially 0/1."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


class Release:
    """Random release weights: the reference modules and the checkpoint state dict built from them."""

    def __init__(self, *, text_width: int = 128, text_layers: int = 2, text_heads: int = 2, depth: int = 1,
                 quick_gelu: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.vit = timm.create_model(VISION, pretrained=False, num_classes=0, dynamic_img_size=True, depth=depth).eval()
        _jitter(self.vit)
        with torch.no_grad():
            for blk in self.vit.blocks:  # DINOv2's layer scale starts at 1e-5: make the blocks count
                blk.ls1.gamma.normal_(0.5, 0.1)
                blk.ls2.gamma.normal_(0.5, 0.1)
        dim = self.vit.embed_dim
        self.block = ref_denoiser_block(dim).eval()
        _jitter(self.block)
        self.pos_embed = torch.randn(1, 37 * 37, dim) * 0.5
        self.text = RefText(text_width, text_layers, text_heads, dim, QuickGELU if quick_gelu else nn.GELU).eval()
        _jitter(self.text, 0.02)
        self.logit_scale = torch.tensor(4.2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"visual.vit.model.{k}": v for k, v in self.vit.state_dict().items()}
        state.update({f"visual.denoiser.{k}": v for k, v in self.block.state_dict().items()})
        state["visual.pos_embed"] = self.pos_embed
        state.update({f"text.{k}": v for k, v in self.text.state_dict().items()})
        state["logit_scale"] = self.logit_scale
        # training-only state of the release's SimZSS (574 classes + 1)
        state["logit_scale_local"] = torch.full((1,), 2.659)
        state["classification_weights_ema"] = torch.randn(575, self.vit.embed_dim)
        state["beta_ema"] = torch.tensor(0.0)
        return {k: v.clone() for k, v in state.items()}

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        ids = open_clip_tokenizer()(captions, context_length=CONTEXT)
        return F.normalize(self.text(ids), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls, patches = ref_image_features(self.vit, self.block, self.pos_embed, images)
        return F.normalize(cls, dim=-1), F.normalize(patches, dim=-1)


@lru_cache(maxsize=1)
def open_clip_tokenizer():
    """open_clip_torch's SimpleTokenizer: the reference ids."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def release() -> Release:
    torch.set_num_threads(2)
    return Release()


@pytest.fixture(scope="module")
def imported(release: Release, tmp_path_factory) -> Path:
    """The release checkpoint as the README loads it (``module.`` keys), imported with the command."""
    work = tmp_path_factory.mktemp("official")
    ckpt = _save({f"module.{k}": v for k, v in release.state_dict().items()}, work / "simzss_coco.pt")
    rc = official_cli.main([str(ckpt), "--out", str(work / "export")])
    assert rc == 0
    return work / "export"


# --------------------------------------------------------------------------------------------------
# Acceptance: the export computes what the release computes
# --------------------------------------------------------------------------------------------------


def test_export_equals_release_forward(release: Release, imported: Path) -> None:
    model = SimZSS.from_pretrained(imported)
    cfg = json.loads((imported / "config.json").read_text())["model"]
    assert cfg["vision"]["denoiser"] == "dvt" and cfg["vision"]["model_kwargs"] == {"depth": 1}
    assert cfg["text"]["pooling"] == "argmax" and cfg["text"]["proj_bias"] is False
    # the release fed DINOv2 CLIP-normalised images (open_clip's default): uint8 / PIL inputs get the same
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert cfg["vision"]["normalization"] == "clip"
    assert model.vision.mean == tuple(OPENAI_CLIP_MEAN) and model.vision.std == tuple(OPENAI_CLIP_STD)
    torch.testing.assert_close(model.encode_texts(CAPTIONS), release.encode_texts(CAPTIONS), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.logit_scale.detach(), release.logit_scale)
    gen = torch.Generator().manual_seed(1)
    for h, w in ((56, 56), (42, 70)):  # square and non-square grids (4x4, 3x5): the 37x37 pos_embed is resampled
        images = torch.randn(2, 3, h, w, generator=gen)
        cls, patches = model.encode_image(images)
        ref_cls, ref_patches = release.encode_image(images)
        assert patches.shape == (2, h // 14, w // 14, 768)
        torch.testing.assert_close(cls, ref_cls, atol=1e-4, rtol=0)
        torch.testing.assert_close(patches, ref_patches, atol=1e-4, rtol=0)
        # the denoiser is really applied (the patch features differ from the raw ViT's)
        raw = model.vision.model.forward_features(images)[:, 5:].reshape_as(patches)
        assert (F.normalize(raw, dim=-1) - patches).abs().max() > 0.1


def test_imported_export_re_exports(imported: Path, tmp_path: Path) -> None:
    """save_pretrained of the loaded import is again a complete export (tokenizer class, denoiser, no bias)."""
    from simzss.io.export import save_pretrained

    model = SimZSS.from_pretrained(imported)
    again = SimZSS.from_pretrained(save_pretrained(model, tmp_path / "again"))
    assert type(again.tokenizer).__name__ == "OpenCLIPTokenizerFast" and again.text.proj.bias is None
    images = torch.randn(1, 3, 28, 42)
    torch.testing.assert_close(again.encode_texts(CAPTIONS[:2]), model.encode_texts(CAPTIONS[:2]), atol=0, rtol=0)
    torch.testing.assert_close(again.encode_image(images), model.encode_image(images), atol=0, rtol=0)


def test_real_text_config_12x512(tmp_path: Path) -> None:
    """The released text tower's size (12 layers x 512, 8 heads), also with QuickGELU (--quick-gelu)."""
    rel = Release(text_width=512, text_layers=12, text_heads=8, quick_gelu=True, seed=3)
    ckpt = _save({"state_dict": rel.state_dict(), "epoch": 10}, tmp_path / "epoch_10.pt")
    assert official_cli.main([str(ckpt), "--out", str(tmp_path / "export"), "--quick-gelu"]) == 0
    model = SimZSS.from_pretrained(tmp_path / "export", build_vision=False)
    assert (model.config.text.layers, model.config.text.width, model.config.text.heads) == (12, 512, 8)
    torch.testing.assert_close(model.encode_texts(CAPTIONS), rel.encode_texts(CAPTIONS), atol=1e-4, rtol=0)


def test_tokenizer_ids_equal_open_clip(imported: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(imported / "tokenizer"), local_files_only=True)
    texts = CAPTIONS + ["&lt;b&gt; bold &amp;amp; ＦＵＬＬ width", "don't we'll 3.14 e=mc²",
                        "émoji 🎉 İstanbul ΟΔΟΣ",
                        "<end_of_text> in the middle", ""]
    ref = open_clip_tokenizer()(texts, context_length=CONTEXT)
    enc = tok(texts, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
    for i in range(len(texts)):
        n = int(enc["attention_mask"][i].sum())
        want = ref[i][: int((ref[i] != 0).nonzero().max()) + 1]  # open_clip pads with 0
        assert enc["input_ids"][i, :n].tolist() == want.tolist(), texts[i]
    long = enc["input_ids"][3]
    assert long[0] == 49406 and long[-1] == 49407 and int(enc["attention_mask"][3].sum()) == CONTEXT


def test_load_tokenizer_open_clip_name_and_concept_spans() -> None:
    """``model.tokenizer: open_clip`` for training: concept spans (raw-caption characters) still find their tokens
    after the cleaning moved characters (whitespace runs, an HTML entity, upper case)."""
    from simzss.data.tokenize import load_tokenizer, tokenize_batch

    tok = load_tokenizer("open_clip")
    assert len(tok) == VOCAB and tok.pad_token_id == 49407
    assert tok("A CAT")["input_ids"] == [49406, 320, 2368, 49407]
    captions = ["  The  TENNIS   racket &amp; a ball", "Crème brûlée on a TABLE"]
    spans = [[(3, [(c.index(w), c.index(w) + len(w))]) for w in words]
             for c, words in zip(captions, (["TENNIS   racket", "ball"], ["TABLE"]))]
    out = tokenize_batch(tok, captions, spans, context_length=CONTEXT)
    words = [[tok.decode(out["input_ids"][b][out["concept_mask"][b, k]]).strip() for k in range(len(spans[b]))]
             for b in range(2)]
    assert words == [["tennis racket", "ball"], ["table"]]


# --------------------------------------------------------------------------------------------------
# Bad and unusual checkpoints
# --------------------------------------------------------------------------------------------------


class NotWeights:  # a pickled object: loading it needs code
    pass


def test_refuses_pickled_code(release: Release, tmp_path: Path, capsys) -> None:
    ckpt = _save({"state_dict": release.state_dict(), "extra": NotWeights()}, tmp_path / "evil.pt")
    rc = official_cli.main([str(ckpt), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert "evil.pt" in err and "refusing" in err and "NotWeights" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n", b"PK\x03\x04garbage", b""], ids=["text", "zip", "empty"])
def test_foreign_files_are_one_line_errors(tmp_path: Path, capsys, content: bytes) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    rc = official_cli.main([str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "bad.pt" in err and "Traceback" not in err
    from simzss.models.denoiser import read_denoiser_state

    with pytest.raises(ValueError, match="not a readable torch weights file"):
        read_denoiser_state(bad)


def test_unknown_and_missing_keys_named(release: Release, tmp_path: Path, capsys) -> None:
    state = release.state_dict()
    state["visual.decoder.weight"] = torch.zeros(3)
    del state["text.transformer.resblocks.1.mlp.c_fc.bias"]
    del state["visual.vit.model.blocks.0.ls2.gamma"]
    rc = official_cli.main([str(_save(state, tmp_path / "bad.pt")), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    for key in ("visual.decoder.weight", "text.transformer.resblocks.1.mlp.c_fc.bias", "visual.vit.model.blocks.0.ls2.gamma"):
        assert key in err
    # unknown keys alone can be left out on request, and are still listed
    state = release.state_dict()
    state["visual.decoder.weight"] = torch.zeros(3)
    with pytest.raises(official.OfficialCheckpointError, match="unknown keys: visual.decoder.weight$"):
        official.convert_official(state)
    assert official.convert_official(state, ignore_unknown=True).ignored_unknown == ["visual.decoder.weight"]
    # a wrong shape is named with both shapes
    state = release.state_dict()
    state["text.text_projection"] = torch.zeros(128, 512)
    rc = official_cli.main([str(_save(state, tmp_path / "shape.pt")), "--out", str(tmp_path / "out2")])
    assert rc != 0 and "text.text_projection (128, 512) (expected (128, 768))" in capsys.readouterr().err


def test_wrappers_and_prefixes_give_the_same_weights(release: Release, tmp_path: Path) -> None:
    state = release.state_dict()
    plain = official.convert_official(official.read_official_checkpoint(_save(state, tmp_path / "a.pt")))
    for i, obj in enumerate([
        {f"module.{k}": v for k, v in state.items()},
        {"state_dict": state, "epoch": 3, "name": "run"},
        {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    ]):
        conv = official.convert_official(official.read_official_checkpoint(_save(obj, tmp_path / f"{i}.pt")))
        assert conv.state.keys() == plain.state.keys()
        assert all(torch.equal(conv.state[k], plain.state[k]) for k in plain.state)
    assert sorted(plain.unused) == ["beta_ema", "classification_weights_ema", "logit_scale_local"]
    # the checkpoint's blocks/shape set the architecture; --vision-kwargs overrides, and a wrong one is named
    bad = official_cli.main([str(tmp_path / "a.pt"), "--out", str(tmp_path / "o"), "--vision-kwargs", '{"depth": 2}'])
    assert bad != 0


def test_no_denoiser_checkpoint(release: Release, tmp_path: Path) -> None:
    """A release model trained without DVT (denoiser_type None) still has visual.pos_embed, unused."""
    state = {k: v for k, v in release.state_dict().items() if not k.startswith("visual.denoiser.")}
    conv = official.convert_official(state)
    assert conv.config.vision.denoiser == "none" and "visual.pos_embed" in conv.unused
    assert not any(k.startswith("vision.denoiser") for k in conv.state)


# --------------------------------------------------------------------------------------------------
# The imported export in the project's commands
# --------------------------------------------------------------------------------------------------


def test_segment_and_eval_on_imported_export(imported: Path, tmp_path: Path, capsys) -> None:
    from simzss.cli import main as cli
    from simzss.data.synthetic import generate_toy_world

    info = generate_toy_world(tmp_path / "toy", num_train=0, num_val=2, image_size=64)
    image = sorted(Path(info["val_dir"], "images").iterdir())[0]
    slide = ["--short-side", "56", "--crop", "56", "--stride", "28"]
    out, mask = tmp_path / "overlay.png", tmp_path / "mask.png"
    rc = cli(["segment", str(image), "--model", str(imported), "--labels", "sky,grass,road", "--out", str(out),
              "--out-mask", str(mask), *slide, "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).format == "PNG"
    labels = np.asarray(Image.open(mask))
    assert labels.shape == (64, 64) and labels.max() < 3
    res_path = tmp_path / "eval.json"
    rc = cli(["eval", str(imported), "--datasets", f"folder:{info['val_dir']}", *slide, "--cpu", "--workers", "0",
              "--no-progress", "--out", str(res_path)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(res_path.read_text())["results"][f"folder:{info['val_dir']}"]
    assert res["num_images"] == 2 and res["skipped"] == 0 and 0.0 <= res["mIoU"] <= 100.0


# --------------------------------------------------------------------------------------------------
# The denoiser as part of the vision tower (training, feature cache, inference)
# --------------------------------------------------------------------------------------------------

SMALL = "vit_small_patch14_reg4_dinov2"  # 384 wide: the DVT block gets 6 heads
SMALL_KW = {"depth": 1, "img_size": 56}


@pytest.fixture(scope="module")
def dvt_file(tmp_path_factory) -> tuple[Path, Block, torch.Tensor]:
    """A DVT weights file as its release saves it: {"denoiser": state (with the backbone's vit.* copy), ...}."""
    torch.manual_seed(5)
    block = ref_denoiser_block(384).eval()
    _jitter(block)
    pos = torch.randn(1, 37 * 37, 384) * 0.5
    state = {f"denoiser.{k}": v for k, v in block.state_dict().items()}
    state["pos_embed"] = pos
    state["vit.model.cls_token"] = torch.zeros(1, 1, 384)
    path = tmp_path_factory.mktemp("dvt") / "vit_small_patch14_reg4_dinov2.lvd142m.pth"
    torch.save({"denoiser": state, "epoch": 7}, path)
    return path, block, pos


def test_tower_applies_dvt_from_weights_file(dvt_file) -> None:
    from simzss.config import VisionConfig
    from simzss.models.vision import build_vision_tower

    path, block, pos = dvt_file
    torch.manual_seed(0)
    cfg = VisionConfig(name=SMALL, pretrained=False, model_kwargs=SMALL_KW, denoiser="dvt", denoiser_weights=str(path))
    tower = build_vision_tower(cfg)
    images = torch.randn(1, 3, 42, 56)
    cls, patches = tower(images)
    with torch.no_grad():
        tokens = tower.model.forward_features(images)
        raw = tokens[:, 5:].reshape(1, 3, 4, 384)
        want = block(raw.reshape(1, 12, 384) + resample_abs_pos_embed(pos, (3, 4), num_prefix_tokens=0)).reshape(1, 3, 4, 384)
    torch.testing.assert_close(cls, tokens[:, 0])  # CLS is taken before the denoiser
    torch.testing.assert_close(patches, want, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in tower.parameters())


def test_denoiser_settings_are_checked(dvt_file, tmp_path: Path) -> None:
    from simzss.models.vision import FrozenVisionTower

    with pytest.raises(ValueError, match="denoiser_weights"):  # before anything is downloaded
        FrozenVisionTower(SMALL, pretrained=True, denoiser="dvt")
    with pytest.raises(ValueError, match="none \\| dvt|'none', 'dvt'"):
        FrozenVisionTower(SMALL, pretrained=False, model_kwargs=SMALL_KW, denoiser="conv3x3")
    with pytest.raises(ValueError, match="pos_embed \\(1, 1369, 384\\) \\(expected \\(1, 1369, 768\\)\\)"):
        FrozenVisionTower("vit_base_patch14_reg4_dinov2", pretrained=False, model_kwargs=SMALL_KW, denoiser="dvt",
                          denoiser_weights=str(dvt_file[0]))
    evil = tmp_path / "evil.pth"
    torch.save({"denoiser": NotWeights()}, evil)
    with pytest.raises(ValueError, match="refusing"):
        FrozenVisionTower(SMALL, pretrained=False, model_kwargs=SMALL_KW, denoiser="dvt", denoiser_weights=str(evil))


def test_feature_cache_records_and_checks_the_denoiser(dvt_file, tmp_path: Path) -> None:
    import dataclasses

    from simzss.cli.cache_features import cache_features
    from simzss.config import ModelConfig, VisionConfig
    from simzss.data.features import CacheError
    from simzss.data.features.format import check_cache_compatible, read_cache_meta, weights_fingerprint
    from simzss.data.synthetic import generate_toy_world
    from simzss.models.vision import build_vision_tower

    world = generate_toy_world(tmp_path / "toy", num_train=2, num_val=0, image_size=56, shard_size=2)
    weights = tmp_path / "small.pth"  # a fixed backbone, so cache and model towers are the same
    torch.manual_seed(0)
    plain = VisionConfig(name=SMALL, pretrained=False, model_kwargs=SMALL_KW)
    torch.save(build_vision_tower(plain).model.state_dict(), weights)
    cfg = dataclasses.replace(plain, pretrained=True, weights=str(weights), denoiser="dvt", denoiser_weights=str(dvt_file[0]))
    cache_features([world["train_dir"]], tmp_path / "cache", vision=cfg, image_size=56, workers=0, progress=False)
    meta = read_cache_meta(tmp_path / "cache")
    assert meta["vision"]["denoiser"] == "dvt" and meta["vision"]["denoiser_weights"] == str(dvt_file[0])
    fingerprint = weights_fingerprint(build_vision_tower(cfg))
    check_cache_compatible(meta, ModelConfig(vision=cfg), 56, fingerprint=fingerprint)
    with pytest.raises(CacheError, match="model.vision.denoiser"):
        check_cache_compatible(meta, ModelConfig(vision=dataclasses.replace(cfg, denoiser="none", denoiser_weights=None)), 56)
    other = tmp_path / "other_dvt.pth"
    other.write_bytes(Path(dvt_file[0]).read_bytes())
    with pytest.raises(CacheError, match="other_dvt.pth"):
        check_cache_compatible(meta, ModelConfig(vision=dataclasses.replace(cfg, denoiser_weights=str(other))), 56)
    # a cache written before denoisers existed reads as "none"
    old = {**meta, "vision": {k: v for k, v in meta["vision"].items() if not k.startswith("denoiser")}}
    check_cache_compatible(old, ModelConfig(vision=dataclasses.replace(cfg, denoiser="none", denoiser_weights=None)), 56)


def test_command_default_vision_is_the_release_tower() -> None:
    """The command keeps its own copy (its parser must not import timm); it must name the same tower."""
    assert official_cli.RELEASE_VISION == official.RELEASE_VISION
