"""End-to-end training throughput against the model-only rate, measured in one run; prints JSON.

1. Makes COCO-like shards on the machine (``photo_shards.py``: 640x480 photo-like JPEGs of about 100 KB with
   captions and concepts), reused when the folder already holds them.
2. For each ``--batch``, runs the real trainer (:class:`simzss.engine.trainer.Trainer`, the code behind
   ``simzss train``) for ``--epochs`` epochs over them with ``--workers`` data workers, and reads the wall-clock
   rate and data-wait fraction from its ``metrics.jsonl`` (the first log window, which holds the workers' start,
   is reported separately).
3. In the same run, the model-only rate: the same trainer and model fed one batch that is already on the device,
   so the loop never waits for data (what ``bench_train_step.py`` measures, through the trainer's own step).

``--variants`` adds runs of the same shards through other input paths (each at every ``--batch``): ``cpu`` (the
default: ``data.decode=cpu`` on the original JPEGs), ``resized`` (the shards pre-resized by ``simzss shards resize``
to ``--resize-short``, decoded on the CPU), ``gpu`` (``data.decode=gpu``: nvJPEG on the device) and ``pil`` (the
former PIL decode + crop). Each finished run is also written to stderr as one JSON line, so a run cut short by a
time limit still leaves its figures in the log.

On a lent GPU (random-init ViT-B/14 at 224 px, text 12x512; bf16 by the trainer's ``mixed_precision: auto``):

    python benchmarks/bench_e2e.py --device cuda --batch 256 1024 --samples 8192 --workers 14
    python benchmarks/bench_e2e.py --device cuda --batch 1024 --samples 8192 --workers 14 --variants resized gpu

On the CPU, a small model (ViT-S/14 cut to 2 blocks at 112 px, text 2x64):

    python benchmarks/bench_e2e.py --device cpu --small --batch 32 --samples 512 --workers 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from common import machine_info, resolve_device  # benchmarks/ is on sys.path when a benchmark runs as a script
from photo_shards import make_photo_shards

from simzss.config import TrainConfig, load_config
from simzss.data.convert.resize import DEFAULT_SHORT_SIDE, ResizeOptions, resize_shards
from simzss.data.device import to_device
from simzss.data.shard_index import index_coverage
from simzss.data.tokenize import train_bpe_tokenizer
from simzss.engine.trainer import Trainer
from simzss.models.zeroshot import get_mean_std


def model_overrides(small: bool) -> List[str]:
    """A random-init ViT-B/14 (224 px) + 12x512 text tower, or the small CPU model."""
    if small:
        return ["model.vision.name=vit_small_patch14_reg4_dinov2", "model.vision.pretrained=false",
                "model.vision.model_kwargs={depth: 2, img_size: 112}", "data.image_size=112",
                "model.text.layers=2", "model.text.width=64", "model.text.heads=2", "model.text.context_length=32"]
    return ["model.vision.name=vit_base_patch14_reg4_dinov2", "model.vision.pretrained=false",
            "data.image_size=224", "model.text.layers=12", "model.text.width=512", "model.text.heads=8",
            "model.text.context_length=77"]


VARIANTS = ("cpu", "resized", "gpu", "pil")


def run_config(shards: Path, tokenizer: Path, out: Path, *, name: str, batch: int, epochs: int, workers: int,
               device: torch.device, small: bool, log_every: int, decode: str = "cpu") -> TrainConfig:
    """The training config of one measured run (no checkpoints but the last, no evaluation)."""
    return load_config(TrainConfig, None, [f"data.decode={decode}",
        f"output_dir={out}", f"run_name={name}", f"batch_size={batch}", f"epochs={epochs}",
        f"log_every={log_every}", "checkpoint_every=0", "keep_checkpoints=1", "eval.datasets=[]",
        f"data.shards=['{shards}']", f"data.workers={workers}", "data.shuffle_buffer=1000",
        f"model.tokenizer={tokenizer}", "optim.lr=1e-4", f"cpu={'true' if device.type == 'cpu' else 'false'}",
        *model_overrides(small),
    ])


def window_stats(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """Wall-clock img/s and data-wait fraction over the log windows after the first (the first holds the data
    workers' start and the first batch), and over all of them.

    The wait fraction is the time the training loop's host thread waited for a batch: an upper bound of the time
    the GPU sat idle for want of data (the host may be a few queued steps ahead of the GPU while it waits)."""
    timed = [r for r in rows if "samples_per_s" in r]
    steady = timed[1:] or timed
    seconds = sum(r["window_seconds"] for r in steady)
    samples = sum(r["samples_per_s"] * r["window_seconds"] for r in steady)
    all_seconds = sum(r["window_seconds"] for r in timed)
    return {
        "wall_img_per_s": samples / seconds,
        "gpu_wait_fraction": sum(r["data_wait_fraction"] * r["window_seconds"] for r in steady) / seconds,
        "wall_img_per_s_incl_start": sum(r["samples_per_s"] * r["window_seconds"] for r in timed) / all_seconds,
        "gpu_wait_fraction_incl_start": sum(r["data_wait_fraction"] * r["window_seconds"] for r in timed) / all_seconds,
        "measured_seconds": seconds,
        "measured_seconds_incl_start": all_seconds,
    }


class OnDevice:
    """A loader that hands out one batch already on the device, ``steps`` times (the TrainLoader interface the
    trainer uses): the model-only bound through the trainer's own step."""

    def __init__(self, batch: Any, steps: int) -> None:
        self.batch, self.steps, self.epoch, self.consumed = batch, steps, 0, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["batches_consumed"])

    def __iter__(self) -> Iterator[Any]:
        while self.consumed < self.steps:
            self.consumed += 1
            yield self.batch


