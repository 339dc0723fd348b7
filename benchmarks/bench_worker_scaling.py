"""How the loader's ceiling grows with data workers, measured on one core; prints JSON.

Every data worker reads its rank's whole sample sequence (so that all agree on the shuffled order) and decodes only
its own chunks. So one worker's CPU time for an epoch of N samples is ``N * read + N / W * decode``: the reading is
paid W times per trained sample. This benchmark runs the real stream in process *as worker 0 of W* (the DataLoader's
worker info is stood in for, so chunking and dealing are exactly those of W workers), times its CPU over one epoch,
and reports the ceiling of W such workers on W cores: ``N / (one worker's CPU seconds)`` img/s.

It compares three ways for a worker to walk the shards, on the photo-like shards of ``bench_e2e.py``:
``webdataset`` (its ``tarfile_to_samples``, the reader before issue 16), ``headers`` (``simzss.data.tar_members``:
plain local shards read from their tar headers) and ``index`` (``simzss.data.shard_index``: the shards' ``.idx``
files, what the stream uses when the shards are indexed). A worker reads the bytes of its own samples only with the
last two.

    python benchmarks/bench_worker_scaling.py --samples 1024 --workers 1 2 4 8 14
    python benchmarks/bench_worker_scaling.py --samples 1024 --workers 1 14 --resize-short 288
    python benchmarks/bench_worker_scaling.py --samples 4096 --workers 1 14 --cache   # the feature cache's stream
    python benchmarks/bench_worker_scaling.py --samples 1792 --batch-size 256 --workers 1 14  # chunks of 64, as in training
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import class_names, machine_info, synthetic_captions  # noqa: E402
from photo_shards import make_photo_shards  # noqa: E402

import webdataset as wds  # noqa: E402

from simzss.concepts import ConceptBank  # noqa: E402
from simzss.config import DataConfig  # noqa: E402
from simzss.data.convert.resize import ResizeOptions, resize_shards  # noqa: E402
from simzss.data import stream as stream_mod  # noqa: E402
from simzss.data.features import build_cached_loader  # noqa: E402
from simzss.data.shard_index import remove_index, write_index  # noqa: E402
from simzss.data.stream import SkipStats, build_train_loader  # noqa: E402
from simzss.data.tar_members import tar_samples  # noqa: E402
from simzss.data.tokenize import load_tokenizer, train_bpe_tokenizer  # noqa: E402


READERS = ("webdataset", "headers", "index")


class EpochRead(Exception):
    """Worker 0 has read and dealt one whole epoch (raised before it reads anything of the next)."""


def webdataset_reader(shards: Any, handler: Any, warn: bool = True) -> Any:
    """The stream's former tar stage: webdataset's own reader (every member's bytes, read by every worker)."""
    return wds.tarfile_to_samples(handler=handler)(shards)


def header_reader(shards: Any, handler: Any, warn: bool = True) -> Any:
    """The stream's tar stage for shards without an index: their tar headers."""
    return tar_samples(shards, handler)


def set_indexes(source: str, indexed: bool) -> None:
    """Index every shard of the folder ``source``, or remove their indexes."""
    for path in sorted(Path(source).glob("*.tar")):
        if indexed:
            assert write_index(str(path)) == "written", path
        else:
            remove_index(str(path))


def worker_seconds(source: str, tokenizer: Any, workers: int, batch: int, reader: str,
                   cache: bool = False) -> Dict[str, float]:
    """CPU seconds of worker 0 of ``workers`` over one epoch, and of its reading alone; ``source`` is a shards
    folder, or with ``cache`` a feature cache (the cached stream: captions, concepts and a feature row each)."""
    if cache:
        cfg = DataConfig(feature_cache=source, workers=workers, shuffle_buffer=1000)
        loader = build_cached_loader(cfg, tokenizer, ConceptBank.default(), batch_size=batch, context_length=32)
    else:
        cfg = DataConfig(shards=[source], workers=workers, shuffle_buffer=1000)
        loader = build_train_loader(cfg, tokenizer, ConceptBank.default(), batch_size=batch, context_length=32)
    stream = loader.dataset
    per_epoch = stream.samples_per_epoch
    patches = [mock.patch.object(stream_mod, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=workers))]
    if reader != "index":
        patches.append(mock.patch.object(stream_mod, "indexed_samples",
                                         webdataset_reader if reader == "webdataset" else header_reader))
    for p in patches:
        p.start()
    try:
        t0 = time.process_time()
        read = sum(1 for _ in stream._epoch_order(0, 0, SkipStats(0), count_errors=True))
        read_seconds = time.process_time() - t0
        epoch_order = stream._epoch_order

        def this_epoch_only(epoch: int, *args: Any, **kwargs: Any) -> Any:
            if epoch > 0:  # epoch 0 is read and dealt: stop before the next one's shuffle buffer fills
                raise EpochRead
            return epoch_order(epoch, *args, **kwargs)

        stream._epoch_order = this_epoch_only
        t0 = time.process_time()
        decoded = 0
        try:
            for piece in stream._pieces():
                decoded += len(piece.positions)
        except EpochRead:
            pass
        total_seconds = time.process_time() - t0
    finally:
        for p in reversed(patches):
            p.stop()
        loader.close()
    return {"samples_read": read, "samples_decoded": decoded, "cpu_seconds": round(total_seconds, 3),
            "read_cpu_ms_per_sample": round(read_seconds / read * 1000, 4),
            "ceiling_img_per_s": round(per_epoch / total_seconds, 1)}


