"""Zero-shot segmentation speed: sliding-window inference with batched windows vs one window at a time; prints
one JSON object.

The standard protocol (``simzss.eval.segment_image``): resize the short side to 448, slide 448 x 448 windows
with stride 224, average the per-window cosine maps, upsample, softmax. Both modes run on the same images with
the same random-init model and a random ``--classes`` x D classifier (text encoding is outside the timed
loop, as in evaluation where it runs once per dataset). Repetitions alternate the modes; medians are reported,
and the two modes' outputs are checked to agree.

CPU (truncated tower):
    python benchmarks/bench_eval.py --device cpu --depth 4 --images 4 --reps 3
GPU:
    python benchmarks/bench_eval.py --device cuda --vision vit_base_patch14_reg4_dinov2 --images 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _size(text: str) -> Tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", default="vit_small_patch14_reg4_dinov2")
    p.add_argument("--depth", type=int, default=None, help="truncate the vision tower (CPU runs)")
    p.add_argument("--images", type=int, default=8, help="images per repetition")
    p.add_argument("--sizes", type=_size, nargs="+", default=[(512, 683), (375, 500), (1024, 2048)],
                   help="HxW of the (random) images, cycled: ADE20K-, VOC-, Cityscapes-like")
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--short-side", type=int, default=448)
    p.add_argument("--crop", type=int, default=448)
    p.add_argument("--stride", type=int, default=224)
    p.add_argument("--window-batches", type=int, nargs=2, default=[16, 1], metavar=("BATCHED", "SINGLE"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from simzss.models.zeroshot import resized_shape, segment_image, slide_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    torch.manual_seed(0)
    names = common.class_names(10)
    tokenizer = common.train_tokenizer(names, vocab_size=300)
    model = common.build_model(tokenizer, vision=common.vision_config(args.vision, args.depth), text_layers=1,
                               text_width=64, text_heads=2, context_length=16, device=device).eval()
    classifier = torch.nn.functional.normalize(torch.randn(args.classes, model.embed_dim, device=device), dim=-1)
    sizes = [args.sizes[i % len(args.sizes)] for i in range(args.images)]
    images = [torch.randn(1, 3, h, w, device=device) for h, w in sizes]
    windows = sum(len(slide_windows(*resized_shape(h, w, args.short_side), args.crop, args.stride)) for h, w in sizes)

    def run_all(window_batch: int) -> List[torch.Tensor]:
        return [segment_image(model, x, classifier, short_side=args.short_side, crop=args.crop, stride=args.stride,
                              window_batch=window_batch) for x in images]

    batched, single = args.window_batches
    ref = {wb: run_all(wb) for wb in (batched, single)}  # warm-up, and the agreement check
    max_diff = max(float((a - b).abs().max()) for a, b in zip(ref[batched], ref[single]))
    times: Dict[int, List[float]] = {batched: [], single: []}
    for r in range(args.reps):
        for wb in ((batched, single) if r % 2 == 0 else (single, batched)):
            times[wb].append(common.timed(lambda: run_all(wb), device))
    result: Dict[str, Any] = {"benchmark": "eval_slide", "machine": common.machine_info(device)}
    result["settings"] = {**vars(args), "sizes": [f"{h}x{w}" for h, w in args.sizes]}
    result["windows_per_rep"] = windows
    for wb in (batched, single):
        med = statistics.median(times[wb])
        result[f"window_batch_{wb}"] = {
            "median_s": round(med, 3), "img_per_s": round(args.images / med, 3),
            "windows_per_s": round(windows / med, 2),
            "all_s": [round(t, 3) for t in times[wb]],
        }
    result["speedup_batched_over_single"] = round(
        result[f"window_batch_{batched}"]["img_per_s"] / result[f"window_batch_{single}"]["img_per_s"], 3)
    result["max_abs_diff_between_modes"] = max_diff
    return result


def main(argv: Optional[List[str]] = None) -> int:
    print(json.dumps(run(parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
