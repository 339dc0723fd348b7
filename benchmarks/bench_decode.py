"""Decode(+crop) cost and bytes per image, before and after pre-resizing (``simzss shards --resize-short``).

Makes the photo-like 640x480 JPEGs of ``bench_e2e.py`` (``photo_shards.photo_jpeg``, about 100 KB at quality 90),
resizes each with :func:`simzss.data.convert.resize.resize_image` (short side 288 by default, JPEG quality 95), and
times, on one core, what a training worker does per image:

- ``train_decode_crop``: :func:`simzss.data.decode.decode_crop`, the default ``data.decode=cpu`` path
  (torchvision decode, DCT-scaled when the crop allows, bicubic crop on the uint8 tensor), and its parts:
  ``train_decode`` (the decode alone) and ``train_crop`` (the crop of already decoded pixels);
- ``simd_decode_crop``: the same box and DCT-scaled decode, resampled by Pillow in one ``resize(box=...)`` call:
  the candidate path for pillow-simd (issue 16 asked whether it measures better; run this benchmark in an
  environment where pillow-simd replaces Pillow to see; the answer is in ``benchmarks/RESULTS.md``);
- ``decode`` and ``decode_crop``: the former PIL path (``data.decode=pil``): :func:`simzss.data.transforms.decode_image`
  with the draft-mode floor of a 224 px crop at scale 0.9, then a bicubic ``RandomResizedCrop``.

Prints one JSON object: KB per image, CPU ms per image before / after resizing, and the ratios. CPU time
(``process_time``) is used so the ratios hold on a shared machine; absolute times depend on the CPU.

  python benchmarks/bench_decode.py --images 64 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import PIL
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info  # noqa: E402
from photo_shards import photo_jpeg  # noqa: E402

from simzss.data.convert.resize import ResizeOptions, resize_image  # noqa: E402
from simzss.data.decode import crop_box, decode_crop, exif_orientation, oriented_size, resized_crop  # noqa: E402
from simzss.data.transforms import decode_image, decode_min_size  # noqa: E402


def pillow_decode_crop(data: bytes, image_size: int) -> torch.Tensor:
    """decode_crop's box and DCT-scaled decode, resampled by Pillow in one call (the pillow-simd candidate)."""
    header = Image.open(io.BytesIO(data))
    width, height = header.size
    orientation = exif_orientation(header)
    top, left, h, w = crop_box(*reversed(oriented_size(width, height, orientation)), (0.9, 1.0))
    scale = next((s for s in (8, 4, 2) if min(h, w) // s >= image_size), 1)
    img = Image.open(io.BytesIO(data))
    if scale > 1:
        img.draft("RGB", (width // scale, height // scale))
    img = ImageOps.exif_transpose(img.convert("RGB"))
    factor = round(max(width, height) / max(img.size))
    box = (left / factor, top / factor, min(img.width, (left + w) / factor), min(img.height, (top + h) / factor))
    return TF.pil_to_tensor(img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box))


def cpu_ms_per_image(images: List[bytes], work: Callable[[bytes], object], repeats: int) -> float:
    """Median over ``repeats`` passes of the CPU milliseconds per image of ``work``."""
    per_pass = []
    for _ in range(repeats):
        c0 = time.process_time()
        for data in images:
            work(data)
        per_pass.append((time.process_time() - c0) * 1000 / len(images))
    return statistics.median(per_pass)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64, help="distinct photo-like JPEGs")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    ap.add_argument("--short-side", type=int, default=288, help="--resize-short of the resized copies")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality of the resized copies")
    ap.add_argument("--image-size", type=int, default=224, help="training crop size")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one data worker = one core
    originals = [photo_jpeg(seed) for seed in range(args.images)]
    options = ResizeOptions(args.short_side, args.quality)
    t0 = time.process_time()
    resized = [resize_image(data, options) or data for data in originals]
    resize_ms = (time.process_time() - t0) * 1000 / len(originals)

    min_size = decode_min_size(args.image_size, (0.9, 1.0))
    crop = v2.RandomResizedCrop(args.image_size, scale=(0.9, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                antialias=True)
    torch.manual_seed(0)

    def decode(data: bytes) -> object:
        return decode_image(data, min_size=min_size)

    def decode_and_crop(data: bytes) -> object:
        return crop(decode_image(data, min_size=min_size))

    sizes: Dict[str, float] = {
        "kb_before": round(statistics.mean(len(d) for d in originals) / 1024, 1),
        "kb_after": round(statistics.mean(len(d) for d in resized) / 1024, 1),
    }
    def train_decode_crop(data: bytes) -> object:
        return decode_crop(data, args.image_size, (0.9, 1.0), "bicubic")

    def simd_decode_crop(data: bytes) -> object:
        return pillow_decode_crop(data, args.image_size)

    def train_decode(data: bytes) -> object:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    decoded = {data: train_decode(data) for data in originals + resized}

    def train_crop(data: bytes) -> object:
        pixels = decoded[data]
        return resized_crop(pixels, crop_box(pixels.shape[1], pixels.shape[2], (0.9, 1.0)), args.image_size, "bicubic")

    cost = {}
    for name, work in (("train_decode_crop", train_decode_crop), ("simd_decode_crop", simd_decode_crop),
                       ("train_decode", train_decode),
                       ("train_crop", train_crop), ("decode", decode), ("decode_crop", decode_and_crop)):
        before = cpu_ms_per_image(originals, work, args.repeats)
        after = cpu_ms_per_image(resized, work, args.repeats)
        cost[name] = {"ms_before": round(before, 3), "ms_after": round(after, 3), "ratio": round(before / after, 2)}
    with Image.open(io.BytesIO(resized[0])) as im:
        after_size = im.size
    print(json.dumps({
        "benchmark": "bench_decode",
        "images": args.images,
        "image_before": [640, 480],
        "image_after": list(after_size),
        "short_side": args.short_side,
        "jpeg_quality": args.quality,
        "draft_floor_short_side": min_size,
        **sizes,
        "bytes_ratio": round(sizes["kb_before"] / sizes["kb_after"], 2),
        "cpu_ms_per_image": cost,
        # one core's images/s for the default path against the former PIL path (same images, same run)
        "train_vs_pil_decode_crop": round(cost["decode_crop"]["ms_before"] / cost["train_decode_crop"]["ms_before"], 2),
        # the Pillow one-call path against the default, one core, same images and run (pillow-simd: see "pillow")
        "simd_vs_train_decode_crop": round(cost["train_decode_crop"]["ms_before"] / cost["simd_decode_crop"]["ms_before"], 2),
        "pillow": {"version": PIL.__version__, "pillow_simd": "post" in PIL.__version__},
        "resize_cost_ms_per_image_once": round(resize_ms, 2),
        "machine": machine_info(torch.device("cpu")),
    }, indent=1))


if __name__ == "__main__":
    main()
