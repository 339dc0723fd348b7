"""`simzss segment`, segment_pil and render_overlay on a tiny random-init exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model_config, tiny_tokenizer
from simzss import inference as inf
from simzss.cli.segment import main as segment_main
from simzss.config import TrainConfig, to_yaml
from simzss.data.transforms import image_to_tensor
from simzss.models.zeroshot import get_mean_std

LABELS = ["cat", "grass", "sky"]
SLIDE = ["--short-side", "56", "--crop", "56", "--stride", "28", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An export of a random-init SimZSS (DINOv2-small layout, 2 blocks; text 2 x 64)."""
    from simzss.io import save_pretrained
    from simzss.models.simzss import SimZSS

    torch.manual_seed(0)
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("seg")
    tok = tiny_tokenizer(work / "tok", ["a photo of a cat", "green grass", "blue sky", "a dog"])
    model = SimZSS.from_config(tiny_model_config(str(work / "tok")), tok)
    # A sharp logit scale so the random model's argmax varies across the picture (more than one colour).
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    return save_pretrained(model, work / "export")


@pytest.fixture()
def picture(tmp_path) -> Path:
    """A 70 x 90 picture with three coloured regions."""
    a = np.zeros((70, 90, 3), np.uint8)
    a[:30] = (60, 120, 230)
    a[30:, :45] = (40, 170, 40)
    a[30:, 45:] = (200, 150, 90)
    a += np.random.default_rng(0).integers(0, 30, a.shape, dtype=np.uint8)
    path = tmp_path / "in.jpg"
    Image.fromarray(a).save(path)
    return path


