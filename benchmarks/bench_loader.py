"""Training-loader benchmark on the CPU: a consumer takes batches at a set rate (a stand-in for the GPU step) and the
loader either keeps up or makes it wait; prints JSON.

Before / after in one run: the same script times the training stream of git ``5b54402``, the last commit before
issue 16 (``--before-ref``, extracted with ``git archive`` into a temporary folder: whole batches per worker, float
normalisation in the worker, PIL decode + crop, a pipeline rebuilt at every epoch) and of the working tree (``data.decode=cpu``: uint8 crops,
torchvision decode with DCT scaling, chunks of work dealt across workers, prefetch across epochs; and
``data.decode=pil``, the new pipeline with the former per-image work), each in its own process, on the same
generated COCO-like shards of ``bench_e2e.py`` (``photo_shards.py``: 640x480 photo-like JPEGs of about 100 KB,
concepts.json, sizes.json).

Reported per variant: delivered img/s over the whole run (wall clock, first batch included), img/s after the first
batch, the fraction of wall time the consumer waited for data (``wait_fraction``), the longest single wait (epoch
boundaries show here) and the time to the first batch. With ``--profile`` each variant also runs under cProfile:
the main process with workers (``*_main.txt``) and the in-process pipeline with ``workers=0`` (what one worker
does, ``*_worker.txt``); summaries go to ``--out-dir``. Absolute rates depend on the machine; quote the ratios.

    python benchmarks/bench_loader.py --num-samples 384 --batch-size 32 --workers 2 --epochs 3 --rate 2000 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
#: The last commit before issue 16's input pipeline (whole batches per worker, float32 in the worker, PIL decode).
BEFORE_ISSUE_16 = "5b54402"


# --------------------------------------------------------------------------------------------------
# data (parent process)
# --------------------------------------------------------------------------------------------------


def _make_data(folder: Path, num_samples: int, shard_size: int) -> Dict[str, Any]:
    """The COCO-like shards of ``bench_e2e.py`` (``photo_shards.py``: 640x480 photo-like JPEGs of about 100 KB,
    captions naming 3-5 bank classes, concepts.json, sizes.json), plus a BPE tokenizer trained on such captions."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import class_names, synthetic_captions
    from photo_shards import make_photo_shards

    from simzss.data.tokenize import train_bpe_tokenizer

    shards = make_photo_shards(folder / "shards", num_samples, shard_size=shard_size)
    classes = class_names(60)
    train_bpe_tokenizer([c for c, _ in synthetic_captions(2000, classes, seed=0)], folder / "tokenizer",
                        vocab_size=1024, min_frequency=1)
    mean_kb = sum(Path(s).stat().st_size for s in shards) / num_samples / 1024
    return {"shards": shards, "tokenizer": str(folder / "tokenizer"), "classes": classes,
            "mean_jpeg_kb": round(mean_kb, 1)}


