"""Per-epoch training time with the frozen vision tower in the loop vs from the feature cache; prints one JSON
object.

Same data (toy-world shards, annotated by ``simzss prepare``), same model (one random-init vision tower saved
to a local weights file and used by both paths and by ``cache-features``; the same text tower config), same
batch size and loader settings. On the fly: ``build_train_loader`` (JPEG decode + augmentation + tokenisation in
the data workers) and the tower's forward in every step. Cached: ``simzss cache-features`` once (timed
separately: the one-off cost), then ``build_cached_loader`` and the step without the tower. A step is forward +
backward + AdamW step. Each epoch is timed end to end (loader start-up included) after one warm-up step per
path; ``--reps`` alternates the two paths. The speed-up is the ratio of median epoch times; ``break_even_epochs``
= cache build time / time saved per epoch.

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

from simzss.config import DataConfig  # noqa: E402


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
    p.add_argument("--reps", type=int, default=1, help="epochs per path (alternating)")
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp folder)")
    return p.parse_args(argv)


def _epoch(model: Any, loader: Any, optimizer: Any, device: torch.device, amp: Optional[torch.dtype]) -> Dict[str, Any]:
    """One full epoch, timed end to end (loader start-up included)."""
    common.sync(device)
    t0 = time.perf_counter()
    steps = 0
    for batch in loader:
        common.train_step(model, optimizer, batch.to(device, non_blocking=True), amp)
        steps += 1
    common.sync(device)
    return {"seconds": time.perf_counter() - t0, "steps": steps}


def run(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    from safetensors.torch import save_file

    from simzss.concepts import ConceptBank
    from simzss.data.prepare import prepare_shards
    from simzss.data.shards import iter_samples
    from simzss.data.stream import build_train_loader
    from simzss.data.synthetic import generate_toy_world
    from simzss.features import cache_features
    from simzss.models.vision import FrozenVisionTower

    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    amp = torch.bfloat16 if args.bf16 else None
    torch.manual_seed(0)

    t = time.perf_counter()
    toy = generate_toy_world(work / "toy", num_train=args.num_train, num_val=0, image_size=args.toy_size,
                             shard_size=args.shard_size, overwrite=True)
    prepared = work / "prepared"
    prepare_shards([str(Path(toy["train_dir"]) / n) for n in toy["shards"]], prepared, progress=False)
    data_s = time.perf_counter() - t

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

    captions = [s["txt"].decode() for p in sorted(prepared.glob("*.tar")) for s in iter_samples(p)]
    tokenizer = common.train_tokenizer(captions, vocab_size=1024)
    bank = ConceptBank.default()
    base = dict(workers=args.workers, image_size=args.image_size, shuffle_buffer=256)
    loaders = {
        "on_the_fly": build_train_loader(DataConfig(shards=[str(p) for p in sorted(prepared.glob("*.tar"))], **base),
                                         tokenizer, bank, batch_size=args.batch_size,
                                         context_length=args.context_length),
        "cached": _cached_loader(DataConfig(feature_cache=str(work / "cache"), **base), tokenizer, bank, args),
    }
    models, optimizers = {}, {}
    for path in loaders:
        torch.manual_seed(1)  # same text-tower init for both paths
        models[path] = common.build_model(
            tokenizer, vision=vision, text_layers=args.text_layers, text_width=args.text_width,
            text_heads=args.text_heads, context_length=args.context_length, device=device,
            build_vision=path == "on_the_fly",
        )
        optimizers[path] = common.build_optimizer(models[path], args.batch_size)
        first = next(iter(loaders[path]))  # warm-up step (lazy inits, allocator); not part of the epochs
        common.train_step(models[path], optimizers[path], first.to(device), amp)

    epochs: Dict[str, List[Dict[str, Any]]] = {p: [] for p in loaders}
    for r in range(args.reps):
        for path in (list(loaders) if r % 2 == 0 else list(reversed(list(loaders)))):
            loaders[path].set_epoch(r + 1)
            epochs[path].append(_epoch(models[path], loaders[path], optimizers[path], device, amp))

    result: Dict[str, Any] = {"benchmark": "feature_cache", "machine": common.machine_info(device)}
    result["settings"] = {k: v for k, v in vars(args).items() if k != "workdir"}
    result["data_generation_and_prepare_s"] = round(data_s, 2)
    result["cache_build_s"] = round(cache_s, 2)
    result["cache_bytes"] = sum(p.stat().st_size for p in (work / "cache").glob("*.tar"))
    med = {}
    for path, runs in epochs.items():
        med[path] = statistics.median(e["seconds"] for e in runs)
        result[path] = {"epoch_s_median": round(med[path], 2), "steps_per_epoch": runs[0]["steps"],
                        "img_per_s": round(runs[0]["steps"] * args.batch_size / med[path], 1),
                        "epochs_s": [round(e["seconds"], 2) for e in runs]}
    result["speedup_cached_over_on_the_fly"] = round(med["on_the_fly"] / med["cached"], 2)
    saved = med["on_the_fly"] - med["cached"]
    result["break_even_epochs"] = round(cache_s / saved, 2) if saved > 0 else None
    return result


def _cached_loader(cfg: DataConfig, tokenizer: Any, bank: Any, args: argparse.Namespace) -> Any:
    from simzss.features import build_cached_loader

    return build_cached_loader(cfg, tokenizer, bank, batch_size=args.batch_size, context_length=args.context_length)


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
