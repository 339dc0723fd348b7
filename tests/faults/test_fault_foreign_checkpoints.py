"""``simzss import-official`` given files that are not release checkpoints (issue 18 item 9, issue 19 defect 3): one
line saying what the file is not (or that its pickled code is refused) and what file is expected; never torch's
advice to load with ``weights_only=False``, never a cut-off explanation, nothing written."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from simzss.cli import import_official as official_cli
from simzss.io import official

EXPECTED = "expected a release checkpoint: a .pt file holding a state dict of tensors (torch.save) or a .safetensors file"
# Words of torch's weights-only error text that must never reach the user.
TORCH_ADVICE = ("weights_only", "Re-running", "In PyTorch", "arbitrary code execution", "add_safe_globals")


class CodeInside:
    """Unpickling an instance needs this class: code."""


def _jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue())
    return path


def _cut_checkpoint(path: Path) -> Path:
    buf = io.BytesIO()
    torch.save({"text.ln_final.weight": torch.ones(8)}, buf)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a copy that stopped half-way
    return path


def _zip_of_text(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    return path


FILES = {
    "random.pt": (lambda p: p.write_bytes(bytes(range(1, 256)) * 16 + os.urandom(1024)),
                  "not a PyTorch checkpoint (unrecognised bytes)"),
    "photo.jpg": (_jpeg, "not a PyTorch checkpoint (a JPEG image)"),
    "notes.pt": (lambda p: p.write_text("model weights go here\n"), "not a PyTorch checkpoint (a text file)"),
    "empty.pt": (lambda p: p.write_bytes(b""), "not a PyTorch checkpoint (an empty file)"),
    "cut.pt": (_cut_checkpoint, "not a PyTorch checkpoint (a damaged or foreign zip archive)"),
    "archive.pt": (_zip_of_text, "not a PyTorch checkpoint (a damaged or foreign zip archive)"),
    "plain.pkl": (lambda p: p.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4)),
                  "not a PyTorch checkpoint (a pickle without torch's layout)"),
    "release_folder": (lambda p: p.mkdir(), "a folder, not a file"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_not_a_checkpoint_is_one_line_naming_the_file_expected(name: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    make, says = FILES[name]
    path = tmp_path / name
    make(path)
    out = tmp_path / "out"
    assert official_cli.main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err == f"simzss import-official: {path}: {says}; {EXPECTED}"
    assert not any(word in err for word in TORCH_ADVICE), err
    assert not out.exists()


def test_pickle_with_code_is_refused_naming_the_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(2)}, "extra": CodeInside()}, path)
    assert official_cli.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{path}: refusing to load a pickle that needs code ({__name__}.CodeInside)" in err
    assert EXPECTED in err and not any(word in err for word in TORCH_ADVICE), err
    assert not (tmp_path / "out").exists()


def test_library_error_is_the_same_line(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "photo.jpg")
    with pytest.raises(official.OfficialCheckpointError) as caught:
        official.read_official_checkpoint(path)
    assert str(caught.value) == f"{path}: not a PyTorch checkpoint (a JPEG image); {EXPECTED}"


def test_a_checkpoint_of_another_model_is_named_in_the_refusal(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A real state dict that is not the release's: the one line names the file and what it lacks."""
    path = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    assert official_cli.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"simzss import-official: {path}: not a SimZSS release checkpoint: no vision tower keys "
                   f"({official.VISION_SRC}*)")
    assert not (tmp_path / "out").exists()