def _extract_ref(ref: str, dest: Path) -> Path:
    """The ``simzss`` package of git ``ref`` under ``dest`` (read-only git use: ``git archive``)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "simzss"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


# --------------------------------------------------------------------------------------------------
# one variant (child process)
# --------------------------------------------------------------------------------------------------


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Time one loader variant; ``spec["tree"]`` is put first on sys.path so ``simzss`` is that version."""
    sys.path.insert(0, spec["tree"])
    import torch

    torch.set_num_threads(1)
    from simzss.concepts import ConceptBank
    from simzss.config import DataConfig
    from simzss.data.stream import build_train_loader
    from simzss.data.tokenize import load_tokenizer

    extra = {"decode": spec["decode"]} if spec.get("decode") else {}
    cfg = DataConfig(shards=spec["shards"], image_size=spec["crop"], crop_scale=(0.9, 1.0), workers=spec["workers"],
                     shuffle_buffer=spec["shuffle_buffer"], interpolation=spec["interpolation"], **extra)
    tokenizer = load_tokenizer(spec["tokenizer"])
    bank = ConceptBank.from_names(spec["classes"])
    loader = build_train_loader(cfg, tokenizer, bank, batch_size=spec["batch_size"], context_length=32)
    step = spec["batch_size"] / spec["rate"]  # seconds the simulated model step takes per batch
    profiler = cProfile.Profile() if spec.get("profile") else None
    waits: List[float] = []
    images = 0
    if profiler is not None:
        profiler.enable()
    t0 = time.perf_counter()
    first = None
    for epoch in range(spec["epochs"]):
        loader.set_epoch(epoch)
        it = iter(loader)
        while True:
            w0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            waits.append(time.perf_counter() - w0)
            if first is None:
                first = time.perf_counter()
            images += len(batch)
            time.sleep(step)  # the model step (on a GPU it would run while the next batch is being prepared)
    wall = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(35)
        Path(spec["profile"]).write_text(out.getvalue())
    after_first = wall - (first - t0) if first is not None else wall
    return {
        "images": images,
        "wall_s": round(wall, 3),
        "img_per_s": round(images / wall, 1),
        "img_per_s_after_first_batch": round((images - spec["batch_size"]) / max(1e-9, after_first), 1),
        "wait_fraction": round(sum(waits) / wall, 3),
        "wait_fraction_after_first_batch": round(sum(waits[1:]) / max(1e-9, after_first), 3),
        "first_batch_s": round(waits[0], 3) if waits else None,
        "longest_wait_after_first_s": round(max(waits[1:]), 3) if len(waits) > 1 else None,
        "batch_images_dtype": str(batch.images.dtype) if images and batch.images is not None else None,
    }


def _run_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {spec['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--num-samples", type=int, default=384, help="generated training samples")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--crop", type=int, default=224, help="data.image_size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="epochs consumed (the boundaries are part of the test)")
    ap.add_argument("--rate", type=float, default=2000.0, help="img/s the simulated model step consumes")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    ap.add_argument("--before-ref", default=BEFORE_ISSUE_16,
                    help=f"git ref of the 'before' loader (default: {BEFORE_ISSUE_16}, the last commit before issue 16)")
    ap.add_argument("--variants", nargs="+", default=["before", "after", "after_pil"],
                    choices=["before", "after", "after_pil"])
    ap.add_argument("--profile", action="store_true", help="also profile main process and in-process pipeline")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where profiles go")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from common import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        data = _make_data(Path(tmp) / "data", args.num_samples, args.shard_size)
        trees = {"before": str(_extract_ref(args.before_ref, Path(tmp) / "before")), "after": str(ROOT),
                 "after_pil": str(ROOT)}
        decode = {"before": None, "after": "cpu", "after_pil": "pil"}
        base = {k: data[k] for k in ("shards", "tokenizer", "classes")}
        base.update(crop=args.crop, batch_size=args.batch_size, epochs=args.epochs, rate=args.rate,
                    shuffle_buffer=args.shuffle_buffer, interpolation=args.interpolation)
        results: Dict[str, Any] = {}
        for name in args.variants:
            spec = dict(base, name=name, tree=trees[name], decode=decode[name], workers=args.workers)
            results[name] = _run_child(spec)
        profiles: Dict[str, str] = {}
        if args.profile:
            out_dir = Path(args.out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in args.variants:
                for role, workers in (("main", args.workers), ("worker", 0)):
                    path = out_dir / f"bench_loader_profile_{name}_{role}.txt"
                    spec = dict(base, name=name, tree=trees[name], decode=decode[name], workers=workers,
                                epochs=1, profile=str(path))
                    _run_child(spec)
                    profiles[f"{name}_{role}"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    ratios = {}
    if "before" in results:
        for name in ("after", "after_pil"):
            if name in results:
                ratios[f"{name}_vs_before_img_per_s"] = round(results[name]["img_per_s"] / results["before"]["img_per_s"], 2)
                ratios[f"{name}_vs_before_img_per_s_after_first_batch"] = round(
                    results[name]["img_per_s_after_first_batch"] / results["before"]["img_per_s_after_first_batch"], 2)
    print(json.dumps({
        "benchmark": "bench_loader",
        "machine": machine_info(torch.device("cpu")),
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "out_dir")},
        "data": {"samples": args.num_samples, "mean_jpeg_kb": data["mean_jpeg_kb"]},
        "results": results,
        "ratios": ratios,
        "profiles": profiles,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
