"""Training-step time of SimZSS against LiT on the same model and batch; prints one JSON object.

One random-init model (frozen timm DINOv2 tower + from-scratch text tower) and one batch of captions with
``--concepts`` in-bank concepts each (drawn from ``--classes`` bank names). SimZSS and LiT differ only in
``concept_weight`` (0.05 vs 0: LiT skips the concept branch), so the ratio is exactly the concept loss's cost:
text span pooling, patch-query softmax pooling, prototypes and the concept cross-entropy. Each repetition runs
``--steps`` SimZSS steps then ``--steps`` LiT steps (forward + backward + AdamW step, the trainer's optimizer),
alternating which goes first, after ``--warmup`` steps of each; medians over repetitions (plus the ratio of the
best times and the median per-repetition ratio, which resist load from other processes on a shared machine).
``--cached`` feeds cached features instead of images (the vision tower is then out of the step). Target:
simzss/lit <= 1.01 (full step) and <= 1.05 (cached step).

In the same run (issue 20): ``simzss_legacy`` is the former concept branch (valid concepts selected on the host
after one device->host read, present classes by ``torch.unique``), kept here only to measure the change;
``--dynamic-padding`` adds ``simzss_trimmed``, the SimZSS step on the batch trimmed by
``simzss.data.padding.trim_padding``. MFU: FLOPs per sample from the model's shapes
(:mod:`simzss.models.flops`: vision forward once, text tower + projection 3x, loss heads 2-3x, attention
included; SimZSS and LiT each with their own count)
times samples/s over ``--peak-tflops`` (default 989.5: the H200 SXM's dense bf16 peak from NVIDIA's data sheet,
1,979 with 2:4 sparsity; the issue quotes about 790 TFLOP/s as measured for large bf16 matmuls, pass that for
"achievable" utilisation). ``--profile FILE`` writes a torch.profiler summary of one step of each method (top
ops by self time, op and kernel-launch counts, host-sync ops).

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
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from simzss.data.padding import trim_padding  # noqa: E402
from simzss.models.flops import TowerShape, train_flops_per_sample  # noqa: E402


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
    p.add_argument("--class-table", choices=("bank", "slots"), default="bank",
                   help="concept class table: one row per bank class (the trainer sets the bank size) or per slot")
    p.add_argument("--no-legacy", action="store_true", help="skip the former concept branch (simzss_legacy)")
    p.add_argument("--dynamic-padding", action="store_true", help="also time SimZSS on the trimmed batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the text tower (model.text.compile)")
    p.add_argument("--peak-tflops", type=float, default=989.5, help="the chip's peak for MFU (H200 bf16 dense)")
    p.add_argument("--profile", default=None, help="write a torch.profiler summary (JSON) to this file")
    return p.parse_args(argv)


def legacy_forward(self: Any, batch: Any) -> Any:
    """The concept branch as it was before issue 20, self-contained (one process): one host read of the labels,
    the valid slots selected on the host, present classes by ``torch.unique``, the loss over the selected
    concepts. Bound to a model instance to time it against the fixed-shape branch; the library keeps only that."""
    import torch.nn.functional as F

    from simzss.losses import contrastive_loss, pool_visual_concepts
    from simzss.models.simzss import SimZSSOutput
    from simzss.models.text import is_right_padded

    mask = self._concept_mask(batch)
    valid = (batch.concept_labels >= 0) & mask.any(-1)
    slot_labels = torch.where(valid, batch.concept_labels, torch.full_like(batch.concept_labels, -1)).reshape(-1)
    host = torch.cat([is_right_padded(batch.attention_mask).long().reshape(1), slot_labels.long()]).cpu()  # the sync
    cls, patches = self._vision_features(batch)
    tokens, pooled = self.text(batch.input_ids, batch.attention_mask, right_padded=bool(host[0]))
    scale = self.scale()
    global_loss = contrastive_loss(cls, self.text.proj(pooled), scale, equal_sizes=self.equal_batch_sizes)
    if self.concept_weight == 0:
        zero = global_loss.new_zeros(())
        return SimZSSOutput(global_loss, global_loss, zero, torch.full((), float("nan")), 0, 0, scale.detach())
    slots = torch.nonzero(host[1:] >= 0).reshape(-1)
    classes, index = torch.unique(host[1:][slots], sorted=True, return_inverse=True)
    device = batch.concept_labels.device
    slots, index = slots.to(device, non_blocking=True), index.to(device, non_blocking=True)
    text_concepts = self._text_concepts(tokens, mask).index_select(0, slots)  # [n, D]
    members = F.normalize(text_concepts, dim=-1) if self.prototype_member_norm else text_concepts
    protos = F.normalize(members.new_zeros((classes.numel(), members.shape[-1])).index_add(0, index, members), dim=-1)
    picked = protos[index] if self.query == "prototype" else text_concepts
    b, k, _ = mask.shape
    _, h, w, d = patches.shape
    queries = picked.new_zeros((b * k, d)).index_copy(0, slots, picked)
    visual = pool_visual_concepts(patches.reshape(b, h * w, d), queries.reshape(b, k, d), self.tau)
    visual = visual.reshape(b * k, d).index_select(0, slots)
    concept_scale = scale if self.concept_scale is None else self.concept_scale
    logits = concept_scale * F.normalize(visual, dim=-1) @ protos.T
    pred = logits.detach().argmax(-1)
    concept = F.cross_entropy(logits, pred if self.concept_target == "argmax" else index)
    accuracy = (pred == index).float().mean()
    loss = global_loss + self.concept_weight * concept
    return SimZSSOutput(loss, global_loss, concept, accuracy, int(slots.numel()), int(classes.numel()), scale.detach())


#: ops that make the host wait for the device (on an accelerator): scalar reads, data-dependent shapes, D2H copies
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::masked_select", "aten::is_nonzero")


def profile_summary(step: Any, methods: List[str], device: torch.device, top: int = 15) -> Dict[str, Any]:
    """One profiled model step (forward + backward) per method: aten op count, kernel launches (CUDA), host-sync
    ops, and the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    summary: Dict[str, Any] = {}
    for method in methods:
        step(method)  # warm
        common.sync(device)
        with profile(activities=activities) as prof:
            step(method)
            common.sync(device)
        events = prof.key_averages()
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
        summary[method] = {
            "ops": int(sum(e.count for e in events if e.key.startswith("aten::"))),
            "distinct_ops": int(sum(1 for e in events if e.key.startswith("aten::"))),
            "kernel_launches": int(sum(e.count for e in events if e.key == "cudaLaunchKernel")) if device.type == "cuda" else None,
            "sync_ops": {e.key: int(e.count) for e in events if e.key in SYNC_OPS},
            "self_cpu_ms_total": round(sum(e.self_cpu_time_total for e in events) / 1000, 3),
            "top_ops_by_self_cpu": [
                {"op": e.key, "calls": int(e.count), "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3)}
                for e in rows[:top]
            ],
        }
    return summary


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
    # tokenize_batch pads to the longest caption; the baseline padded to the full context: time both the
    # full-context batch and trim_padding of it (on the CPU batch, as the trainer does it)
    full = trim_padding(batch, multiple=args.context_length, pad_id=tokenizer.pad_token_id,
                        max_length=args.context_length)
    trimmed = trim_padding(full, pad_id=tokenizer.pad_token_id, max_length=args.context_length).to(device)
    full = full.to(device)
    batch = batch.to(device)
    model.right_padded_inputs = True  # tokenize_batch pads on the right; the trainer promises it the same way
    model.concept_classes = args.classes if args.class_table == "bank" else None
    if args.compile:
        model.text.compile()
    optimizer = common.build_optimizer(model, args.batch_size)
    amp = torch.bfloat16 if args.bf16 else None
    weights = {"simzss": 0.05, "lit": 0.0}
    if not args.no_legacy:
        weights["simzss_legacy"] = 0.05
    if args.dynamic_padding:
        weights["simzss_full_context"] = 0.05
        weights["simzss_trimmed"] = 0.05
    new_forward = model.forward
    data_of = {"simzss_trimmed": trimmed, "simzss_full_context": full}

    def prepare(method: str) -> Any:
        model.concept_weight = weights[method]
        model.forward = types.MethodType(legacy_forward, model) if method == "simzss_legacy" else new_forward
        return data_of.get(method, batch)

    def steps(method: str, n: int) -> Any:
        data = prepare(method)
        out = None
        for _ in range(n):
            out = common.train_step(model, optimizer, data, amp)
        return out

    def model_step(method: str) -> None:
        """forward + backward only (the optimizer step is the same for every method)"""
        data = prepare(method)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(data)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    for method in weights:
        steps(method, args.warmup)
    per_step: Dict[str, List[float]] = {m: [] for m in weights}
    peak_gib: Dict[str, float] = {m: 0.0 for m in weights}
    for r in range(args.reps):
        order = list(weights) if r % 2 == 0 else list(reversed(list(weights)))
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
    for method in weights:
        if method not in ("simzss", "lit"):
            result[f"ratio_{method}_over_lit"] = round(result[method]["median_ms"] / result["lit"]["median_ms"], 4)
            result[f"ratio_{method}_over_lit_per_rep_median"] = round(
                sorted(s / l for s, l in zip(per_step[method], per_step["lit"]))[args.reps // 2], 4)
    if args.dynamic_padding:
        result["text_length"] = {"full_context": int(full.input_ids.shape[1]), "longest": int(batch.input_ids.shape[1]),
                                 "trimmed": int(trimmed.input_ids.shape[1])}
        result["ratio_trimmed_over_full_context"] = round(
            result["simzss_trimmed"]["median_ms"] / result["simzss_full_context"]["median_ms"], 4)
        result["ratio_trimmed_over_full_context_per_rep_median"] = round(sorted(
            t / f for t, f in zip(per_step["simzss_trimmed"], per_step["simzss_full_context"]))[args.reps // 2], 4)
    patch = 14
    vshape = None
    if not args.cached and model.vision is not None:
        vm = model.vision.model
        vshape = TowerShape(len(vm.blocks), model.vision.embed_dim, vm.blocks[0].mlp.fc1.out_features / model.vision.embed_dim)
        patch = model.vision.patch_size
    prefix = model.vision.num_prefix_tokens if model.vision is not None else 5
    def flops_of(slots: int) -> Dict[str, float]:
        return train_flops_per_sample(
            vshape, TowerShape(args.text_layers, args.text_width), image_size=args.image_size, patch_size=patch,
            prefix_tokens=prefix, context_length=int(batch.input_ids.shape[1]), embed_dim=model.embed_dim,
            batch_size=args.batch_size, concept_slots=slots, concept_pooling=model.concept_pooling,
            class_table_rows=model.concept_classes or int(out.num_classes))

    flops = {"simzss": flops_of(int(batch.concept_labels.shape[1])), "lit": flops_of(0)}
    result["gflop_per_sample"] = {m: {k: round(v / 1e9, 4) for k, v in f.items()} for m, f in flops.items()}
    result["peak_tflops"] = args.peak_tflops
    for method in ("simzss", "lit"):
        achieved = flops[method]["total"] * result[method]["img_per_s"]
        result[method]["mfu"] = round(achieved / (args.peak_tflops * 1e12), 4)
    # robust companions on a shared machine: the ratio of best times (interference only ever adds time) and the
    # median of the per-repetition ratios (adjacent runs see similar load)
    result["ratio_of_min"] = round(result["simzss"]["min_ms"] / result["lit"]["min_ms"], 4)
    pairs = sorted(s / l for s, l in zip(per_step["simzss"], per_step["lit"]))
    result["ratio_per_rep_median"] = round(pairs[len(pairs) // 2], 4)
    if device.type == "cuda":  # per method: the peak is reset before each timed block
        for method in weights:
            result[method]["peak_mem_gib"] = round(peak_gib[method], 2)
    if args.profile:
        summary = {"benchmark": "train_step_profile", "settings": result["settings"], "machine": result["machine"],
                   "profile": profile_summary(model_step, list(weights), device)}
        Path(args.profile).write_text(json.dumps(summary, indent=1) + "\n")
        result["profile_file"] = args.profile
    return result


def main(argv: Optional[List[str]] = None) -> int:
    print(json.dumps(run(parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
