"""GEM and MaskCLIP baselines: equations against references written from the papers (numpy, float64, per head),
spec parsing, and evaluation of random-init tiny open_clip models through the same harness as SimZSS exports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simzss.baselines import is_baseline_spec, load_baseline, split_spec
from simzss.baselines.gem import GemVision, adaptive_inverse_temperature, gem_attention
from simzss.baselines.maskclip import MaskClipVision
from simzss.baselines.openclip import ClipSource, parse_clip_source, resized_pos_embed

TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """An open_clip model config: ViT 3 blocks x 48 wide (3 heads of 16), 32-px input, patch 8."""
    path = tmp_path_factory.mktemp("clip") / "tiny_test_clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="module")
def gem_model(tiny_config):
    torch.manual_seed(0)
    return load_baseline(f"gem:{tiny_config}/random", gem_layers=2)


# ------------------------------------------------------------------------------- references from the papers


def _softmax_rows(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def ref_gem_heads(x: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, iterations: int,
                  tau: float | None) -> np.ndarray:
    """GEM paper, one sample: per head, for p in (q, k, v): `iterations` times p <- softmax(p̂p̂ᵀ/τ) p̂, then
    O_p = softmax(p̂p̂ᵀ/τ) v; O = (O_q + O_k + O_v) / 3; τ = N·√d / Σᵢ‖xᵢ‖ (x: full-width input tokens)."""
    n, c = x.shape
    d = c // heads
    if tau is None:
        tau = n * math.sqrt(d) / np.linalg.norm(x, axis=1).sum()
    out = np.zeros((n, c))
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        acc = np.zeros((n, d))
        for p in (q[:, cols], k[:, cols], v[:, cols]):
            for _ in range(iterations):
                pn = _unit_rows(p)
                p = _softmax_rows(pn @ pn.T / tau) @ pn
            pn = _unit_rows(p)
            acc += _softmax_rows(pn @ pn.T / tau) @ v[:, cols]
        out[:, cols] = acc / 3
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def ref_layer_norm(x: np.ndarray, ln: torch.nn.LayerNorm) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * _np(ln.weight) + _np(ln.bias)


def ref_qkv(blk, y: np.ndarray):
    w, b = _np(blk.attn.in_proj_weight), _np(blk.attn.in_proj_bias)
    qkv = y @ w.T + b
    return np.split(qkv, 3, axis=-1)


# --------------------------------------------------------------------------------------------- equations


@pytest.mark.parametrize("iterations", [0, 1, 2])
@pytest.mark.parametrize("tau", [None, 0.3])
def test_gem_attention_matches_the_paper(iterations, tau) -> None:
    g = torch.Generator().manual_seed(iterations)
    b, n, heads, d = 2, 7, 3, 4
    x = torch.randn(b, n, heads * d, generator=g, dtype=torch.float64) * 3
    q, k, v = (torch.randn(b, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    got = gem_attention(x, q, k, v, tau, iterations)
    for i in range(b):
        merge = lambda t: _np(t[i].transpose(0, 1).reshape(n, heads * d))  # noqa: E731 - heads side by side
        want = ref_gem_heads(_np(x[i]), merge(q), merge(k), merge(v), heads, iterations, tau)
        np.testing.assert_allclose(_np(got[i]), want, rtol=1e-9, atol=1e-12)


def test_adaptive_temperature_formula() -> None:
    x = torch.randn(3, 10, 12, dtype=torch.float64)
    inv = adaptive_inverse_temperature(x, head_dim=4)
    for i in range(3):
        tau = 10 * math.sqrt(4) / float(x[i].norm(dim=-1).sum())
        assert inv[i].item() == pytest.approx(1 / tau, rel=1e-12)
    # the temperature follows the token norms: a 2x larger input gives a 2x smaller tau
    assert torch.allclose(adaptive_inverse_temperature(2 * x, 4), 2 * inv)


def test_gem_pathway_matches_reference_over_the_last_blocks(gem_model) -> None:
    """Residual aggregation of the GEM outputs over the last 2 of 3 blocks, from open_clip's own ViT stream."""
    visual = gem_model.clip.visual
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # open_clip's own forward gives the tokens entering each block (independent of simzss code)
    inter = visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True,
                                         intermediates_only=True)
    entering = [torch.cat([pre, tok], dim=1) for pre, tok in
                zip(inter["image_intermediates_prefix"], inter["image_intermediates"])]  # output of block i
    blocks = visual.transformer.resblocks
    cls, patches = gem_model.vision(images)
    for i in range(2):
        x1, x2 = _np(entering[0][i]), _np(entering[1][i])  # enter blocks 1 and 2
        x_gem = x1.copy()
        for blk, x in ((blocks[1], x1), (blocks[2], x2)):
            y = ref_layer_norm(x, blk.ln_1)
            q, k, v = ref_qkv(blk, y)
            o = ref_gem_heads(y, q, k, v, blk.attn.num_heads, 1, None)
            x_gem += o @ _np(blk.attn.out_proj.weight).T + _np(blk.attn.out_proj.bias)
        want = ref_layer_norm(x_gem, visual.ln_post) @ _np(visual.proj)
        np.testing.assert_allclose(_np(patches[i]).reshape(16, -1), want[1:], rtol=1e-4, atol=1e-4)
    # the global embedding is CLIP's own, untouched by GEM
    torch.testing.assert_close(cls, gem_model.clip.encode_image(images), rtol=1e-5, atol=1e-5)


