"""Shared pieces of the benchmarks: machine description, synthetic captions with concepts, a random-init
SimZSS model, training batches and a timed training step. Benchmarks import this as ``common`` (they put their
own folder on ``sys.path``), print one JSON object and never download anything."""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

# runnable as `python benchmarks/bench_x.py` from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simzss.config import ModelConfig, OptimConfig, TextConfig, VisionConfig  # noqa: E402

CaptionConcepts = List[Tuple[int, List[Tuple[int, int]]]]

_TEMPLATES = (
    "a photo of {0} next to {1}.",
    "{0} and {1} in front of {2}.",
    "{0} with {1}, {2} and {3}.",
    "a picture showing {0}, {1}, {2} and {3} near {4}.",
    "{0} beside {1} under {2}, with {3} in the background.",
)


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on (the lead copies this into RESULTS.md)."""
    info: Dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device`` value, defaulting to CUDA when present; refuses a CUDA request without a GPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible")
    return device


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def class_names(num_classes: int) -> List[str]:
    """The first ``num_classes`` names of the built-in concept bank (realistic words for the tokenizer)."""
    from simzss.concepts import ConceptBank

    names = ConceptBank.default().names
    if num_classes > len(names):
        raise ValueError(f"at most {len(names)} classes available, asked for {num_classes}")
    return names[:num_classes]


def synthetic_captions(n: int, names: Sequence[str], concepts: Tuple[int, int] = (3, 5),
                       seed: int = 0) -> List[Tuple[str, CaptionConcepts]]:
    """``n`` captions naming ``concepts[0]..concepts[1]`` distinct classes each, with their char spans.

    Realistic concept load for the concept loss: the paper's captions (COCO) carry ~3-5 in-bank concepts.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(*concepts)
        ids = rng.sample(range(len(names)), k)
        template = next(t for t in _TEMPLATES if t.count("{") == k)
        head, *parts = template.split("{")  # parts: "0} and ", "1}.", ...
        caption, spans = head, []
        for j, part in enumerate(parts):
            word = names[ids[j]]
            spans.append((ids[j], [(len(caption), len(caption) + len(word))]))
            caption += word + part[2:]
        out.append((caption, spans))
    return out


def train_tokenizer(captions: Sequence[str], vocab_size: int = 2048) -> Any:
    """A byte-level BPE trained on the benchmark captions (``simzss.data.tokenize``), in a temp folder."""
    from simzss.data.tokenize import train_bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return train_bpe_tokenizer(list(captions), Path(tmp) / "tok", vocab_size=vocab_size, min_frequency=1)


def vision_config(name: str, depth: Optional[int], weights: Optional[str] = None) -> VisionConfig:
    """A random-init (or local-weights) timm tower; ``depth`` truncates it for CPU runs."""
    kwargs: Dict[str, Any] = {"depth": depth} if depth else {}
    return VisionConfig(name=name, pretrained=False, weights=weights, model_kwargs=kwargs)


def build_model(tokenizer: Any, *, vision: VisionConfig, text_layers: int, text_width: int, text_heads: int,
                context_length: int, device: torch.device, build_vision: bool = True,
                concept_weight: float = 0.05) -> Any:
    """A random-init SimZSS (``concept_weight=0`` is LiT) on ``device``, in train mode."""
    from simzss.models.simzss import SimZSS

    cfg = ModelConfig(vision=vision, text=TextConfig(layers=text_layers, width=text_width, heads=text_heads,
                                                     context_length=context_length),
                      concept_weight=concept_weight)
    return SimZSS.from_config(cfg, tokenizer, build_vision=build_vision).to(device).train()


def make_batch(tokenizer: Any, captions: Sequence[Tuple[str, CaptionConcepts]], *, context_length: int,
               images: Optional[torch.Tensor] = None, vision_cls: Optional[torch.Tensor] = None,
               vision_patches: Optional[torch.Tensor] = None) -> Any:
    """A training ``Batch`` from captions (with concept spans) and images or cached features."""
    from simzss.data.stream import Batch
    from simzss.data.tokenize import tokenize_batch

    tok = tokenize_batch(tokenizer, [c for c, _ in captions], [s for _, s in captions], context_length)
    return Batch(images=images, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                 concept_mask=tok["concept_mask"], concept_labels=tok["concept_labels"],
                 captions=[c for c, _ in captions], keys=[str(i) for i in range(len(captions))],
                 vision_cls=vision_cls, vision_patches=vision_patches)


def build_optimizer(model: torch.nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """The trainer's AdamW (``simzss.engine.optim``): decay on matrices only, default hyper-parameters."""
    from simzss.engine.optim import build_optimizer as build

    return build(model, OptimConfig(), global_batch)


def train_step(model: Any, optimizer: torch.optim.Optimizer, batch: Any, amp_dtype: Optional[torch.dtype]) -> Any:
    """forward + backward + AdamW step, as the trainer does it (autocast when ``amp_dtype``)."""
    device = next(model.text.parameters()).device
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary_ms(seconds: Sequence[float]) -> Dict[str, float]:
    """Median / min / max of per-call times, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2)}