def rows_of(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def measure(cfg: TrainConfig, model_only_steps: int) -> Dict[str, Any]:
    """One end-to-end run of ``cfg`` and the model-only rate of the same config."""
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    build_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = trainer.fit()
    fit_seconds = time.perf_counter() - t0  # an outside clock on the trainer's own rate figures
    e2e = window_stats(rows_of(result))
    steps = int(result["step"])

    from dataclasses import replace

    quick = replace(cfg, run_name=cfg.run_name + "_model_only", data=replace(cfg.data, workers=0))
    bound = Trainer(replace(quick, log_every=max(1, model_only_steps // 4)))
    host = next(iter(bound.loader))
    mean, std = get_mean_std(bound.unwrapped)
    batch = to_device(host, bound.accelerator.device, mean=mean.tolist(), std=std.tolist())
    bound.loader = OnDevice(batch, model_only_steps)
    bound.steps_per_epoch = bound.total_steps = model_only_steps
    bound_rows = rows_of(bound.fit())
    model_only = window_stats(bound_rows)["wall_img_per_s"]
    out: Dict[str, Any] = {
        "batch": cfg.batch_size,
        "steps": steps,
        "samples_trained": steps * cfg.batch_size,
        "epochs": cfg.epochs,
        "steps_per_epoch": trainer.steps_per_epoch,
        **{k: round(v, 4) for k, v in e2e.items()},
        "model_only_img_per_s": round(model_only, 2),
        "ratio_to_model_only": round(e2e["wall_img_per_s"] / model_only, 4),
        # the whole fit() call by a clock outside the trainer: start-up of the workers, final checkpoint included
        "fit_seconds": round(fit_seconds, 3),
        "fit_img_per_s": round(steps * cfg.batch_size / fit_seconds, 2),
        "epoch_seconds": [round(s, 3) for s in result["epoch_times"]],
        "startup_seconds": round(build_seconds, 2),
    }
    peak = [r["gpu_mem_peak_gib"] for r in rows_of(result) if "gpu_mem_peak_gib" in r]
    if peak:
        out["gpu_mem_peak_gib"] = round(max(peak), 2)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda when present)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 256 1024; small: 32)")
    p.add_argument("--samples", type=int, default=None, help="samples in the shards (default: 8192; small: 512)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument("--workers", type=int, default=None, help="data workers (default: cores - 2)")
    p.add_argument("--small", action="store_true", help="small model (ViT-S/14 cut to 2 blocks at 112 px) for the CPU")
    p.add_argument("--model-only-steps", type=int, default=None, help="steps of the model-only run (default: 12)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["cpu"],
                   help="input paths to run at each batch size (default: cpu)")
    p.add_argument("--resize-short", type=int, default=DEFAULT_SHORT_SIDE,
                   help=f"short side of the 'resized' variant's shards (default: {DEFAULT_SHORT_SIDE})")
    p.add_argument("--data", default=None, help="shards folder (made there if missing; default: a temp folder)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    batches = args.batch or ([32] if args.small else [256, 1024])
    samples = args.samples or (512 if args.small else 8192)
    workers = args.workers if args.workers is not None else max(0, (os.cpu_count() or 2) - 2)
    if "gpu" in args.variants and device.type != "cuda":
        raise SystemExit("--variants gpu decodes with nvJPEG: it needs --device cuda")
    if samples < max(batches):
        raise SystemExit(f"--samples {samples} is less than one batch of {max(batches)}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "shards"
        t0 = time.perf_counter()
        shards = make_photo_shards(data, samples)
        make_seconds = time.perf_counter() - t0
        mean_kb = sum(os.path.getsize(s) for s in shards) / samples / 1024
        from photo_shards import class_names, synthetic_captions

        captions = [c for c, _ in synthetic_captions(2000, class_names(60), seed=0)]
        tokenizer = Path(tmp) / "tokenizer"
        train_bpe_tokenizer(captions, tokenizer, vocab_size=1024, min_frequency=1)
        folders = {variant: data for variant in args.variants}
        resize_seconds = None
        if "resized" in args.variants:
            t0 = time.perf_counter()
            folders["resized"] = data.with_name(f"{data.name}_resized{args.resize_short}")
            resize_shards(shards, folders["resized"], ResizeOptions(short_side=args.resize_short),
                          processes=max(1, os.cpu_count() or 1), show_progress=False)
            resize_seconds = round(time.perf_counter() - t0, 1)
        runs = []
        for variant in args.variants:
            folder = folders[variant]
            kb = sum(p.stat().st_size for p in folder.glob("*.tar")) / samples / 1024
            for batch in batches:
                steps_per_epoch = samples // batch
                cfg = run_config(folder, tokenizer, Path(tmp) / "runs", name=f"{variant}_b{batch}", batch=batch,
                                 epochs=args.epochs, workers=workers, device=device, small=args.small,
                                 log_every=max(1, math.ceil(steps_per_epoch * args.epochs / 8)),
                                 decode="cpu" if variant == "resized" else variant)
                indexed = index_coverage(sorted(str(p) for p in folder.glob("*.tar"))).get("fresh", 0)
                run = {"variant": variant, "mean_jpeg_kb": round(kb, 1), "shards_indexed": indexed,
                       **measure(cfg, args.model_only_steps or 12)}
                print(json.dumps(run), file=sys.stderr, flush=True)
                runs.append(run)
        report = {
            "benchmark": "bench_e2e",
            "machine": machine_info(device),
            "model": "small (ViT-S/14 x2 at 112 px, text 2x64)" if args.small else "ViT-B/14 at 224 px, text 12x512",
            "samples": samples,
            "mean_jpeg_kb": round(mean_kb, 1),
            "shards_seconds": round(make_seconds, 1),
            "resize_short": args.resize_short if "resized" in args.variants else None,
            "resize_seconds": resize_seconds,
            "workers": workers,
            "runs": runs,
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