def test_maskclip_nores_uses_last_block_values_only(tiny_config) -> None:
    torch.manual_seed(0)
    model = load_baseline(f"maskclip-nores:{tiny_config}/random")
    assert isinstance(model.vision, MaskClipVision) and not model.vision.residual
    assert model.variant.startswith("maskclip-nores (")
    visual = model.clip.visual
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    inter = visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True,
                                         intermediates_only=True)
    last_in = torch.cat([inter["image_intermediates_prefix"][-2], inter["image_intermediates"][-2]], dim=1)
    last = visual.transformer.resblocks[-1]
    cls, patches = model.vision(images)
    for i in range(2):
        _, _, v = ref_qkv(last, ref_layer_norm(_np(last_in[i]), last.ln_1))
        o = v @ _np(last.attn.out_proj.weight).T + _np(last.attn.out_proj.bias)
        want = ref_layer_norm(o, visual.ln_post) @ _np(visual.proj)
        np.testing.assert_allclose(_np(patches[i]).reshape(16, -1), want[1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls, model.clip.encode_image(images), rtol=1e-5, atol=1e-5)
    # encode_image normalises; GEM and MaskCLIP see the same image differently
    _, p_norm = model.encode_image(images)
    torch.testing.assert_close(p_norm.norm(dim=-1), torch.ones(2, 4, 4))


# ------------------------------------------------------- MaskCLIP against its authors' code, from its equations


def ref_bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """``[n_out, n_in]`` cubic-convolution weights (Keys, a = -0.75), half-pixel centres (align_corners=False),
    border samples repeated: what ``F.interpolate(mode="bicubic", align_corners=False)`` computes without
    antialiasing, which mmseg's ``resize`` calls in MaskCLIP's ``VisionTransformer.resize_pos_embed``."""
    def k(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(src)
        for j in range(i0 - 1, i0 + 3):
            m[o, min(max(j, 0), n_in - 1)] += k(src - j)
    return m


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def ref_attention(blk, y: np.ndarray) -> np.ndarray:
    q, k, v = ref_qkv(blk, y)
    heads = blk.attn.num_heads
    d = q.shape[1] // heads
    out = np.zeros_like(q)
    for h in range(heads):
        c = slice(h * d, (h + 1) * d)
        out[:, c] = _softmax_rows(q[:, c] @ k[:, c].T / math.sqrt(d)) @ v[:, c]
    return out @ _np(blk.attn.out_proj.weight).T + _np(blk.attn.out_proj.bias)


def ref_mlp(blk, y: np.ndarray) -> np.ndarray:
    hid = _gelu(y @ _np(blk.mlp.c_fc.weight).T + _np(blk.mlp.c_fc.bias))
    return hid @ _np(blk.mlp.c_proj.weight).T + _np(blk.mlp.c_proj.bias)


def ref_maskclip(visual, image: np.ndarray, residual: bool = True) -> np.ndarray:
    """MaskCLIP's dense features of one image ``[3, H, W]`` from the equations of the authors' code
    (chongzhou96/MaskCLIP: mmseg/models/backbones/vit.py ``VisionTransformer.forward`` and
    ``TransformerEncoderLayer.forward(return_qkv=True)``; mmseg/models/decode_heads/maskclip_head.py
    ``MaskClipHead.forward``, whose ``proj`` is CLIP's visual projection): patch embedding, CLS, position
    embeddings resized by plain bicubic, ln_pre, every block but the last as usual; in the last block
    v = out_proj(W_v ln_1(x) + b_v), v = v + x, v = v + mlp(ln_2(v)); then ln_post (``final_norm``) and proj."""
    p = visual.conv1.weight.shape[-1]
    c, hh, ww = image.shape
    gh, gw = hh // p, ww // p
    patches = image.reshape(c, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, c * p * p)
    x = patches @ _np(visual.conv1.weight).reshape(visual.conv1.weight.shape[0], -1).T
    pos = _np(visual.positional_embedding)
    g0 = int(round(math.sqrt(pos.shape[0] - 1)))
    grid = pos[1:].reshape(g0, g0, -1)
    grid = np.einsum("ai,ijd,bj->abd", ref_bicubic_matrix(g0, gh), grid, ref_bicubic_matrix(g0, gw))
    x = np.concatenate([_np(visual.class_embedding)[None], x]) + np.concatenate([pos[:1], grid.reshape(gh * gw, -1)])
    x = ref_layer_norm(x, visual.ln_pre)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = x + ref_attention(blk, ref_layer_norm(x, blk.ln_1))
        x = x + ref_mlp(blk, ref_layer_norm(x, blk.ln_2))
    last = blocks[-1]
    _, _, v = ref_qkv(last, ref_layer_norm(x, last.ln_1))
    v = v @ _np(last.attn.out_proj.weight).T + _np(last.attn.out_proj.bias)
    if residual:
        v = v + x
        v = v + ref_mlp(last, ref_layer_norm(v, last.ln_2))
    return (ref_layer_norm(v, visual.ln_post) @ _np(visual.proj))[1:].reshape(gh, gw, -1)


@pytest.fixture(scope="module")
def randomised_maskclip(tiny_config):
    """maskclip: on a random-init tiny open_clip ViT whose LayerNorm affines and attention biases are random too
    (at their defaults, 1 / 0, normalisation and bias mistakes would not show)."""
    torch.manual_seed(0)
    model = load_baseline(f"maskclip:{tiny_config}/random")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in model.clip.visual.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.5 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, torch.nn.MultiheadAttention):
                mod.in_proj_bias.copy_(0.5 * torch.randn(mod.in_proj_bias.shape, generator=g))
                mod.out_proj.bias.copy_(0.5 * torch.randn(mod.out_proj.bias.shape, generator=g))
        model.clip.visual.positional_embedding.mul_(20)  # a resize error must show
    return model


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (64, 64), (56, 40)])  # native, non-square, 2x, both
@pytest.mark.parametrize("residual", [True, False])
def test_maskclip_matches_the_authors_code(randomised_maskclip, size, residual) -> None:
    model = randomised_maskclip
    vision = MaskClipVision(model.clip.visual, residual=residual)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
    _, patches = vision(images)
    for i in range(2):
        want = ref_maskclip(model.clip.visual, _np(images[i]), residual)
        got = _np(patches[i])
        assert got.shape == want.shape
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel < 2e-5, rel  # float32 against float64
    assert model.variant.startswith("maskclip (authors' code")


