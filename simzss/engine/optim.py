"""AdamW with open_clip-style parameter groups, the warmup + cosine learning-rate schedule, and the sync-free
skip of a non-finite step (the fused AdamW kernel's ``found_inf`` input)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from simzss.config import OptimConfig


def _exclude_from_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: no weight decay on 1-D tensors (norms, biases, scalars), biases and logit scales."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf == "bias" or "logit_scale" in name or "concept_scale" in name


def param_groups(named_params: Iterable[Tuple[str, nn.Parameter]], weight_decay: float) -> List[Dict[str, Any]]:
    """Split the trainable parameters into a decayed and a non-decayed AdamW group.

    Frozen parameters (``requires_grad=False``, e.g. the vision tower) are left out. Each group
    carries a ``names`` list (ignored by torch) so the split can be inspected and tested.
    """
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    decay_names: List[str] = []
    no_decay_names: List[str] = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if _exclude_from_decay(name, p):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The base learning rate, multiplied by ``global_batch / 256`` when ``cfg.scale_lr``."""
    return cfg.lr * global_batch / 256 if cfg.scale_lr else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (decay on matrices only).

    The fused implementation (CPU and CUDA) is used: besides being one kernel per step, it takes a ``found_inf``
    flag on the device and then leaves parameters, moments and step count untouched, so the trainer can skip a
    non-finite step without reading the flag on the host (:func:`step_unless`).
    """
    groups = param_groups(model.named_parameters(), cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(
        groups, lr=scaled_lr(cfg, global_batch), betas=tuple(cfg.betas), eps=cfg.eps,  # type: ignore[arg-type]
        fused=True,
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` honours a ``found_inf`` tensor (fused Adam/AdamW: torch's AMP protocol)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups
    )


def step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor, step: Callable[[], Any]) -> None:
    """Run ``step()`` (the optimizer step, possibly through a wrapper) unless the 0-d device flag ``bad`` is set.

    With a fused optimizer the flag goes to the kernel as ``found_inf``: nothing waits for the GPU. Otherwise the
    flag is read on the host (one sync) and the step is skipped there.
    """
    if skips_on_device(optimizer):
        optimizer.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
        try:
            step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif not bool(bad.item()):
        step()


def match_fused_state(optimizer: torch.optim.Optimizer, fresh_groups: List[Dict[str, Any]]) -> None:
    """After ``load_state_dict`` of a state saved by another AdamW implementation (e.g. a checkpoint of the
    non-fused optimizer), restore this optimizer's implementation flags and put the step counters where the
    fused kernel needs them (float32 on the parameter's device)."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        for key in ("fused", "foreach", "capturable"):
            if key in fresh:
                group[key] = fresh[key]
        if group.get("fused"):
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


class WarmupCosine:
    """LR multiplier: linear warmup ``(step + 1) / warmup_steps``, then cosine decay to 0 at ``total_steps``.

    A class (not a lambda) so that ``LambdaLR.state_dict`` records its parameters.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float) -> LambdaLR:
    """Warmup over ``warmup`` (a fraction of ``total_steps``), then cosine; stepped once per optimizer step."""
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"optim.warmup is a fraction of the run in [0, 1), got {warmup}")
    return LambdaLR(optimizer, WarmupCosine(round(warmup * total_steps), total_steps))


__all__ = ["param_groups", "scaled_lr", "build_optimizer", "skips_on_device", "step_unless", "match_fused_state",
           "WarmupCosine", "build_scheduler"]
