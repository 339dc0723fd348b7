"""Reading a local CLIP weights file given in a baseline spec (``gem:ViT-B-16@FILE``) without running its code.

open_clip loads the file itself (``weights_only=True``); :func:`check_weights_file` looks at it first, so that a
file that is no weights file, or a pickle that would need code to be unpickled, is refused with one line naming
the file and the fix instead of a traceback. Nothing in the file is ever executed: pickles are read with torch's
weights-only unpickler, and their opcodes are only listed (``pickletools``), never run.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from simzss.weights_files import pickled_code


class WeightsFileError(ValueError):
    """A weights file that cannot be used (the message is one line naming the file and the fix)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else type(e).__name__


EXPECTED_FILE = "expected an open_clip state dict saved with torch.save (.pt/.pth/.bin) or safetensors (.safetensors)"


def _refuse_code(path: Path, what: str) -> WeightsFileError:
    """The refusal ``import-official`` gives for the same kind of file (simzss.io.official), in its words."""
    return WeightsFileError(
        f"{path}: refusing to load a pickle that needs code ({what}), which could run anything; {EXPECTED_FILE} "
        "(re-save it with torch.save(model.state_dict(), PATH) where you trust the file)"
    )


def _not_weights(path: Path, why: str) -> WeightsFileError:
    return WeightsFileError(f"{path}: not a weights file ({why}); {EXPECTED_FILE}")


def check_weights_file(path: str | os.PathLike) -> None:
    """Refuse, with a :class:`WeightsFileError`, a file that is not a readable state dict of tensors or that
    would need pickled code to load; return quietly for a usable one. Reads torch zip files memory-mapped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"open_clip weights file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                if not list(f.keys()):
                    raise _not_weights(p, "the safetensors file holds no tensors")
        except WeightsFileError:
            raise
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends on foreign bytes
            raise _not_weights(p, f"unreadable safetensors: {_one_line(e)}") from None
        return
    if suffix in (".npz", ".npy"):  # big_vision weights: open_clip reads them with numpy, which refuses pickles
        return
    is_zip = zipfile.is_zipfile(p)
    if is_zip:
        with zipfile.ZipFile(p) as zf:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist()):
                raise WeightsFileError(
                    f"{p}: a TorchScript archive (e.g. OpenAI's JIT .pt), which runs code to load; use the built-in "
                    "pretrained tag (e.g. ViT-B-16/openai) or a state dict saved with torch.save(model.state_dict())"
                )
    if p.stat().st_size == 0:
        raise _not_weights(p, "the file is empty")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        what = pickled_code(p)
        if what is None and "global" in str(e).lower():
            what = next((ln.strip().rstrip(".") for ln in str(e).splitlines() if "global" in ln.lower()), "GLOBAL")[:200]
        if what is not None:
            raise _refuse_code(p, what) from None
        raise _not_weights(p, "no torch checkpoint could be read from it") from None
    except Exception as e:  # noqa: BLE001 - torch raises anything (EOFError, RuntimeError, KeyError) on foreign bytes
        raise _not_weights(p, f"{type(e).__name__}: {_one_line(e)}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise _not_weights(p, f"it holds {type(state).__name__}, not named tensors")


__all__ = ["EXPECTED_FILE", "WeightsFileError", "check_weights_file", "pickled_code"]
