"""Peak memory of one SimZSS (and LiT) training step by batch size; prints one JSON object.

Each (method, batch size) runs in a fresh subprocess: build model, batch and AdamW, run ``--steps`` training
steps (forward + backward + optimizer step; the first step allocates the AdamW state), and report

- CUDA: ``torch.cuda.max_memory_allocated`` over the steps (tensor memory held by the caching allocator's
  clients: weights, activations, gradients, optimizer state; not allocator fragmentation / reserved slack),
  and ``max_memory_reserved`` next to it;
- CPU: the growth of the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) from just
  before the first step to after the last, i.e. the step's activations, gradients and AdamW state on top of
  the already-built model and batch. It includes allocator caching and is page-granular: a coarse figure, good
  for trends across batch sizes and for SimZSS vs LiT, not for absolute accounting.

CPU (small towers):
    python benchmarks/bench_memory.py --device cpu --depth 4 --image-size 112 --text-layers 4 --text-width 256 \\
        --text-heads 4 --batch-sizes 16 32 64
GPU:
    python benchmarks/bench_memory.py --device cuda --bf16 --vision vit_base_patch14_reg4_dinov2 \\
        --batch-sizes 128 256 512 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", default="vit_small_patch14_reg4_dinov2")
    p.add_argument("--depth", type=int, default=None, help="truncate the vision tower (CPU runs)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--methods", nargs="+", choices=["simzss", "lit"], default=["simzss", "lit"])
    p.add_argument("--text-layers", type=int, default=12)
    p.add_argument("--text-width", type=int, default=512)
    p.add_argument("--text-heads", type=int, default=8)
    p.add_argument("--context-length", type=int, default=77)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--cached", action="store_true", help="cached features instead of images (no vision tower)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "method:batch" -> measure one config
    return p.parse_args(argv)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(args: argparse.Namespace, method: str, batch_size: int) -> Dict[str, Any]:
    """One configuration, in this (fresh) process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    torch.manual_seed(0)
    names = common.class_names(args.classes)
    captions = common.synthetic_captions(batch_size, names)
    tokenizer = common.train_tokenizer([c for c, _ in captions] + names)
    model = common.build_model(
        tokenizer, vision=common.vision_config(args.vision, args.depth), text_layers=args.text_layers,
        text_width=args.text_width, text_heads=args.text_heads, context_length=args.context_length, device=device,
        build_vision=not args.cached, concept_weight=0.05 if method == "simzss" else 0.0,
    )
    grid = args.image_size // 14
    if args.cached:
        d = model.embed_dim
        batch = common.make_batch(tokenizer, captions, context_length=args.context_length,
                                  vision_cls=torch.randn(batch_size, d, dtype=torch.float16),
                                  vision_patches=torch.randn(batch_size, grid, grid, d, dtype=torch.float16))
    else:
        batch = common.make_batch(tokenizer, captions, context_length=args.context_length,
                                  images=torch.randn(batch_size, 3, args.image_size, args.image_size))
    batch = batch.to(device)
    optimizer = common.build_optimizer(model, batch_size)
    amp = torch.bfloat16 if args.bf16 else None
    out: Dict[str, Any] = {"method": method, "batch_size": batch_size}
    if device.type == "cuda":
        common.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(args.steps):
            common.train_step(model, optimizer, batch, amp)
        common.sync(device)
        out["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
        out["step_peak_over_base_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    else:
        before = _maxrss_bytes()
        for _ in range(args.steps):
            common.train_step(model, optimizer, batch, amp)
        out["maxrss_before_step_mib"] = round(before / 2**20, 1)
        out["maxrss_after_mib"] = round(_maxrss_bytes() / 2**20, 1)
        out["step_peak_rss_growth_mib"] = round((_maxrss_bytes() - before) / 2**20, 1)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        method, bs = args.child.split(":")
        print(json.dumps(measure(args, method, int(bs))))
        return 0
    rows = []
    own = [a for a in (argv if argv is not None else sys.argv[1:])]
    for bs in args.batch_sizes:
        for method in args.methods:
            cmd = [sys.executable, str(Path(__file__).resolve()), *own, "--child", f"{method}:{bs}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"method": method, "batch_size": bs, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    device = common.resolve_device(args.device)
    result = {
        "benchmark": "memory",
        "machine": common.machine_info(device),
        "measure": ("cuda max_memory_allocated" if device.type == "cuda"
                    else "peak RSS growth over the steps (ru_maxrss)"),
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "rows": rows,
    }
    key = "peak_allocated_mib" if device.type == "cuda" else "step_peak_rss_growth_mib"
    by = {(r["method"], r["batch_size"]): r.get(key) for r in rows}
    result["simzss_over_lit"] = {
        str(bs): round(by[("simzss", bs)] / by[("lit", bs)], 3)
        for bs in args.batch_sizes
        if by.get(("simzss", bs)) and by.get(("lit", bs))
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