def test_segment_command_writes_overlay_and_mask(model_dir, picture, tmp_path, capsys) -> None:
    out, mask = tmp_path / "o" / "overlay.png", tmp_path / "mask.png"
    rc = segment_main([str(picture), "--model", str(model_dir), "--labels", " cat, grass ,sky ", "--out", str(out), "--out-mask", str(mask), *SLIDE])
    assert rc == 0, capsys.readouterr().err
    assert "cat" in capsys.readouterr().out
    overlay = Image.open(out)
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert overlay.width == 90 and overlay.height > 70  # same width, legend below
    pixels = np.asarray(overlay)
    assert len(np.unique(pixels[:70].reshape(-1, 3), axis=0)) > 50  # the tinted photo, not a flat fill
    legend = pixels[70:].reshape(-1, 3)
    palette = inf.label_colors(3)
    for c in palette:  # every label's swatch is drawn in the legend
        assert (legend == c).all(1).any(), c
    m = np.asarray(Image.open(mask))
    assert m.dtype == np.uint8 and m.shape == (70, 90)
    assert m.max() < len(LABELS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_overlay_matches_the_label_map(model_dir, picture) -> None:
    from simzss.io import load_pretrained

    model = load_pretrained(model_dir)
    image = Image.open(picture).convert("RGB")
    label_map, scores = inf.segment_pil(model, image, LABELS, short_side=56, crop=56, stride=28)
    assert label_map.shape == (70, 90) and scores.shape == (3, 70, 90)
    assert (label_map == scores.argmax(0).numpy()).all()
    torch.testing.assert_close(scores.sum(0), torch.ones(70, 90))
    opaque = np.asarray(inf.render_overlay(image, label_map, LABELS, alpha=1.0))[:70]
    assert (opaque == inf.label_colors(3)[label_map]).all()  # alpha 1: exactly the label colours
    clear = np.asarray(inf.render_overlay(image, label_map, LABELS, alpha=0.0))[:70]
    assert (clear == np.asarray(image)).all()

    # background threshold: a leading background channel, label i at index i + 1
    bg_map, bg_scores = inf.segment_pil(model, image, LABELS, short_side=56, crop=56, stride=28, background="threshold", bg_threshold=0.99)
    assert bg_scores.shape == (4, 70, 90) and bg_map.max() <= 3


def test_segment_from_a_training_checkpoint(model_dir, picture, tmp_path) -> None:
    """--model also takes a trainer checkpoint (model.safetensors + config.yaml + tokenizer/ + trainer_state.json)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from simzss.io import load_pretrained, read_export_config

    meta = read_export_config(model_dir)
    model = load_pretrained(model_dir)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000000005"
    ckpt.mkdir(parents=True)
    state = load_file(str(model_dir / "model.safetensors"))
    save_file(state, str(ckpt / "model.safetensors"))  # random-init vision is kept under vision., as the trainer does
    (ckpt / "config.yaml").write_text(to_yaml(TrainConfig(model=model.config)))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 5}))
    shutil.copytree(model_dir / meta["tokenizer_dir"], ckpt / "tokenizer")

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert segment_main([str(picture), "--model", str(tmp_path / "run"), "--labels", "cat,grass,sky", "--out-mask", str(a), "--out", str(tmp_path / "o.jpg"), *SLIDE]) == 0
    assert segment_main([str(picture), "--model", str(model_dir), "--labels", "cat,grass,sky", "--out-mask", str(b), "--out", str(tmp_path / "o2.png"), *SLIDE]) == 0
    assert (np.asarray(Image.open(a)) == np.asarray(Image.open(b))).all()
    assert Image.open(tmp_path / "o.jpg").format == "JPEG"


@pytest.mark.parametrize(
    "argv_fn, message",
    [
        (lambda d, pic, t: [str(t / "missing.jpg"), "--model", str(d), "--labels", "cat"], "no such image file"),
        (lambda d, pic, t: [str(t / "bad.png"), "--model", str(d), "--labels", "cat"], "cannot read the image"),
        (lambda d, pic, t: [str(pic), "--model", str(d), "--labels", " , ,"], "no labels given"),
        (lambda d, pic, t: [str(pic), "--model", str(d), "--labels", "cat,cat"], "duplicate labels: cat"),
        (lambda d, pic, t: [str(pic), "--model", str(d), "--labels", "cat", "--out-mask", str(t / "m.jpg")], "must be a .png"),
        (lambda d, pic, t: [str(pic), "--model", str(t / "nope"), "--labels", "cat"], "no such checkpoint"),
        (lambda d, pic, t: [str(pic), "--model", str(d), "--labels", "cat", "--templates", "nonesuch"], "unknown template set"),
    ],
)
def test_segment_command_clear_errors(model_dir, picture, tmp_path, capsys, argv_fn, message) -> None:
    """Usage errors (a bad option, a missing or unreadable input named by the user): one line, exit code 2."""
    (tmp_path / "bad.png").write_text("not a picture")
    out = tmp_path / "out.png"
    assert segment_main([*argv_fn(model_dir, picture, tmp_path), "--out", str(out), *SLIDE]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_segment_command_failed_write_is_exit_1(model_dir, picture, tmp_path, capsys, monkeypatch) -> None:
    """A run that fails while writing (a full disk) is exit code 1 with one line; an unwritable --out is caught
    before the model is loaded, also exit code 1."""
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o.png"))

    monkeypatch.setattr(inf, "save_picture", full_disk)
    assert segment_main([str(picture), "--model", str(model_dir), "--labels", "cat", "--out", str(tmp_path / "o.png"), *SLIDE]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    (tmp_path / "file").write_text("x")
    assert segment_main([str(picture), "--model", str(model_dir), "--labels", "cat", "--out", str(tmp_path / "file" / "o.png"), *SLIDE]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err  # exit 1 as in eval, train, export (convention)


def test_render_overlay_checks_and_legend_layout() -> None:
    image = Image.new("RGB", (40, 30), (128, 128, 128))
    lm = np.zeros((30, 40), np.uint8)
    lm[:, 20:] = 1
    names = ["a very long label name that cannot fit in forty pixels", "b"]
    out = inf.render_overlay(image, lm, names)
    assert out.size[0] == 40 and out.size[1] > 30
    with pytest.raises(ValueError, match="does not match the image size"):
        inf.render_overlay(image, lm[:, :10], names)
    with pytest.raises(ValueError, match="only 1 labels"):
        inf.render_overlay(image, lm, ["a"])
    with pytest.raises(ValueError, match="alpha"):
        inf.render_overlay(image, lm, names, alpha=2)
    # many labels wrap onto several legend rows; colours stay distinct
    many = [f"class {i}" for i in range(40)]
    tall = inf.render_overlay(Image.new("RGB", (200, 50)), np.zeros((50, 200), np.uint8), many)
    assert tall.height > 50 + 3 * 12
    assert len({tuple(c) for c in inf.label_colors(300)}) == 300


def test_parse_labels() -> None:
    assert inf.parse_labels("cat, grass ,, sky") == LABELS
    with pytest.raises(ValueError):
        inf.parse_labels(",".join(f"c{i}" for i in range(300)))


def test_model_segment_accepts_pil_uint8_and_normalised_input(model_dir, picture) -> None:
    from simzss import SimZSS

    model = SimZSS.from_pretrained(str(model_dir), device="cpu")
    image = Image.open(picture).convert("RGB")
    slide = dict(short_side=56, crop=56, stride=28)
    from_pil, probs = model.segment(image, LABELS, **slide)
    uint8 = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    from_uint8, _ = model.segment(uint8, LABELS, **slide)
    from_float, _ = model.segment(image_to_tensor(image, *get_mean_std(model)), LABELS, **slide)
    assert from_pil.shape == (70, 90) and probs.shape == (3, 70, 90)
    assert torch.equal(from_pil, from_float)
    assert (from_pil == from_uint8).float().mean() > 0.99  # same pixels up to float rounding of the normalisation
    with pytest.raises(ValueError, match="one RGB image"):
        model.segment(torch.zeros(2, 3, 56, 56), LABELS, **slide)
