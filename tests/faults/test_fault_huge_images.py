"""Huge images stay cheap: reduced-size JPEG decoding, a pixel cap for every input, clear refusals."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from fault_helpers import NO_CONCEPTS, jpeg_bytes
from simzss.concepts import ConceptBank
from simzss.config import DataConfig
from simzss.data.shards import write_shard, write_sizes
from simzss.data.stream import build_train_loader
from simzss.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, decode_image, load_image


def _encoded(size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 140, 200)).save(buf, fmt)
    return buf.getvalue()


def test_decode_cap_reduces_jpeg_and_refuses_png() -> None:
    big_jpeg, big_png = _encoded((3000, 2000), "JPEG"), _encoded((3000, 2000), "PNG")
    assert decode_image(big_jpeg, max_pixels=1_000_000).size == (750, 500)  # 1/4 scale: the first that fits
    assert decode_image(big_jpeg).size == (3000, 2000)  # under the default cap: untouched
    with pytest.raises(ImageTooLargeError, match=r"3000x2000 .* above the decode limit of 1 Mpx"):
        decode_image(big_png, max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError):  # even 1/8 of the JPEG does not fit
        decode_image(big_jpeg, max_pixels=50_000)


def test_training_stream_skips_images_over_the_cap(tmp_path: Path) -> None:
    from conftest import tiny_tokenizer

    small = jpeg_bytes()
    samples = [{"__key__": f"k{i}", "jpg": small, "txt": "a cat", "concepts.json": NO_CONCEPTS} for i in range(4)]
    samples.insert(1, {"__key__": "bigpng", "png": _encoded((2000, 2000), "PNG"), "txt": "a cat", "concepts.json": NO_CONCEPTS})
    samples.insert(3, {"__key__": "bigjpg", "jpg": _encoded((2000, 2000), "JPEG"), "txt": "a cat", "concepts.json": NO_CONCEPTS})
    write_shard(tmp_path / "s.tar", samples)
    write_sizes(tmp_path, {"s.tar": 6})
    cfg = DataConfig(shards=[str(tmp_path / "s.tar")], image_size=16, workers=0, shuffle_buffer=0,
                     max_image_pixels=1_000_000)
    loader = build_train_loader(cfg, tiny_tokenizer(tmp_path / "tok"), ConceptBank.from_names(["cat"]),
                                batch_size=5, context_length=16)
    (batch,) = list(loader)  # 6 samples, batch 5: positions k0, bigpng, k1, bigjpg, k2 (k3: the partial batch)
    # bigpng's place is taken by the next epoch's first sample (k0 again: one shard, no shuffling)
    assert batch.keys == ["k0", "k1", "bigjpg", "k2", "k0"]  # the JPEG was decoded at reduced size
    # skips are counted per chunk of work touched: the next epoch's first chunk holds bigpng too
    assert batch.skipped == {"image_too_large": 2} and batch.images.shape == (5, 3, 16, 16)


def test_load_image_and_eval_reader_respect_the_cap(tmp_path: Path) -> None:
    from simzss.eval.datasets import read_image

    big = tmp_path / "big.png"
    Image.new("1", (7000, 7000)).save(big)  # 49 Mpx, over the 40 Mpx default; 1-bit keeps the test's memory small
    assert 7000 * 7000 > DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError, match="big.png"):
        load_image(big)
    with pytest.raises(ImageTooLargeError, match="big.png"):
        read_image(big)
    jpg = tmp_path / "photo.jpg"
    jpg.write_bytes(_encoded((2400, 1600), "JPEG"))
    assert load_image(jpg, max_pixels=1_000_000).size == (1200, 800)  # 1/2 scale fits


def test_segment_refuses_huge_images_and_missing_cuda_in_one_line(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from simzss.cli.segment import main

    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 13000)).save(bomb)  # 182 Mpx: over Pillow's decompression-bomb limit (179 Mpx)
    base = ["--model", str(tmp_path / "no-model"), "--labels", "cat,sky", "--out", str(tmp_path / "o.png")]
    for image, extra in ((bomb, []), (bomb, ["--max-pixels", "0"]), (tmp_path / "big.png", ["--max-pixels", "1000000"])):
        if image.name == "big.png":
            image.write_bytes(_encoded((1500, 1000), "PNG"))
        assert main([str(image), *base, *extra]) == 2  # a bad input named by the user: a usage error
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and image.name in err and "Traceback" not in err, err
    if not torch.cuda.is_available():
        small = tmp_path / "small.png"
        small.write_bytes(_encoded((32, 32), "PNG"))
        assert main([str(small), *base, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "CUDA is not available" in err and "--device cpu" in err
