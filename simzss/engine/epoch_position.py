"""Where a resumed run continues in its epoch when the global batch changed since the checkpoint: by sample count.

A checkpoint's ``trainer_state.json`` records its global batch and the samples consumed in the epoch
(``samples_in_epoch``). Resumed with the same global batch, the loader's own state is used as it is (the same
batches, bit for bit). With another global batch, the epoch continues at the checkpoint's sample position rounded
down to a whole batch of the new size (at most one batch minus one sample is read again, none is skipped), and a
run planned by epochs gets the steps that finish its epochs from there (issue 18 item 12).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple


def checkpoint_global_batch(state: Mapping[str, Any]) -> int:
    """The global batch a checkpoint was trained with (older checkpoints: batch_size times world size)."""
    if state.get("global_batch") is not None:
        return int(state["global_batch"])
    return int((state.get("config") or {}).get("batch_size", 0)) * int(state.get("world_size") or 1)


def resume_position(state: Mapping[str, Any], global_batch: int, steps_per_epoch: int) -> Optional[Tuple[int, int]]:
    """``(checkpoint's global batch, batches of the new global batch already consumed in its epoch)`` when the
    checkpoint ``state`` (its ``trainer_state.json``; empty when not resuming) was trained with another global
    batch; None when nothing changes."""
    if not state:
        return None
    old_batch = checkpoint_global_batch(state) or global_batch
    if old_batch == global_batch:
        return None
    consumed = int((state.get("loader") or {}).get("batches_consumed", 0))
    samples = int(state.get("samples_in_epoch", consumed * old_batch))
    return old_batch, min(samples // global_batch, steps_per_epoch)


def steps_to_finish(state: Mapping[str, Any], position: Tuple[int, int], steps_per_epoch: int, epochs: int) -> int:
    """The total steps of a run planned by ``epochs`` that resumes from ``state`` at ``position``
    (:func:`resume_position`): the checkpoint's step plus the rest of its epoch and the epochs after it."""
    left_in_epoch = steps_per_epoch - position[1]
    later_epochs = epochs - 1 - int(state["epoch"])
    return int(state["step"]) + max(0, left_in_epoch + later_epochs * steps_per_epoch)


def loader_state_at(loader_state: Mapping[str, Any], position: Tuple[int, int], steps_per_epoch: int) -> Dict[str, Any]:
    """The checkpoint's loader state moved to ``position`` (:func:`resume_position`) in batches of the new size."""
    return dict(loader_state, batches_consumed=position[1], num_batches=steps_per_epoch)


__all__ = ["checkpoint_global_batch", "resume_position", "steps_to_finish", "loader_state_at"]
