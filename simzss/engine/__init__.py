"""Training engine: the accelerate trainer, optimizer and schedule, checkpoints, tracking, preemption.

The trainer (``from simzss.engine.trainer import train, main``) is not imported here, so that the
checkpoint and optimizer helpers can be used without accelerate.
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
