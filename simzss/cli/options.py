"""The options and exit codes every ``simzss`` command shares (the CLI convention in CONTRIBUTING.md).

This module is imported before argument parsing, so it stays light: the standard library and
``simzss.helpformat`` only. No torch, spaCy or Gradio here (``--help`` must stay fast).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

from simzss.helpformat import HelpFormatter

#: a usage or config error: bad options, a bad config value, a missing or wrong input named by the user
EXIT_USAGE = 2
#: the run itself failed: an input broke mid-way, a write failed, training diverged
EXIT_FAILED = 1

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def command_parser(name: str, description: str, examples: Sequence[str], **kwargs) -> argparse.ArgumentParser:
    """The parser of ``simzss NAME``: one help style for all commands.

    ``description`` is a sentence or two saying what the command is for (no ``simzss NAME:`` prefix; argparse
    prints the usage line above it); ``examples`` are full command lines, shown under ``examples:``.
    """
    if not examples:
        raise ValueError(f"simzss {name}: every command's help shows at least one example")
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return argparse.ArgumentParser(prog=f"simzss {name}", description=description, epilog=epilog,
                                   formatter_class=HelpFormatter, **kwargs)


def device_type(value: str) -> str:
    """argparse type of ``--device``: auto, cpu, cuda or cuda:N.

    ``mps`` (Apple GPUs), which ``segment``, ``serve`` and ``cache-features`` took before the convention, keeps
    working for one release with a deprecation line: ``auto`` picks MPS when there is no CUDA GPU.
    """
    if value == "mps":
        print("simzss: --device mps is deprecated and will be removed in the next release; use --device auto "
              "(it picks Apple's MPS when there is no CUDA GPU)", file=sys.stderr)
        return value
    if not _DEVICE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N")
    return value


def add_device(parser: argparse.ArgumentParser, *, default: str = "auto") -> None:
    """``--device auto|cpu|cuda[:i]``: where the model runs (auto: the first GPU if there is one, else the CPU)."""
    parser.add_argument("--device", type=device_type, default=default, metavar="auto|cpu|cuda[:i]",
                        help="where the model runs; auto takes the first GPU when there is one, else the CPU")


class DeviceError(ValueError):
    """``--device`` names a device this machine does not have (a usage error: exit code 2)."""


def resolve_device(name: str):  # -> torch.device (torch is imported here, after parsing, to keep --help fast)
    """The torch device for ``--device NAME``: auto picks CUDA, then Apple MPS, then the CPU; an explicit
    ``cuda``/``cuda:i`` must exist (:class:`DeviceError` saying what there is otherwise)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"--device {name}: Apple's MPS is not available on this machine; use --device auto")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {name}: CUDA is not available on this machine; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def select_cuda_device(device: str) -> Optional[str]:
    """For ``--device cuda:i``, make GPU i the only one this process sees, before torch initialises CUDA (so
    accelerate and every library put the model there); returns a usage-error line, or None.

    Under a multi-process launch (``WORLD_SIZE`` > 1) each process gets its GPU from the launcher, so only
    ``cuda`` (or auto) fits there.
    """
    if not device.startswith("cuda:"):
        return None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return f"--device {device}: under a multi-process launch each process gets its GPU from the launcher; use --device cuda"
    index = int(device.split(":", 1)[1])
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and index >= len(visible):
        return f"--device {device}: CUDA_VISIBLE_DEVICES lists {len(visible)} device(s)"
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    return None


def add_overwrite(parser: argparse.ArgumentParser, what: str = "the output") -> None:
    """``--overwrite``: replace an existing output instead of refusing."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists")


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars or periodic progress lines."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress log lines")


def add_max_pixels(parser: argparse.ArgumentParser, default: int) -> None:
    """``--max-pixels N``: refuse images with more pixels (decompression bombs)."""
    parser.add_argument("--max-pixels", type=int, default=default, metavar="N",
                        help="refuse input images with more pixels than this")


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Keep an old option spelling working for one release: parses like ``new`` and prints a deprecation line.

    ``kwargs`` are those of ``add_argument`` for the old spelling (``dest`` should be the new option's).
    """

    class _Deprecated(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):  # noqa: ANN001
            print(f"{parser.prog}: {old} is deprecated and will be removed in the next release; use {new}",
                  file=sys.stderr)
            setattr(namespace, self.dest, self.const if values is None or values == [] else values)

    parser.add_argument(old, action=_Deprecated, help=f"deprecated spelling of {new} (removed in the next release)",
                        **kwargs)


def fail(command: str, message: str, code: int = EXIT_FAILED) -> int:
    """Print the one-line error ``simzss COMMAND: MESSAGE`` to stderr and return the exit code."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"simzss {command}: {first}", file=sys.stderr)
    return code


def usage_error(command: str, message: str) -> int:
    """A usage or config error: one line on stderr, exit code 2."""
    return fail(command, message, EXIT_USAGE)


def missing_inputs(paths: Iterable[str]) -> Optional[str]:
    """The first of ``paths`` that is a local path and does not exist (None if all exist, or are URLs/pipes)."""
    for p in paths:
        if "://" in p or p.startswith("pipe:"):
            continue
        if not Path(p).exists():
            return p
    return None


def os_error_line(e: OSError) -> str:
    """One line for a failed read or write: ``PATH: reason`` (no traceback, no errno noise)."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        reason += " (free some space or write elsewhere)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += " (choose a folder you can write to)"
    return f"{e.filename}: {reason}" if e.filename else reason


def unwritable(path: str | os.PathLike, *, folder: bool = False) -> Optional[str]:
    """Why ``path`` (a file, or a folder when ``folder``) cannot be written, or None when it can.

    Probes the nearest existing folder with a real temporary file rather than ``os.access``, which says yes to
    root on a read-only mount. Creates nothing that stays behind.
    """
    p = Path(path).expanduser()
    if p.exists() and p.is_dir() != folder:
        return f"cannot write {p}: it is {'a file' if folder else 'a folder'}, expected {'a folder' if folder else 'a file'}"
    probe = p if folder else p.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot write {p}: {probe} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        e.filename = None
        return f"cannot write {p}: the folder {probe} is not writable ({os_error_line(e)})"
    return None


__all__ = [
    "DeviceError", "EXIT_FAILED", "EXIT_USAGE", "add_device", "resolve_device", "add_max_pixels", "add_no_progress", "add_overwrite",
    "command_parser", "deprecated_alias", "device_type", "fail", "missing_inputs", "os_error_line", "select_cuda_device", "unwritable",
    "usage_error",
]