def make_cache(work: Path, captions: int) -> str:
    """A toy feature cache of ``captions`` captions (4 per 64 px image; a 1-block ViT-S/14 at 56 px): what matters
    here is its caption stream, which every worker reads."""
    from bench_cache import make_data, save_tower

    from simzss.cli.cache_features import cache_features

    data = make_data(work / "toy", max(1, captions // 4), 4, 64, 128)
    vision = save_tower(work / "toy", "vit_small_patch14_reg4_dinov2", 1, image_size=56)
    cache_features([str(data["shards"])], work / "cache", vision=vision, image_size=56, views=1, dtype="fp16",
                   batch_size=64, device=torch.device("cpu"), workers=0, overwrite=True, progress=False)
    return str(work / "cache")


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 14])
    p.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS)
    p.add_argument("--cache", action="store_true",
                   help="measure the feature cache's stream instead (a toy cache of --samples captions, 4 per image)")
    p.add_argument("--resize-short", type=int, default=0,
                   help="measure on the shards pre-resized to this short side (simzss shards resize; 0: originals)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one worker = one core
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache:
            source = make_cache(Path(tmp), args.samples)
        else:
            source = str(Path(make_photo_shards(Path(tmp) / "shards", args.samples, shard_size=256)[0]).parent)
            if args.resize_short:
                out = Path(tmp) / f"shards{args.resize_short}"
                resize_shards(sorted(str(p) for p in Path(source).glob("*.tar")), out,
                              ResizeOptions(short_side=args.resize_short), processes=1, show_progress=False)
                source = str(out)
        train_bpe_tokenizer([c for c, _ in synthetic_captions(2000, class_names(60), seed=0)], Path(tmp) / "tok",
                            vocab_size=1024, min_frequency=1)
        tokenizer = load_tokenizer(str(Path(tmp) / "tok"))
        worker_seconds(source, tokenizer, 1, args.batch_size, "headers", args.cache)  # warm-up: imports, page cache
        runs = {}
        for reader in args.readers:
            set_indexes(source, reader == "index")
            runs[reader] = {str(w): worker_seconds(source, tokenizer, w, args.batch_size, reader, args.cache)
                            for w in args.workers}
    ratios = {f"{a}_vs_{b}": {str(w): round(runs[a][str(w)]["ceiling_img_per_s"]
                                            / runs[b][str(w)]["ceiling_img_per_s"], 2) for w in args.workers}
              for a, b in itertools.combinations(reversed(READERS), 2) if a in runs and b in runs}
    print(json.dumps({"benchmark": "bench_worker_scaling", "samples": args.samples, "batch_size": args.batch_size,
                      "resize_short": args.resize_short or None, "feature_cache": args.cache,
                      "runs": runs, "ceiling_ratios": ratios,
                      "machine": machine_info(torch.device("cpu"))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
