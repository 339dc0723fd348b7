"""COCO-like training shards made on the machine itself: 640x480 photo-like JPEGs of about 100 KB with captions and
their concepts (``KEY.jpg``, ``KEY.txt``, ``KEY.concepts.json``) and ``sizes.json``, as ``simzss prepare`` leaves them.

A photo-like image is a smooth colour gradient with low-frequency shading, a few soft-edged shapes and sensor-like
noise: JPEG then spends about as many bytes as on a COCO photo (flat synthetic images compress to a few KB and
would make decoding look far cheaper than it is). Captions name 3-5 classes of the built-in concept bank, so the
concept loss has real work. Used by ``bench_e2e.py``; also runnable alone:

    python benchmarks/photo_shards.py --out /tmp/photo --samples 8192
"""

from __future__ import annotations

import argparse
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common import class_names, synthetic_captions  # benchmarks/ is on sys.path when a benchmark runs as a script

WIDTH, HEIGHT = 640, 480
QUALITY = 90
SHARD_SIZE = 512
MARKER = "photo_shards.json"  # what the folder holds, so a second run reuses it


def photo_jpeg(seed: int, width: int = WIDTH, height: int = HEIGHT, quality: int = QUALITY) -> bytes:
    """One photo-like JPEG (about 100 KB at 640x480, quality 90)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= width
    y /= height
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, base = rng.uniform(-90, 90), rng.uniform(-90, 90), rng.uniform(60, 190)
        fx, fy, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 6.3)
        img[..., c] = base + a * x + b * y + 25 * np.sin(fx * 6.28 * x + phase) * np.cos(fy * 6.28 * y)
    picture = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    shapes = Image.new("RGBA", (width, height))
    draw = ImageDraw.Draw(shapes)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
        x1, y1 = x0 + rng.uniform(40, width * 0.5), y0 + rng.uniform(40, height * 0.5)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3)) + (int(rng.integers(140, 255)),)
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=colour)
    shapes = shapes.filter(ImageFilter.GaussianBlur(1.5))
    picture = Image.alpha_composite(picture.convert("RGBA"), shapes).convert("RGB")
    texture = rng.normal(0, 8.5, (height, width, 3)) + rng.normal(0, 5, (height // 4, width // 4, 3)).repeat(4, 0).repeat(4, 1)
    pixels = np.clip(np.asarray(picture, np.float32) + texture, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _write_one(args: tuple) -> tuple:
    from simzss.data.shard_index import index_new_shard
    from simzss.data.shards import write_shard

    path, start, stop, captions, names = args
    samples: List[Dict[str, Any]] = []
    for i in range(start, stop):
        caption, spans = captions[i - start]
        concepts = [{"text": names[c], "concept": names[c], "spans": [list(s) for s in sp], "chunk_span": list(sp[0])}
                    for c, sp in spans]
        samples.append({"__key__": f"{i:08d}", "jpg": photo_jpeg(i), "txt": caption,
                        "concepts.json": {"version": 1, "concepts": concepts}})
    written = write_shard(path, samples)
    index_new_shard(path)  # as simzss's own shard writers do
    return Path(path).name, written


def make_photo_shards(out: str | os.PathLike, samples: int, processes: int | None = None,
                      shard_size: int = SHARD_SIZE) -> List[str]:
    """``samples`` photo-like samples in ``out`` (shards of ``shard_size``, indexed as ``simzss shards`` writes them,
    + ``sizes.json``); reused when ``out`` already holds exactly that many in shards of that size. Returns the shard
    paths."""
    from simzss.data.shard_index import index_kept_shard
    from simzss.data.shards import write_sizes

    out = Path(out)
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("samples") == samples \
            and json.loads(marker.read_text()).get("shard_size", SHARD_SIZE) == shard_size:
        kept = sorted(str(p) for p in out.glob("*.tar"))
        for path in kept:
            index_kept_shard(path)
        return kept
    out.mkdir(parents=True, exist_ok=True)
    names = class_names(60)
    captions = synthetic_captions(samples, names, seed=0)
    jobs = [(str(out / f"photo-{s // shard_size:06d}.tar"), s, min(s + shard_size, samples),
             captions[s:min(s + shard_size, samples)], names) for s in range(0, samples, shard_size)]
    workers = max(1, min(len(jobs), processes or os.cpu_count() or 1))
    if workers == 1:
        sizes = dict(map(_write_one, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            sizes = dict(pool.map(_write_one, jobs))
    write_sizes(out, sizes)
    marker.write_text(json.dumps({"samples": samples, "shard_size": shard_size, "width": WIDTH, "height": HEIGHT,
                                  "quality": QUALITY}))
    return sorted(str(out / name) for name in sizes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--samples", type=int, default=8192, help="number of samples")
    p.add_argument("--processes", type=int, default=None, help="processes (default: all cores)")
    args = p.parse_args()
    shards = make_photo_shards(args.out, args.samples, args.processes)
    total = sum(os.path.getsize(s) for s in shards)
    print(json.dumps({"shards": len(shards), "samples": args.samples, "mean_sample_kb": total / args.samples / 1024}))


if __name__ == "__main__":
    main()
