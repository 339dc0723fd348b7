"""Training decode paths (simzss.data.decode, simzss.data.device): crop boxes, EXIF orientation, the torchvision CPU
path against PIL, the GPU split (run on the CPU here), normalisation on the device, and Batch.cat against tokenising
a whole batch."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from simzss.data.batch import Batch, EncodedImages
from simzss.data.decode import crop_box, decode_crop, orient, plan_crop, resized_crop
from simzss.data.device import decode_on_device, to_device
from simzss.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CROP_RATIO,
    decode_image,
    load_image,
    train_crop,
    train_transform,
)


def _photo(width: int, height: int, seed: int = 0, detail: int = 16) -> np.ndarray:
    """A smooth, photo-like RGB array (resampling filters agree closely on it, unlike on white noise); one random
    colour per ``detail`` pixels, interpolated."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // detail + 2, width // detail + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def _jpeg(array: np.ndarray, orientation: int = 1, quality: int = 95) -> bytes:
    img = Image.fromarray(array)
    buf = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, format="JPEG", quality=quality, exif=exif)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_crop_box_draws_what_random_resized_crop_draws():
    for seed in range(20):
        torch.manual_seed(seed)
        expected = v2.RandomResizedCrop(16, scale=(0.3, 1.0), ratio=CROP_RATIO).make_params(
            [torch.zeros(3, 123, 217, dtype=torch.uint8)])
        torch.manual_seed(seed)
        assert crop_box(123, 217, (0.3, 1.0)) == tuple(expected[k] for k in ("top", "left", "height", "width"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil_exif_transpose(orientation):
    array = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    expected = TF.pil_to_tensor(ImageOps.exif_transpose(img))
    got = orient(torch.from_numpy(array).permute(2, 0, 1), orientation)
    assert torch.equal(got, expected)


def test_training_decode_applies_exif_orientation():
    """One rule everywhere: the training decode (cpu, pil and gpu paths) applies EXIF orientation, like load_image."""
    array = np.zeros((48, 64, 3), dtype=np.uint8)
    array[:, 32:] = 255  # right half white; orientation 6 shows it rotated 90 degrees clockwise: white at the bottom
    data = _jpeg(array, orientation=6)
    torch.manual_seed(0)
    crop = decode_crop(data, 32, crop_scale=(1.0, 1.0)).float()
    assert crop[:, 20:].mean() > 200 and crop[:, :12].mean() < 50
    assert decode_image(data).size == (48, 64)  # pil path: portrait after orientation
    torch.manual_seed(0)
    payload, box = plan_crop(data, 32, crop_scale=(1.0, 1.0))
    assert int(box[4]) == 6 and tuple(box[:4].tolist()) == (0, 0, 64, 48)  # box in the oriented image
    on_device = decode_on_device(EncodedImages([payload], box[None], 32, "bicubic"), torch.device("cpu"))[0]
    assert (on_device.float() - crop).abs().mean() < 2.0


def test_cpu_path_matches_the_pil_path_within_interpolation_tolerance(tmp_path):
    """Same seed: the same crop box, and pixels within a few levels of PIL's decode + RandomResizedCrop."""
    array = _photo(320, 240)
    data = _jpeg(array)
    for seed in range(4):  # 120 px crops of < 240 px boxes: full-size decoding, as PIL
        torch.manual_seed(seed)
        fast = decode_crop(data, 120, crop_scale=(0.5, 1.0), interpolation="bicubic")
        torch.manual_seed(seed)
        reference = train_crop(120, (0.5, 1.0), "bicubic")(decode_image(data))  # full-size PIL decode + crop
        assert fast.dtype == torch.uint8 and fast.shape == (3, 120, 120)
        diff = (fast.float() - reference.float()).abs()
        assert diff.mean() < 1.0 and diff.max() < 20, (seed, diff.mean(), diff.max())
    # reduced-size (DCT-scaled, here 1/4) decoding kicks in when the crop allows it, and stays close (on detail
    # coarse enough for a 32 px crop of the whole picture)
    data = _jpeg(_photo(320, 240, detail=48))
    for seed in range(4):
        torch.manual_seed(seed)
        small = decode_crop(data, 32, crop_scale=(0.9, 1.0))
        torch.manual_seed(seed)
        reference = train_crop(32, (0.9, 1.0), "bicubic")(decode_image(data))
        assert (small.float() - reference.float()).abs().mean() < 4.0
    # PNG (no JPEG path): PIL decode, same box and crop op
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    torch.manual_seed(1)
    png = decode_crop(buf.getvalue(), 64, crop_scale=(0.5, 1.0))
    torch.manual_seed(1)
    box = crop_box(240, 320, (0.5, 1.0))
    assert torch.equal(png, resized_crop(torch.from_numpy(array).permute(2, 0, 1), box, 64, "bicubic"))


def test_gpu_split_uses_the_cpu_paths_boxes_and_pixels():
    """data.decode=gpu: the worker's box is the CPU path's box for the same seed, and the device op (run on the CPU
    here) gives the CPU path's crop within interpolation tolerance."""
    array = _photo(200, 150, seed=3, detail=48)  # the CPU path may decode at 1/2 here, the device at full size
    data = _jpeg(array)
    payloads, boxes, expected = [], [], []
    for seed in range(3):
        torch.manual_seed(seed)
        payload, box = plan_crop(data, 48, crop_scale=(0.4, 1.0))
        torch.manual_seed(seed)
        assert tuple(box[:4].tolist()) == crop_box(150, 200, (0.4, 1.0)) and int(box[4]) == 1
        torch.manual_seed(seed)
        expected.append(decode_crop(data, 48, crop_scale=(0.4, 1.0)))
        payloads.append(payload)
        boxes.append(box)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")  # not a JPEG: cropped by the worker, passed through
    torch.manual_seed(7)
    png_payload, png_box = plan_crop(buf.getvalue(), 48, crop_scale=(0.4, 1.0))
    assert png_payload.shape == (3, 48, 48) and not png_box.any()
    encoded = EncodedImages(payloads + [png_payload], torch.stack(boxes + [png_box]), 48, "bicubic")
    images = decode_on_device(encoded, torch.device("cpu"))
    assert images.shape == (4, 3, 48, 48) and images.dtype == torch.uint8
    for got, want in zip(images, expected):
        assert (got.float() - want.float()).abs().mean() < 3.0
    assert torch.equal(images[3], png_payload)
    with pytest.raises(OSError, match="truncated"):
        plan_crop(data[: len(data) // 2], 48)


def _batch(images: torch.Tensor | None, n: int, encoded: EncodedImages | None = None) -> Batch:
    return Batch(images=images, input_ids=torch.ones(n, 3, dtype=torch.long),
                 attention_mask=torch.ones(n, 3, dtype=torch.long), concept_mask=torch.zeros(n, 0, 3, dtype=torch.bool),
                 concept_labels=torch.zeros(n, 0, dtype=torch.long), captions=["c"] * n, keys=[str(i) for i in range(n)],
                 encoded=encoded)


def test_to_device_normalises_uint8_like_the_float_transform():
    """uint8 crop + to_device == the former float pipeline (train_transform) for the same seed (up to float
    rounding: x / 255 here, x * (1 / 255) there)."""
    img = Image.fromarray(_photo(90, 70))
    torch.manual_seed(5)
    expected = train_transform(32, (0.5, 1.0), "bicubic")(img)
    torch.manual_seed(5)
    crop = train_crop(32, (0.5, 1.0), "bicubic")(img)
    out = to_device(_batch(crop[None], 1), "cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert out.images.dtype == torch.float32
    torch.testing.assert_close(out.images[0], expected)
    floats = _batch(expected[None], 1)
    assert torch.equal(to_device(floats, "cpu", mean=(0, 0, 0), std=(1, 1, 1)).images, floats.images)  # untouched
    moved = floats.to("cpu")
    assert moved.keys == floats.keys and torch.equal(moved.images, floats.images)


def test_batch_cat_equals_tokenising_the_whole_batch(tmp_path):
    """Pieces tokenised separately and joined (with rows cut out of them) equal tokenize_batch over all captions."""
    from simzss.data.tokenize import tokenize_batch, train_bpe_tokenizer

    captions = ["a dog", "a cat under a big green tree near the house", "a car", "two dogs and a cat", "sky"]
    concepts = [[(0, [(2, 5)])], [(1, [(2, 5)]), (4, [(30, 34)])], [], [(0, [(4, 8)]), (1, [(15, 18)])], []]
    tokenizer = train_bpe_tokenizer(captions * 10, tmp_path / "tok", vocab_size=300)
    whole = tokenize_batch(tokenizer, captions, concepts, 16)

    def piece(lo: int, hi: int) -> Batch:
        t = tokenize_batch(tokenizer, captions[lo:hi], concepts[lo:hi], 16)
        return Batch(images=torch.full((hi - lo, 3, 2, 2), lo, dtype=torch.uint8), captions=captions[lo:hi],
                     keys=[str(i) for i in range(lo, hi)], skipped={"x": lo + 1}, **t)

    big = piece(0, 4)  # row 1 (the long caption, two concepts) is cut off below
    joined = Batch.cat([big.rows(2, 4), piece(4, 5)], pad_id=tokenizer.pad_token_id)
    expected = tokenize_batch(tokenizer, captions[2:5], concepts[2:5], 16)
    for name, value in expected.items():
        assert torch.equal(getattr(joined, name), value), name
    full = Batch.cat([piece(0, 2), piece(2, 5)], pad_id=tokenizer.pad_token_id)
    for name, value in whole.items():
        assert torch.equal(getattr(full, name), value), name
    assert full.keys == [str(i) for i in range(5)] and full.skipped == {"x": 1 + 3}
    assert full.images[:, 0, 0, 0].tolist() == [0, 0, 2, 2, 2]