def test_the_maskclip_reference_catches_both_reported_differences(randomised_maskclip, monkeypatch) -> None:
    """The comparison above is sharp enough: the residual-free path, or timm's antialiased position-embedding
    resize (cubic coefficient -0.5), are far outside its tolerance."""
    visual = randomised_maskclip.clip.visual
    image = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(8))
    want = ref_maskclip(visual, _np(image[0]), residual=True)

    def rel(vision: MaskClipVision) -> float:
        return float(np.abs(_np(vision(image)[1][0]) - want).max() / np.abs(want).max())

    assert rel(MaskClipVision(visual, residual=True)) < 2e-5
    assert rel(MaskClipVision(visual, residual=False)) > 0.05
    monkeypatch.setattr(MaskClipVision, "pos_antialias", True)
    assert rel(MaskClipVision(visual, residual=True)) > 1e-3


def test_maskclip_position_embeddings_are_not_antialiased(randomised_maskclip) -> None:
    """MaskCLIP's resize is plain bicubic; GEM's official code antialiases (timm): on a 2x downscale they differ."""
    visual = randomised_maskclip.clip.visual
    plain = resized_pos_embed(visual, (2, 3), antialias=False)
    grid = _np(visual.positional_embedding[1:]).reshape(4, 4, -1)
    want = np.einsum("ai,ijd,bj->abd", ref_bicubic_matrix(4, 2), grid, ref_bicubic_matrix(4, 3)).reshape(6, -1)
    np.testing.assert_allclose(_np(plain[1:]), want, rtol=1e-5, atol=1e-4)
    anti = resized_pos_embed(visual, (2, 3))
    assert not torch.allclose(plain, anti, atol=1e-3)


