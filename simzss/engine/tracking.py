"""Experiment tracking for the trainer: ``metrics.jsonl`` always, plus wandb or TensorBoard, and the wall-clock
throughput of each log window (:class:`ThroughputWindow`).

Only the main process constructs a :class:`MetricLogger` with ``enabled=True``; other ranks get a
disabled one so that call sites need no rank checks. Every row carries ``time`` (unix seconds, wall clock).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

log = logging.getLogger(__name__)

REPORT_TO = ("none", "wandb", "tensorboard")


def new_run_id() -> str:
    """A short random id; reused on resume so wandb continues the same run."""
    return uuid.uuid4().hex[:8]


def _netrc_has_wandb(env: Mapping[str, str], path: Optional[Path] = None) -> bool:
    """Whether the netrc file (``path``, ``$NETRC`` or ``~/.netrc``) has an entry for the wandb API host
    (``api.wandb.ai``, or the host of ``WANDB_BASE_URL``), as ``wandb login`` writes it."""
    import netrc
    from urllib.parse import urlparse

    if path is None:
        path = Path(env.get("NETRC") or Path.home() / ".netrc")
    if not path.is_file():
        return False
    try:
        hosts = netrc.netrc(str(path)).hosts
    except (OSError, netrc.NetrcParseError) as e:
        log.info("cannot read %s (%s): not using it for wandb credentials", path, e)
        return False
    wanted = {"api.wandb.ai"}
    if env.get("WANDB_BASE_URL"):
        wanted.add(urlparse(env["WANDB_BASE_URL"]).hostname or "")
    return bool(wanted & set(hosts))


def wandb_mode(environ: Optional[Mapping[str, str]] = None, netrc_path: Optional[Path] = None) -> str:
    """The wandb mode to run in: ``WANDB_MODE`` when set; else ``online`` when credentials exist
    (``WANDB_API_KEY``, or a wandb entry in ``~/.netrc``); else ``offline`` (logged at INFO, saying why).

    Decided from the environment and the netrc file only: the network is never probed.
    """
    env = os.environ if environ is None else environ
    mode = env.get("WANDB_MODE", "").strip()
    if mode:
        return mode
    if env.get("WANDB_API_KEY", "").strip():
        return "online"
    if _netrc_has_wandb(env, netrc_path):
        return "online"
    log.info("wandb: offline (no WANDB_API_KEY and no wandb entry in ~/.netrc; set WANDB_MODE=online or run "
             "`wandb login` to sync live, or `wandb sync` the run folder later)")
    return "offline"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf
    return v


class MetricLogger:
    """Writes metric dicts to ``run_dir/metrics.jsonl`` and the configured tracker.

    wandb's mode comes from :func:`wandb_mode` (``WANDB_MODE``, else online with credentials, else offline);
    the run id is passed in so that a resumed job appends to the same wandb run (``resume="allow"``).
    """

    def __init__(
        self,
        run_dir: str | Path,
        report_to: str = "none",
        *,
        run_id: str,
        run_name: str,
        config: Optional[Dict[str, Any]] = None,
        enabled: bool = True,
    ) -> None:
        if report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {report_to!r}")
        self.enabled = enabled
        self.report_to = report_to
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self._wandb: Any = None
        self._tb: Any = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if report_to == "wandb":
            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "simzss"),
                name=run_name,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=wandb_mode(),
                config=config,
            )
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            if config is not None:
                self._tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        """Record ``metrics`` (scalars or 0-d tensors) at ``step``, with ``time`` (unix seconds) unless given."""
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in metrics.items()}
        row.setdefault("time", round(time.time(), 3))
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ThroughputWindow:
    """Wall-clock throughput over a log window: samples/s, the data-wait fraction, mean step and wait times.

    The trainer reads its device values at a log step (a host sync) and only then closes the window, so the
    window's wall time covers exactly the GPU work finished in it; everything in between (data waits,
    checkpoints, evaluation hooks) counts, which is what a user pays for.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start = clock()
        self.samples = 0
        self.steps = 0
        self.wait_at_start = 0.0

    def add(self, samples: int) -> None:
        """Count one step of ``samples`` (this process's batch)."""
        self.samples += samples
        self.steps += 1

    def close(self, wait_seconds: float, world_size: int = 1) -> Dict[str, float]:
        """The window's row and a new window from now. ``wait_seconds``: the feed's running total of data wait."""
        now = self.clock()
        seconds = max(now - self.start, 1e-9)
        waited = max(0.0, wait_seconds - self.wait_at_start)
        steps = max(self.steps, 1)
        row = {
            "samples_per_s": self.samples * world_size / seconds,
            "samples_per_s_per_gpu": self.samples / seconds,
            "data_wait_fraction": min(1.0, waited / seconds),
            "data_time": waited / steps,
            "step_time": seconds / steps,
            "window_seconds": seconds,
        }
        self.start, self.samples, self.steps, self.wait_at_start = now, 0, 0, wait_seconds
        return row


__all__ = ["MetricLogger", "ThroughputWindow", "new_run_id", "wandb_mode", "REPORT_TO"]
