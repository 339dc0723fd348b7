"""Decode(+crop) cost and bytes per image before and after pre-resizing (``simzss shards --resize-short``).

Makes photo-like 640x480 JPEGs (smooth shading, edges, texture and sensor-like noise, ~100-120 KB at quality 90),
resizes each with :func:`simzss.data.convert.resize.resize_image` (short side 288 by default, JPEG quality 95), and
times, on one core, what a training worker does per image: decode (:func:`simzss.data.transforms.decode_image`
with the draft-mode floor of a 224 px crop at scale 0.9) plus a bicubic random-resized crop to 224. Prints one JSON
object: KB per image, CPU ms per image before / after, and the ratios. CPU time (``process_time``) is used so the
ratio holds on a shared machine; absolute times depend on the CPU.

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

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info  # noqa: E402

from simzss.data.convert.resize import ResizeOptions, resize_image  # noqa: E402
from simzss.data.transforms import decode_image, decode_min_size  # noqa: E402


def photo_like_jpeg(rng: np.random.Generator, width: int = 640, height: int = 480, quality: int = 90) -> bytes:
    """A JPEG with the statistics that matter for decoding cost: smooth gradients, a few hard-edged regions,
    mid-frequency texture and fine noise (pure noise or flat colour would compress unrealistically)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    coarse = rng.normal(size=(6, 8, 3)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(((coarse - coarse.min()) / np.ptp(coarse) * 255).astype(np.uint8))
                        .resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    img = 0.7 * smooth + 40 * np.sin(xx / rng.uniform(20, 60))[..., None] * np.cos(yy / rng.uniform(20, 60))[..., None]
    for _ in range(6):  # hard-edged objects
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(30, 140)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img[mask] = img[mask] * 0.4 + rng.uniform(0, 255, size=3) * 0.6
    texture = np.asarray(Image.fromarray(rng.integers(0, 255, (height // 3, width // 3, 3), dtype=np.uint8))
                         .resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    img = img + 0.25 * (texture - 128) + rng.normal(0, 4, size=img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


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
    rng = np.random.default_rng(0)
    originals = [photo_like_jpeg(rng) for _ in range(args.images)]
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
    cost = {}
    for name, work in (("decode", decode), ("decode_crop", decode_and_crop)):
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
        "resize_cost_ms_per_image_once": round(resize_ms, 2),
        "machine": machine_info(torch.device("cpu")),
    }, indent=1))


if __name__ == "__main__":
    main()
