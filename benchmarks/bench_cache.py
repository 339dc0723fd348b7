"""Per-epoch training time with the frozen vision tower in the loop vs from the feature cache, both through the
real trainer (``simzss.engine.trainer.train``); prints one JSON object.

Same data (toy-world shards, annotated by ``simzss prepare``), same model (one random-init vision tower saved
to a local weights file and used by both runs and by ``cache-features``; the same text tower config, seed and
optimizer), same batch size and loader settings. On the fly: ``data.shards`` (JPEG decode + augmentation +
tokenisation in the data workers, the tower's forward in every step). Cached: ``simzss cache-features`` once
(timed separately: the one-off cost), then ``data.feature_cache`` (the trainer checks the cache against the
tower and never runs the tower in a step). A step is the trainer's: forward, backward, gradient norm, AdamW,
schedule, logging every ``--log-every`` steps. Each run trains ``1 + --reps`` epochs; the first (data worker
start-up, lazy initialisation, allocator warm-up) is reported apart, the others are timed whole by the
trainer (``epoch_times``; the last one includes the end-of-run checkpoint of both runs). The speed-up is the
ratio of median epoch times; ``break_even_epochs`` = cache build time / time saved per epoch.

CPU (a few minutes):
    python benchmarks/bench_cache.py --device cpu --num-train 256 --depth 6 --image-size 112 --batch-size 32
GPU:
    python benchmarks/bench_cache.py --device cuda --bf16 --vision vit_base_patch14_reg4_dinov2 \\
        --num-train 20000 --toy-size 256 --image-size 224 --batch-size 256 --workers 8 --text-layers 12 --text-width 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from simzss.config import DataConfig, ModelConfig, TextConfig, TrainConfig, VisionConfig  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", default="vit_small_patch14_reg4_dinov2")
    p.add_argument("--depth", type=int, default=None, help="truncate the vision tower (CPU runs)")
    p.add_argument("--num-train", type=int, default=256, help="toy-world training images")
    p.add_argument("--toy-size", type=int, default=128, help="side of the generated toy images")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224, help="training crop")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="data workers (both loaders)")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-width", type=int, default=256)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--context-length", type=int, default=77)
    p.add_argument("--reps", type=int, default=2, help="timed epochs per path (after one warm-up epoch)")
    p.add_argument("--log-every", type=int, default=10, help="trainer log interval (steps)")
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp folder)")
    return p.parse_args(argv)


def _train_config(args: argparse.Namespace, work: Path, vision: VisionConfig, path: str, cpu: bool) -> TrainConfig:
    """The trainer config of one run: identical for both paths but for the data source."""
    data: Dict[str, Any] = dict(workers=args.workers, image_size=args.image_size, shuffle_buffer=256)
    if path == "cached":
        data["feature_cache"] = str(work / "cache")
    else:
        data["shards"] = [str(p) for p in sorted((work / "prepared").glob("*.tar"))]
    return TrainConfig(
        model=ModelConfig(
            vision=vision, tokenizer=str(work / "tokenizer"),
            text=TextConfig(layers=args.text_layers, width=args.text_width, heads=args.text_heads,
                            context_length=args.context_length),
        ),
        data=DataConfig(**data),
        output_dir=str(work / "runs"), run_name=path, seed=0, batch_size=args.batch_size, epochs=1 + args.reps,
        checkpoint_every=0, keep_checkpoints=1, log_every=args.log_every,
        mixed_precision="bf16" if args.bf16 else "no", cpu=cpu,
    )


def run(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    from safetensors.torch import save_file

    from simzss.data.prepare import prepare_shards
    from simzss.data.shards import iter_samples
    from simzss.data.synthetic import generate_toy_world
    from simzss.data.tokenize import train_bpe_tokenizer
    from simzss.engine.trainer import train
    from simzss.cli.cache_features import cache_features
    from simzss.models.vision import FrozenVisionTower

    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    torch.manual_seed(0)

    t = time.perf_counter()
    toy = generate_toy_world(work / "toy", num_train=args.num_train, num_val=0, image_size=args.toy_size,
                             shard_size=args.shard_size, overwrite=True)
    prepared = work / "prepared"
    prepare_shards([str(Path(toy["train_dir"]) / n) for n in toy["shards"]], prepared, progress=False)
    data_s = time.perf_counter() - t
    captions = [s["txt"].decode() for p in sorted(prepared.glob("*.tar")) for s in iter_samples(p)]
    train_bpe_tokenizer(captions, work / "tokenizer", vocab_size=1024, min_frequency=1)

    vision = common.vision_config(args.vision, args.depth)
    tower = FrozenVisionTower(vision.name, pretrained=False, model_kwargs=dict(vision.model_kwargs))
    weights = work / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in tower.model.state_dict().items()}, str(weights))
    del tower
    vision = common.vision_config(args.vision, args.depth, weights=str(weights))

    t = time.perf_counter()
    cache_features([str(prepared)], work / "cache", vision=vision, image_size=args.image_size,
                   batch_size=max(args.batch_size, 64), device=device, workers=args.workers, overwrite=True,
                   progress=False)
    cache_s = time.perf_counter() - t

    result: Dict[str, Any] = {"benchmark": "feature_cache", "machine": common.machine_info(device)}
    result["settings"] = {k: v for k, v in vars(args).items() if k != "workdir"}
    result["data_generation_and_prepare_s"] = round(data_s, 2)
    result["cache_build_s"] = round(cache_s, 2)
    result["cache_bytes"] = sum(p.stat().st_size for p in (work / "cache").glob("*.tar"))
    med = {}
    for path in ("on_the_fly", "cached"):
        out = train(_train_config(args, work, vision, path, cpu=device.type == "cpu"))
        times = out["epoch_times"]
        if len(times) != 1 + args.reps:
            raise RuntimeError(f"{path}: expected {1 + args.reps} whole epochs, the trainer timed {len(times)}")
        med[path] = statistics.median(times[1:])
        steps = out["step"] // (1 + args.reps)
        result[path] = {"epoch_s_median": round(med[path], 2), "steps_per_epoch": steps,
                        "img_per_s": round(steps * args.batch_size / med[path], 1),
                        "epochs_s": [round(x, 2) for x in times[1:]], "warmup_epoch_s": round(times[0], 2),
                        "final_loss": round(float(out["metrics"]["loss"]), 4)}
    result["speedup_cached_over_on_the_fly"] = round(med["on_the_fly"] / med["cached"], 2)
    saved = med["on_the_fly"] - med["cached"]
    result["break_even_epochs"] = round(cache_s / saved, 2) if saved > 0 else None
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        result = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
            result = run(args, Path(tmp))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