def test_position_embeddings_resized_bicubically(gem_model) -> None:
    visual = gem_model.clip.visual
    assert resized_pos_embed(visual, (4, 4)) is visual.positional_embedding  # native grid: untouched
    big = resized_pos_embed(visual, (8, 6))
    assert big.shape == (1 + 48, visual.positional_embedding.shape[1])
    torch.testing.assert_close(big[0], visual.positional_embedding[0])  # CLS entry kept
    # reference: PIL's bicubic, channel by channel (timm/GEM resize with torch's antialiased bicubic, PIL's kernel)
    grid = _np(visual.positional_embedding[1:]).reshape(4, 4, -1).astype(np.float32)
    want = np.stack([np.asarray(Image.fromarray(grid[:, :, c]).resize((6, 8), Image.BICUBIC))
                     for c in range(grid.shape[2])], axis=-1)
    np.testing.assert_allclose(_np(big[1:]), want.reshape(48, -1), atol=1e-5)
    # a window larger than the training size runs (448 windows on a 224 model), non-square too
    cls, patches = gem_model.encode_image(torch.randn(1, 3, 64, 48))
    assert patches.shape == (1, 8, 6, TINY_CLIP["embed_dim"]) and cls.shape == (1, TINY_CLIP["embed_dim"])


def test_zero_shot_interface(gem_model) -> None:
    from simzss.models.zeroshot import get_logit_scale, get_mean_std, get_patch_size

    assert get_patch_size(gem_model) == 8
    mean, std = get_mean_std(gem_model)
    torch.testing.assert_close(mean, torch.tensor([0.48145466, 0.4578275, 0.40821073]))  # CLIP's, not ImageNet's
    assert std[0].item() == pytest.approx(0.26862954)
    assert get_logit_scale(gem_model) == pytest.approx(float(gem_model.clip.logit_scale.exp()))
    emb = gem_model.encode_texts(["a photo of a cat.", "a photo of a dog."])
    assert emb.shape == (2, TINY_CLIP["embed_dim"])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert not gem_model.training and not any(p.requires_grad for p in gem_model.parameters())
    gem_model.train()
    assert not gem_model.training


# ------------------------------------------------------------------------------------------------- specs


