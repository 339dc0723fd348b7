"""What a weights file is, told from its bytes without running anything in it.

Three readers take weights files from users: the vision tower (``model.vision.weights``), ``import-official`` and
the baselines (``gem:ARCH@FILE``). Before handing a file to a loader they need the same two facts: what its first
bytes say it is (torch's zip, a pickle, safetensors, or something else, named), and, for a pickle, what it would
import when unpickled. Each reader keeps its own words for a refusal; the facts come from here.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional

TORCH_ZIP = "torch-zip"  # torch.save's format since PyTorch 1.6
PICKLE = "pickle"  # torch's legacy format (_use_new_zipfile_serialization=False) or a raw pickle
SAFETENSORS = "safetensors"
#: The kinds :func:`sniff` gives for bytes that may hold weights; anything else it returns describes the file.
WEIGHTS_KINDS = (TORCH_ZIP, PICKLE, SAFETENSORS)
#: How many first bytes :func:`sniff` needs to tell the kinds apart.
HEAD_BYTES = 64

_ZIP = b"PK\x03\x04"
_PICKLE_PROTOCOLS = (2, 3, 4, 5)  # torch.save(_use_new_zipfile_serialization=False) writes protocol 2
# First bytes of files people hand over by mistake -> what to call them.
_FOREIGN = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image, WAV audio...)"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip file"),
    (b"BZh", "a bzip2 file"),
    (b"\xfd7zXZ", "an xz file"),
)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
#: What torch's own checkpoints import: the weights-only unpickler allows these.
_TORCH_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set")


def sniff(head: bytes, size: Optional[int] = None) -> str:
    """What the first bytes ``head`` (at least :data:`HEAD_BYTES` when the file has them) of a file of ``size``
    bytes say it is: one of :data:`WEIGHTS_KINDS`, or a description of what it is instead (``"an empty file"``,
    ``"a PNG image"``, ``"a text file"``, ``"unrecognised bytes"``...). A safetensors header must fit in
    ``size`` when it is given."""
    if head.startswith(_ZIP):
        return TORCH_ZIP
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:  # the PROTO opcode
        return PICKLE
    if not head:
        return "an empty file"
    for magic, kind in _FOREIGN:
        if head.startswith(magic):
            return kind
    if len(head) >= 9 and head[8:9] == b"{" and (size is None or 8 + int.from_bytes(head[:8], "little") <= size):
        return SAFETENSORS
    for cut in range(4):  # the bytes read may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if all(c.isprintable() or c in "\t\n\r\f" for c in text):
            return "a text file"
        break
    return "unrecognised bytes"


def sniff_file(path: str | os.PathLike) -> str:
    """:func:`sniff` of the file at ``path`` (OSError when it cannot be read)."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    return sniff(head, Path(path).stat().st_size)


def weights_file_kind(path: str | os.PathLike) -> str:
    """``"torch-zip"``, ``"pickle"``, ``"safetensors"`` or ``"unknown"``, from the file's first bytes. Nothing is
    unpickled."""
    kind = sniff_file(path)
    return kind if kind in WEIGHTS_KINDS else "unknown"


def _imports(stream: Any) -> Iterator[str]:
    """The ``module.name`` every import opcode (GLOBAL, STACK_GLOBAL, INST) of the first pickle in ``stream``
    names; the opcodes are only listed, never run."""
    strings: list = []
    for op, arg, _ in pickletools.genops(stream):
        if op.name in _STRING_OPS:
            strings = (strings + [str(arg)])[-2:]
        elif op.name in ("GLOBAL", "INST"):
            yield str(arg).replace(" ", ".")
        elif op.name == "STACK_GLOBAL":
            yield ".".join(strings) if len(strings) == 2 else "?"


def pickled_code(path: str | os.PathLike) -> Optional[str]:
    """What a pickle file (raw, or torch's zip with ``data.pkl``) imports beyond torch's own tensor rebuilding,
    e.g. ``"GLOBAL posix.system"``; None when it imports nothing else or is not a pickle at all."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with zf.open(name) as f:
                    found = [g for g in _imports(f) if not g.startswith(_TORCH_GLOBALS)]
        else:
            with open(path, "rb") as f:
                found = [g for g in _imports(f) if not g.startswith(_TORCH_GLOBALS)]
    except Exception:  # noqa: BLE001 - not a parseable pickle: random bytes, a picture, ...
        return None
    return f"GLOBAL {found[0]}" if found else None


__all__ = ["HEAD_BYTES", "PICKLE", "SAFETENSORS", "TORCH_ZIP", "WEIGHTS_KINDS", "pickled_code", "sniff", "sniff_file",
           "weights_file_kind"]
