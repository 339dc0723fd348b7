"""Training-step time of SimZSS against LiT on the same model and batch; prints one JSON object.

One random-init model (frozen timm DINOv2 tower + from-scratch text tower) and one batch of captions with
``--concepts`` in-bank concepts each (drawn from ``--classes`` bank names). SimZSS and LiT differ only in
``concept_weight`` (0.05 vs 0: LiT skips the concept branch), so the ratio is exactly the concept loss's cost:
text span pooling, patch-query softmax pooling, prototypes and the concept cross-entropy. Each repetition runs
``--steps`` SimZSS steps then ``--steps`` LiT steps (forward + backward + AdamW step, the trainer's optimizer),
alternating which goes first, after ``--warmup`` steps of each; medians over repetitions (plus the ratio of the
best times and the median per-repetition ratio, which resist load from other processes on a shared machine).
``--cached`` feeds cached features instead of images (the vision tower is then out of the step). Target:
simzss/lit <= 1.02.

CPU (about a minute, small towers, one thread for stable timings on a shared machine; ratios only):
    python benchmarks/bench_train_step.py --device cpu --threads 1 --depth 4 --image-size 112 --batch-size 32 \\
        --text-layers 4 --text-width 256 --text-heads 4 --steps 1 --reps 9 --warmup 1
GPU figures (ViT-S/14 and ViT-B/14, batch 256 and 1024, bf16, full 12-layer 512-wide text tower):
    python benchmarks/bench_train_step.py --device cuda --bf16 --vision vit_base_patch14_reg4_dinov2 \\
        --image-size 224 --batch-size 1024 --steps 5 --reps 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", default="vit_small_patch14_reg4_dinov2", help="timm DINOv2 name (random init)")
    p.add_argument("--depth", type=int, default=None, help="truncate the vision tower (CPU runs); default: full")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--text-layers", type=int, default=12)
    p.add_argument("--text-width", type=int, default=512)
    p.add_argument("--text-heads", type=int, default=8)
    p.add_argument("--context-length", type=int, default=77)
    p.add_argument("--classes", type=int, default=100, help="concept classes the captions draw from")
    p.add_argument("--concepts", type=int, nargs=2, default=(3, 5), metavar=("MIN", "MAX"), help="concepts per caption")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method per repetition")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU figures)")
    p.add_argument("--cached", action="store_true", help="cached vision features instead of images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Build model and batch, time SimZSS and LiT steps interleaved, return the JSON record."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    torch.manual_seed(args.seed)
    names = common.class_names(args.classes)
    captions = common.synthetic_captions(args.batch_size, names, tuple(args.concepts), seed=args.seed)
    tokenizer = common.train_tokenizer([c for c, _ in captions] + names)
    model = common.build_model(
        tokenizer, vision=common.vision_config(args.vision, args.depth), text_layers=args.text_layers,
        text_width=args.text_width, text_heads=args.text_heads, context_length=args.context_length, device=device,
        build_vision=not args.cached,
    )
    grid = args.image_size // 14
    if args.cached:
        dim = model.embed_dim
        batch = common.make_batch(tokenizer, captions, context_length=args.context_length,
                                  vision_cls=torch.randn(args.batch_size, dim, dtype=torch.float16),
                                  vision_patches=torch.randn(args.batch_size, grid, grid, dim, dtype=torch.float16))
    else:
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        batch = common.make_batch(tokenizer, captions, context_length=args.context_length, images=images)
    batch = batch.to(device)
    optimizer = common.build_optimizer(model, args.batch_size)
    amp = torch.bfloat16 if args.bf16 else None
    weights = {"simzss": 0.05, "lit": 0.0}

    def steps(method: str, n: int) -> Any:
        model.concept_weight = weights[method]
        out = None
        for _ in range(n):
            out = common.train_step(model, optimizer, batch, amp)
        return out

    for method in weights:
        steps(method, args.warmup)
    per_step: Dict[str, List[float]] = {m: [] for m in weights}
    peak_gib: Dict[str, float] = {m: 0.0 for m in weights}
    for r in range(args.reps):
        order = list(weights) if r % 2 == 0 else list(reversed(weights))
        for method in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            per_step[method].append(common.timed(lambda: steps(method, args.steps), device) / args.steps)
            if device.type == "cuda":
                peak_gib[method] = max(peak_gib[method], torch.cuda.max_memory_allocated(device) / 2**30)
    out = steps("simzss", 1)
    result: Dict[str, Any] = {"benchmark": "train_step", "machine": common.machine_info(device)}
    result["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    result["concepts_in_batch"] = int(out.num_concepts)
    result["classes_in_batch"] = int(out.num_classes)
    for method, times in per_step.items():
        stats = common.summary_ms(times)
        stats["img_per_s"] = round(args.batch_size / (stats["median_ms"] / 1000), 1)
        result[method] = stats
    result["ratio_simzss_over_lit"] = round(result["simzss"]["median_ms"] / result["lit"]["median_ms"], 4)
    # robust companions on a shared machine: the ratio of best times (interference only ever adds time) and the
    # median of the per-repetition ratios (adjacent runs see similar load)
    result["ratio_of_min"] = round(result["simzss"]["min_ms"] / result["lit"]["min_ms"], 4)
    pairs = sorted(s / l for s, l in zip(per_step["simzss"], per_step["lit"]))
    result["ratio_per_rep_median"] = round(pairs[len(pairs) // 2], 4)
    if device.type == "cuda":  # per method: the peak is reset before each timed block
        for method in weights:
            result[method]["peak_mem_gib"] = round(peak_gib[method], 2)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    print(json.dumps(run(parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
