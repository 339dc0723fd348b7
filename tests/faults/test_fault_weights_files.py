"""A foreign ``model.vision.weights`` file (issue 18 item 9): random bytes, an empty or cut file and a pickle that
needs code are each refused with one line that names the file and says what it is, and nothing in them runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from simzss.config import VisionConfig
from simzss.models.vision import build_vision_tower
from simzss.weights_files import pickled_code, sniff, weights_file_kind

VIT = "vit_small_patch14_reg4_dinov2"
TINY = {"depth": 1, "embed_dim": 16, "num_heads": 2, "img_size": 28}


class _Payload:
    """Unpickling this calls ``os.system`` (through ``__reduce__``): it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _load(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        build_vision_tower(VisionConfig(name=VIT, pretrained=False, weights=str(path), model_kwargs=TINY))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("name", ["random.pth", "random.safetensors", "random.bin", "random"])
def test_random_bytes_are_not_called_a_pickle(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    assert weights_file_kind(path) == "unknown"
    message = _load(path)
    assert "not a torch or safetensors weights file" in message and "pickle" not in message


def test_empty_file_is_not_a_weights_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "not a torch or safetensors weights file" in _load(tmp_path / "empty.pth")


def test_pickle_with_code_is_refused_as_such_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    for path in (tmp_path / "evil.pth", tmp_path / "evil_raw.pth"):
        if path.name == "evil.pth":
            torch.save({"pos_embed": _Payload(marker)}, path)  # torch's zip format
        else:
            path.write_bytes(pickle.dumps({"pos_embed": _Payload(marker)}, protocol=2))
        assert weights_file_kind(path) in ("torch-zip", "pickle")
        message = _load(path)
        assert "pickle holds objects other than plain tensors" in message and "weights_only=False" not in message
    assert not marker.exists()


def test_cut_files_are_called_damaged(tmp_path: Path) -> None:
    state = {"w": torch.zeros(64, 64)}
    good_st, good_pt = tmp_path / "good.safetensors", tmp_path / "good.pth"
    save_file(state, str(good_st))
    torch.save(state, good_pt)
    assert (weights_file_kind(good_st), weights_file_kind(good_pt)) == ("safetensors", "torch-zip")
    for good in (good_st, good_pt):
        cut = tmp_path / f"cut{good.suffix}"
        data = good.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        message = _load(cut)
        assert "damaged or cut short" in message or "not a torch or safetensors" in message, message


def test_sniff_tells_weights_from_files_handed_over_by_mistake(tmp_path: Path) -> None:
    """The one sniffer behind the three readers (vision weights, import-official, baseline weights)."""
    state = {"w": torch.ones(2)}
    zip_pt, legacy_pt, st = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.safetensors"
    torch.save(state, zip_pt)
    torch.save(state, legacy_pt, _use_new_zipfile_serialization=False)
    save_file(state, str(st))
    heads = {p: p.read_bytes()[:64] for p in (zip_pt, legacy_pt, st)}
    assert sniff(heads[zip_pt]) == "torch-zip" and sniff(heads[legacy_pt]) == "pickle"
    assert sniff(heads[st], st.stat().st_size) == "safetensors"
    # a safetensors-looking header that claims more bytes than the file has is not taken for one
    assert sniff(heads[st], 20) != "safetensors"
    assert sniff(b"") == "an empty file"
    assert sniff(b"\x89PNG\r\n\x1a\n" + bytes(56)) == "a PNG image"
    assert sniff(b"\xff\xd8\xff\xe0" + bytes(60)) == "a JPEG image"
    assert sniff("weights: café\n".encode()) == "a text file"
    assert sniff(bytes(range(200, 256))) == "unrecognised bytes"
    # pickled code is named from the opcodes alone; torch's own pickles import nothing else
    payload = tmp_path / "evil.pt"
    torch.save({"w": _Payload(tmp_path / "ran")}, payload)
    assert pickled_code(payload) == "GLOBAL posix.system" and not (tmp_path / "ran").exists()
    assert pickled_code(zip_pt) is None and pickled_code(legacy_pt) is None and pickled_code(st) is None
