"""`simzss serve`: the page's segmentation on a SimZSS export and a baseline, and the real page driven in headless
Chromium (upload a generated picture, type class names, check the returned overlay pixel by pixel)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model_config, tiny_tokenizer
from simzss.cli.serve import SlideSettings, main as serve_main, segment_for_page
from simzss.inference import label_colors

TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SLIDE = SlideSettings(short_side=64, crop=64, stride=32)
LABELS = ["sky", "grass", "water"]


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "tiny_serve_clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="module")
def picture_path(tmp_path_factory) -> Path:
    """A 72 x 96 picture: sky band, grass band, water band, with noise."""
    a = np.zeros((72, 96, 3), np.uint8)
    a[:24] = (110, 160, 230)
    a[24:48] = (70, 150, 55)
    a[48:] = (40, 95, 175)
    a = np.clip(a.astype(int) + np.random.default_rng(0).integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("pic") / "bands.png"
    Image.fromarray(a).save(path)
    return path


def _check_overlay(overlay: Image.Image, picture: Image.Image, n_labels: int, alpha: float = 0.5) -> None:
    """The overlay is the picture blended with one label colour per pixel, plus a legend below it."""
    assert overlay.width == picture.width and overlay.height > picture.height  # legend added below
    top = np.asarray(overlay.convert("RGB"), dtype=np.float64)[: picture.height]
    base = np.asarray(picture.convert("RGB"), dtype=np.float64)
    tint = (top - (1 - alpha) * base) / alpha  # the label colour each pixel was blended with
    colors = label_colors(n_labels).astype(np.float64)
    err = np.abs(tint[:, :, None, :] - colors[None, None]).max(axis=-1).min(axis=-1)
    assert err.max() <= 2.5 / alpha, err.max()  # every pixel: one of the legend's colours (8-bit rounding)


def test_page_segments_with_a_simzss_export_and_a_baseline(tmp_path, clip_config, picture_path) -> None:
    from simzss.baselines import load_baseline
    from simzss.io.export import save_pretrained
    from simzss.io.load import load_model
    from simzss.models.simzss import SimZSS

    torch.manual_seed(0)
    tok = tiny_tokenizer(tmp_path / "tok", ["a photo of a sky", "green grass", "blue water", "a dog"])
    export = save_pretrained(SimZSS.from_config(tiny_model_config(str(tmp_path / "tok")), tok), tmp_path / "export")
    picture = Image.open(picture_path).convert("RGB")
    slide = SlideSettings(short_side=56, crop=56, stride=28)
    for model in (load_model(export), load_baseline(f"gem:{clip_config}/random")):
        overlay, rows = segment_for_page(model, picture, "sky, grass, water", "single", 0.0, 0.5, slide)
        _check_overlay(overlay, picture, 3)
        assert sorted(r[0] for r in rows) == sorted(LABELS)
        assert sum(r[1] for r in rows) == pytest.approx(100, abs=0.05)
        assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
        # a background threshold above every probability makes every pixel background
        overlay, rows = segment_for_page(model, picture, "sky, grass, water", "tcl9", 0.99, 0.5, slide)
        assert rows[0] == ["background", 100.0] and len(rows) == 4
        _check_overlay(overlay, picture, 4)
    for args, message in [((None, "sky"), "drop an image"), ((picture, " , "), "no labels"),
                          ((picture, "sky, sky"), "duplicate"), ((picture, "background, sky", 0.5), "added by")]:
        with pytest.raises(ValueError, match=message):
            segment_for_page(model, args[0], args[1], "single", args[2] if len(args) > 2 else 0.0, 0.5, slide)


def test_serve_command_bad_input(capsys) -> None:
    assert serve_main(["exports/nothing-here", "--port", "7861"]) == 2
    assert "exports/nothing-here" in capsys.readouterr().err
    assert serve_main(["gem:ViT-B-16/openai", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
    assert serve_main(["exports/nothing-here", "--max-pixels", "-1"]) == 2
    with pytest.raises(SystemExit) as e:  # argparse: an unknown device is a usage error too
        serve_main(["exports/nothing-here", "--device", "tpu"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------ headless browser


def _chromium() -> str | None:
    for name in (os.environ.get("SIMZSS_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_page(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"simzss serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def test_page_in_headless_chromium(tmp_path, clip_config, picture_path) -> None:
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium found: install Debian's `chromium` (apt-get install -y chromium) to run this test")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (driver only; the "
                                     "browser is the system chromium)")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "simzss", "serve", f"gem:{clip_config}/random", "--port", str(port),
         "--short-side", str(SLIDE.short_side), "--crop", str(SLIDE.crop), "--stride", str(SLIDE.stride),
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        _wait_for_page(url, proc)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#image-in input[type=file]", state="attached", timeout=60_000)
            page.set_input_files("#image-in input[type=file]", str(picture_path))
            page.fill("#labels textarea", ", ".join(LABELS))
            page.wait_for_selector("#image-in img", timeout=30_000)  # upload finished
            page.click("#run")
            page.wait_for_selector("#overlay img", timeout=90_000)
            page.wait_for_function("document.querySelector('#areas').innerText.includes('water')", timeout=30_000)
            src = page.get_attribute("#overlay img", "src")
            data = page.request.get(src if src.startswith("http") else url.rstrip("/") + src).body()
            areas = page.inner_text("#areas")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    overlay = Image.open(io.BytesIO(data))
    assert overlay.format == "PNG"  # lossless, so the colours can be checked exactly
    _check_overlay(overlay, Image.open(picture_path), len(LABELS))
    for name in LABELS:
        assert name in areas
    shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB"))
    assert shot.shape[1] >= 1280 and shot.std() > 10


def test_uploads_go_through_the_pixel_cap(tmp_path: Path) -> None:
    """Uploads are decoded like every other input: a PNG over the cap (serve's --max-pixels, as segment's) is
    refused with a message for the page, an ordinary picture comes back as RGB."""
    from simzss.cli.serve import build_parser, open_upload

    Image.new("L", (64, 48), 128).save(tmp_path / "small.png")
    assert open_upload(str(tmp_path / "small.png")).mode == "RGB"
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(big)
    assert open_upload(str(big)).size == (3000, 2000)  # 6 Mpx: under the default cap
    max_pixels = build_parser().parse_args(["m", "--max-pixels", "1000000"]).max_pixels
    with pytest.raises(ValueError, match="above the decode limit"):
        open_upload(str(big), max_pixels)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read the uploaded image"):
        open_upload(str(tmp_path / "junk.png"))
