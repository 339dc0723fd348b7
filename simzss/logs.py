"""One log format for every ``simzss`` command, logged once per job (not once per rank), and progress bars that
draw only on a terminal and print a plain line per interval when the output goes to a log file."""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any, Iterable, Optional, TextIO

from tqdm.std import tqdm

#: The format of every command's log lines.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
#: Seconds between two progress lines when stderr is not a terminal.
LOG_PROGRESS_INTERVAL = 30.0
# A plain progress line (no bar characters, no carriage returns) for log files.
_LOG_BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LOG_BAR_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"
_MARK = "_simzss_handler"

log = logging.getLogger("simzss.progress")

# Process-wide default of progress(): set by setup_logging(progress=False) for a command's --no-progress.
_progress_enabled = True


def process_rank() -> int:
    """This process's global rank from the launcher's environment (torchrun/accelerate ``RANK``), 0 otherwise."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return 0


class _RankFilter(logging.Filter):
    """On ranks other than 0 let only errors through: every rank runs the same code, so the rest would repeat."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno < logging.ERROR:
            return False
        record.msg = f"[rank {self.rank}] {record.msg}"
        return True


def setup_logging(level: int = logging.INFO, *, rank: Optional[int] = None, stream: Optional[TextIO] = None,
                  progress: Optional[bool] = None) -> None:
    """Configure the root logger for a command: :data:`LOG_FORMAT` on stderr, Python warnings routed through it.

    Rank 0 (default: from the environment) logs at ``level``; other ranks log errors only, so a message shared by
    all ranks appears once. Calling it again replaces the handler it installed; handlers installed by others
    (pytest, an embedding application) are left alone and only the level is set. ``progress=False`` (a command's
    ``--no-progress``) turns off every progress bar and progress line of the process, whichever layer draws it;
    ``True`` turns them back on; None leaves the setting as it is.
    """
    global _progress_enabled
    if progress is not None:
        _progress_enabled = progress
    rank = process_rank() if rank is None else rank
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, False):
            root.removeHandler(h)
    if not root.handlers:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        handler.addFilter(_RankFilter(rank))
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


class _LogLines:
    """A file-like target for tqdm that turns each refreshed frame into one log record."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def write(self, s: str) -> int:
        line = s.replace("\r", "\n").strip().rsplit("\n", 1)[-1].strip()
        if line:
            self.logger.info(line)
        return len(s)

    def flush(self) -> None:
        pass


class _LogTqdm(tqdm):
    """A tqdm whose frames become log lines: at most one per ``log_interval`` seconds, never the same count twice,
    and the final count when the bar closes.

    tqdm alone does not hold the interval: ``set_postfix``, its monitor thread and ``close`` all redraw, which in a
    log file meant a line every few steps with repeated counts.
    """

    def __init__(self, *args: Any, log_interval: float = LOG_PROGRESS_INTERVAL, **kwargs: Any) -> None:
        self._log_interval = log_interval
        self._logged_n: Optional[float] = None
        self._logged_t = -math.inf
        super().__init__(*args, **kwargs)

    def display(self, msg: Optional[str] = None, pos: Optional[int] = None) -> bool:
        if msg is not None:  # tqdm clearing its line (leave=False): there is nothing to clear in a log
            return True
        if self.n == self._logged_n:
            return True
        now = self._time()
        closing = self.disable  # close() disables the bar before drawing its last frame
        if not closing and now - self._logged_t < self._log_interval:
            return True
        self._logged_n, self._logged_t = self.n, now
        return super().display(msg, pos)


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    """True when ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable: Optional[Iterable[Any]] = None, *, total: Optional[float] = None, desc: Optional[str] = None,
             unit: str = "it", enabled: bool = True, interval: float = LOG_PROGRESS_INTERVAL,
             logger: Optional[logging.Logger] = None, **kwargs: Any) -> tqdm:
    """A tqdm progress bar: drawn in place on a terminal; elsewhere one log line every ``interval`` seconds.

    ``enabled=False`` (e.g. ``--no-progress``, or a rank other than 0) returns a disabled bar that still counts;
    so does every bar after ``setup_logging(progress=False)``. Extra keyword arguments go to tqdm (``initial``,
    ``leave``, ...).
    """
    disable = not enabled or not _progress_enabled or process_rank() != 0
    if is_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    fmt = _LOG_BAR_FORMAT if total is not None else _LOG_BAR_FORMAT_NO_TOTAL
    return _LogTqdm(iterable, total=total, desc=desc or "progress", unit=unit, disable=disable,
                    file=_LogLines(logger or log), mininterval=interval, maxinterval=max(interval, 10.0),
                    bar_format=fmt, ascii=True, log_interval=interval, **kwargs)


__all__ = ["DATE_FORMAT", "LOG_FORMAT", "LOG_PROGRESS_INTERVAL", "is_terminal", "process_rank", "progress",
           "setup_logging"]
