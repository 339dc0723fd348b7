"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption, time limit): set a flag, never die mid-step."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class GracefulStop:
    """Context manager that turns SIGTERM/SIGUSR1 into ``self.requested`` (the signal's name).

    The trainer polls the flag once per step, finishes the step, writes a checkpoint and returns.
    Previous handlers are restored on exit. Outside the main thread (where Python cannot install
    handlers) it is inert.
    """

    def __init__(self, signals: tuple = STOP_SIGNALS) -> None:
        self.signals = signals
        self.requested: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            log.warning("received %s: finishing the current step, then checkpointing and exiting", name)
        self.requested = name

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()


__all__ = ["GracefulStop", "STOP_SIGNALS"]