def test_parse_clip_source() -> None:
    assert parse_clip_source("ViT-B-16/openai") == ClipSource("ViT-B-16", tag="openai")
    assert parse_clip_source("ViT-B-16@/m/w.bin") == ClipSource("ViT-B-16", weights="/m/w.bin")
    assert parse_clip_source("/cfg/tiny.json/random").random_init
    assert parse_clip_source("hf-hub:org/repo") == ClipSource("hf-hub:org/repo")
    assert str(parse_clip_source("ViT-B-16/openai")) == "ViT-B-16/openai"
    for bad, words in [("ViT-B-16", "pretrained tag"), ("", "empty"), ("/cfg/tiny.json", "/random"),
                       ("ViT-B-16@", "NAME@WEIGHTS")]:
        with pytest.raises(ValueError, match=words):
            parse_clip_source(bad)
    assert split_spec("maskclip:ViT-B-16/openai") == ("maskclip", "ViT-B-16/openai")
    with pytest.raises(ValueError, match="not a baseline spec"):
        split_spec("clipseg:ViT-B-16/openai")


def test_baseline_spec_errors_name_the_fix(tmp_path, tiny_config) -> None:
    with pytest.raises(ValueError, match="known: .*openai"):
        load_baseline("gem:ViT-B-16/no-such-tag")  # checked before any download
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_baseline("gem:ViT-Q-99/openai")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_baseline(f"gem:ViT-B-16@{tmp_path / 'missing.bin'}")
    with pytest.raises(FileNotFoundError, match="config not found"):
        load_baseline(f"gem:{tmp_path / 'nope.json'}/random")
    with pytest.raises(ValueError, match="layers must be >= 1"):
        load_baseline(f"gem:{tiny_config}/random", gem_layers=0)
    assert is_baseline_spec("gem:ViT-B-16/openai") and is_baseline_spec("maskclip:x/y")
    assert not is_baseline_spec("exports/simzss-b14") and not is_baseline_spec("voc:/data")
    folder = tmp_path / "gem:looks-like-a-spec"
    folder.mkdir()
    assert not is_baseline_spec(folder)  # an existing path is a model folder


def test_local_weights_file_round_trip(tmp_path, gem_model, tiny_config) -> None:
    """`gem:CONFIG@FILE` loads exactly the saved weights (what `gem:ViT-B-16@/path/weights.bin` does)."""
    weights = tmp_path / "w.bin"
    torch.save(gem_model.clip.state_dict(), weights)
    loaded = load_baseline(f"gem:{tiny_config}@{weights}", gem_layers=2)
    images = torch.randn(1, 3, 40, 40)
    torch.testing.assert_close(loaded.encode_image(images)[1], gem_model.encode_image(images)[1])


# ------------------------------------------------------------------------------------ the same eval harness


@pytest.fixture(scope="module")
def toy_val(tmp_path_factory) -> Path:
    from simzss.data.synthetic import generate_toy_world

    out = tmp_path_factory.mktemp("toy")
    generate_toy_world(out, num_train=2, num_val=3, image_size=64, shard_size=2)
    return out / "val"


def test_eval_command_runs_gem_and_maskclip_on_the_toy_world(tiny_config, toy_val, tmp_path) -> None:
    from simzss.cli.eval import main as eval_main

    out = tmp_path / "compare.json"
    torch.manual_seed(0)
    code = eval_main([f"gem:{tiny_config}/random", f"maskclip:{tiny_config}/random",
                      "--task", "segmentation", "--datasets", f"folder:{toy_val}", "--short-side", "64",
                      "--crop", "48", "--stride", "16", "--workers", "0", "--no-progress", "--cpu",
                      "--out", str(out), "--report", str(tmp_path / "report"), "--report-samples", "2"])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["model"] for r in runs] == [f"gem:{tiny_config}/random", f"maskclip:{tiny_config}/random"]
    classes = (toy_val / "classes.txt").read_text().split()
    for r in runs:
        res = r["results"][f"folder:{toy_val}"]
        assert res["num_images"] == 3 and res["skipped"] == 0
        assert 0.0 <= res["mIoU"] <= 100.0 and list(res["per_class"]) == classes
        conf = np.array(res["confusion"])
        assert conf.shape == (len(classes), len(classes)) and conf.sum() > 0
        assert "samples" not in res  # pictures only, never in the JSON
        assert res["model_variant"].startswith(r["model"].split(":")[0] + " (")  # eval.json names the variant
    report = (tmp_path / "report" / "report.md").read_text()
    assert "gem:" in report and "maskclip:" in report and report.count("samples.png") == 2


