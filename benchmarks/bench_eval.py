"""Zero-shot segmentation speed, before / after in one run: the direct path (one image at a time, canvas form of
the sliding windows, full-resolution softmax + background channel + argmax, confusion counted with a host sync
per image) against the batched path of ``simzss.eval`` (:func:`simzss.models.zeroshot.segment_images`: windows of
several images in one forward, separable window assembly, labels without materialising probabilities, confusion
on the device). Prints one JSON object.

Both paths run on the same images with the same random-init model and a random ``--classes`` x D classifier (text
encoding is outside the timed loop, as in evaluation where it runs once per dataset); repetitions alternate the
paths and medians are reported, of wall time and of the process's CPU time (the steadier measure on a shared
machine). The label maps of the two paths are compared pixel by pixel: a random model and a
random classifier make many near-ties, so the share of equal pixels is reported next to the speed.

CPU (truncated tower, VOC-like images):
    python benchmarks/bench_eval.py --device cpu --depth 2 --images 4 --reps 5
GPU (ViT-B/14, bf16 autocast as `simzss eval --mixed-precision bf16`):
    python benchmarks/bench_eval.py --device cuda --vision vit_base_patch14_reg4_dinov2 --images 256 --reps 3 --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

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
    p.add_argument("--sizes", type=_size, nargs="+", default=[(375, 500), (500, 375), (333, 500), (512, 683)],
                   help="HxW of the (random) images, cycled (VOC- and ADE20K-like)")
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--background", choices=["none", "threshold"], default="threshold")
    p.add_argument("--short-side", type=int, default=448)
    p.add_argument("--crop", type=int, default=448)
    p.add_argument("--stride", type=int, default=224)
    p.add_argument("--window-batch", type=int, default=16)
    p.add_argument("--image-batch", type=int, default=8, help="images segmented together (batched path)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def direct_path(model: Any, images: List[torch.Tensor], masks: List[torch.Tensor], cls: torch.Tensor,
                args: argparse.Namespace, thr: Optional[float]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The evaluation loop as it was: per image, resize, canvas-form windows, resize back, softmax, background
    channel, argmax, confusion with a host sync."""
    from simzss.models.zeroshot import get_logit_scale, resized_shape, slide_cosine

    n = cls.shape[0] + (1 if thr is not None else 0)
    conf = torch.zeros(n, n, dtype=torch.long, device=images[0].device)
    preds = []
    scale = get_logit_scale(model)
    for image, mask in zip(images, masks):
        h, w = image.shape[-2:]
        nh, nw = resized_shape(h, w, args.short_side)
        x = F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False) if (nh, nw) != (h, w) else image
        cos = slide_cosine(model, x, cls, crop=args.crop, stride=args.stride, window_batch=args.window_batch)
        if (nh, nw) != (h, w):
            cos = F.interpolate(cos[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        probs = torch.softmax(cos * scale, dim=0)
        if thr is not None:
            probs = torch.cat([probs.new_full((1, h, w), thr), probs])
        pred = probs.argmax(0)
        valid = (mask >= 0) & (mask < n)
        _ = int(valid.logical_not().sum())  # the old loop read its invalid-pixel count back per image
        conf += torch.bincount(mask[valid] * n + pred[valid], minlength=n * n).view(n, n)
        preds.append(pred)
    return preds, conf


def batched_path(model: Any, images: List[torch.Tensor], masks: List[torch.Tensor], cls: torch.Tensor,
                 args: argparse.Namespace, thr: Optional[float]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """What ``evaluate_segmentation`` does now: ``image_batch`` images at a time, confusion on the device."""
    from simzss.eval.metrics import confusion_matrix
    from simzss.models.zeroshot import segment_images

    n = cls.shape[0] + (1 if thr is not None else 0)
    conf = torch.zeros(n + 1, n, dtype=torch.long, device=images[0].device)
    preds: List[torch.Tensor] = []
    for s in range(0, len(images), args.image_batch):
        chunk = segment_images(model, images[s : s + args.image_batch], cls, short_side=args.short_side,
                               crop=args.crop, stride=args.stride, window_batch=args.window_batch,
                               background=args.background, bg_threshold=thr)
        for pred, mask in zip(chunk, masks[s : s + args.image_batch]):
            conf += confusion_matrix(pred, mask, n)
        preds += chunk
    return preds, conf[:n]


def forward_only(model: Any, images: List[torch.Tensor], masks: List[torch.Tensor], cls: torch.Tensor,
                 args: argparse.Namespace, thr: Optional[float]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The vision tower and the patch-level scores alone (what both paths must compute): the rest of each path's
    time is resizing, window assembly, softmax / argmax and counting."""
    from simzss.models.zeroshot import get_patch_size, plan_windows, window_crops, window_logits, resized_shape

    crops = []
    for image in images:
        h, w = resized_shape(*image.shape[-2:], args.short_side)
        x = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
        crops.append(window_crops(x, plan_windows(h, w, args.crop, args.stride, get_patch_size(model))))
    window_logits(model, crops, cls, args.window_batch)
    return [], torch.zeros(0)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from simzss.models.zeroshot import resized_shape, slide_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    torch.manual_seed(0)
    names = common.class_names(10)
    tokenizer = common.train_tokenizer(names, vocab_size=300)
    model = common.build_model(tokenizer, vision=common.vision_config(args.vision, args.depth), text_layers=1,
                               text_width=64, text_heads=2, context_length=16, device=device).eval()
    cls = F.normalize(torch.randn(args.classes, model.embed_dim, device=device), dim=-1)
    sizes = [args.sizes[i % len(args.sizes)] for i in range(args.images)]
    images = [torch.randn(1, 3, h, w, device=device) for h, w in sizes]
    n = args.classes + (1 if args.background == "threshold" else 0)
    masks = [torch.randint(0, n, (h, w), device=device) for h, w in sizes]
    thr = 1.5 / args.classes if args.background == "threshold" else None  # near the uniform probability: both branches
    windows = sum(len(slide_windows(*resized_shape(h, w, args.short_side), args.crop, args.stride)) for h, w in sizes)
    autocast: Callable[[], Any] = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 \
        else contextlib.nullcontext

    def timed(fn: Callable[..., Any]) -> Tuple[Tuple[float, float], Any]:
        """(wall seconds, this process's CPU seconds) of one call, and its output."""
        out: List[Any] = []

        def call() -> None:
            with torch.no_grad(), autocast():
                out.append(fn(model, images, masks, cls, args, thr))

        cpu = time.process_time()
        wall = common.timed(call, device)
        return (wall, time.process_time() - cpu), out[0]

    paths = {"direct": direct_path, "batched": batched_path, "forward_only": forward_only}
    results = {name: timed(fn)[1] for name, fn in paths.items()}  # warm-up, and the agreement check
    order = list(paths)
    same = sum(int((a == b).sum()) for a, b in zip(results["direct"][0], results["batched"][0]))
    total = sum(p.numel() for p in results["direct"][0])
    times: Dict[str, List[float]] = {name: [] for name in paths}
    cpu: Dict[str, List[float]] = {name: [] for name in paths}
    for r in range(args.reps):
        for name in (order if r % 2 == 0 else order[::-1]):
            (wall, used), _ = timed(paths[name])
            times[name].append(wall)
            cpu[name].append(used)
    out: Dict[str, Any] = {"benchmark": "eval_slide", "machine": common.machine_info(device)}
    out["settings"] = {**vars(args), "sizes": [f"{h}x{w}" for h, w in args.sizes]}
    out["windows_per_rep"] = windows
    for name in paths:
        med = statistics.median(times[name])
        out[name] = {"median_s": round(med, 3), "img_per_s": round(args.images / med, 3),
                     "windows_per_s": round(windows / med, 2), "all_s": [round(t, 3) for t in times[name]],
                     "median_cpu_s": round(statistics.median(cpu[name]), 3),
                     "all_cpu_s": [round(t, 3) for t in cpu[name]]}
    out["speedup_batched_over_direct"] = round(out["batched"]["img_per_s"] / out["direct"]["img_per_s"], 3)
    # on a shared machine the process's own CPU time is the steadier measure (others' load inflates wall time)
    out["cpu_time_ratio_direct_over_batched"] = round(out["direct"]["median_cpu_s"] / out["batched"]["median_cpu_s"], 3)
    fwd = out["forward_only"]["median_cpu_s"]
    out["cpu_s_beyond_the_forward"] = {name: round(out[name]["median_cpu_s"] - fwd, 3) for name in ("direct", "batched")}
    out["equal_label_pixels"] = same / total
    out["confusion_equal"] = bool(torch.equal(results["direct"][1], results["batched"][1]))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    print(json.dumps(run(parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
