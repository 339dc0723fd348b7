"""Training engine: the accelerate trainer, optimizer and schedule, checkpoints, tracking, preemption.

The trainer itself is imported lazily (``from simzss.engine.trainer import train``) so that importing
this package stays cheap.
"""

from simzss.engine.checkpoint import latest_checkpoint, list_checkpoints, rotate_checkpoints
from simzss.engine.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups, scaled_lr

__all__ = [
    "latest_checkpoint",
    "list_checkpoints",
    "rotate_checkpoints",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "scaled_lr",
]