def test_eval_command_bad_baseline_spec_exits_2(toy_val, capsys) -> None:
    from simzss.cli.eval import main as eval_main

    code = eval_main(["gem:ViT-B-16/no-such-tag", "--datasets", f"folder:{toy_val}", "--cpu", "--no-progress"])
    assert code == 2


def test_gem_differs_from_plain_clip_tokens(gem_model) -> None:
    """GEM's patch features are not CLIP's final patch tokens (the pathway does something)."""
    visual = gem_model.clip.visual
    images = torch.randn(1, 3, 32, 32)
    _, gem_patches = gem_model.vision(images)
    inter = visual.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
    plain = (visual.ln_post(inter["image_intermediates"][-1]) @ visual.proj).reshape(1, 4, 4, -1)
    assert not torch.allclose(gem_patches, plain, atol=1e-3)
    assert isinstance(gem_model.vision, GemVision) and gem_model.vision.layers == 2


def test_experimental_gem_over_dinov2_export(tmp_path) -> None:
    """gem-dinov2:EXPORT runs the GEM pathway over the export's frozen DINOv2 tower; the global CLS is unchanged."""
    from conftest import tiny_model_config, tiny_tokenizer
    from simzss.baselines.gem import GemDinoVision
    from simzss.io.export import save_pretrained
    from simzss.models.simzss import SimZSS

    torch.manual_seed(0)
    tok = tiny_tokenizer(tmp_path / "tok")
    plain = SimZSS.from_config(tiny_model_config(str(tmp_path / "tok")), tok)
    with torch.no_grad():  # DINOv2's layer scale starts at 1e-5: make the attention branch matter, as when trained
        for blk in plain.vision.model.blocks:
            blk.ls1.gamma.fill_(1.0)
    export = save_pretrained(plain, tmp_path / "export")
    model = load_baseline(f"gem-dinov2:{export}", gem_layers=1)
    assert isinstance(model.vision, GemDinoVision) and "EXPERIMENTAL" in repr(model.vision)
    images = torch.randn(2, 3, 56, 42)
    cls, patches = model.encode_image(images)
    ref_cls, ref_patches = plain.eval().encode_image(images)
    assert patches.shape == ref_patches.shape == (2, 4, 3, plain.vision.embed_dim)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(patches, ref_patches, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="not a SimZSS export"):
        load_baseline(f"gem-dinov2:{tmp_path / 'tok'}")


@pytest.mark.parametrize("kind", ["gem", "maskclip"])
def test_segment_command_on_a_real_photo(tiny_config, tmp_path, kind: str) -> None:
    """`simzss segment` with a baseline on a real photograph (the one matplotlib ships), at the standard 448 / 224
    protocol: the overlay and the label map come back at the photo's size with a legend below."""
    import matplotlib.cbook
    from PIL import Image

    from simzss.cli.segment import main as segment_main

    photo = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    width, height = Image.open(photo).size
    rc = segment_main([str(photo), "--model", f"{kind}:{tiny_config}/random", "--labels", "person,flag,uniform",
                         "--out", str(tmp_path / "overlay.png"), "--out-mask", str(tmp_path / "mask.png"),
                         "--device", "cpu"])
    assert rc == 0
    mask = Image.open(tmp_path / "mask.png")
    assert mask.size == (width, height) and max(mask.getdata()) <= 2
    overlay = Image.open(tmp_path / "overlay.png")
    assert overlay.width >= width and overlay.height > height  # legend below the picture
