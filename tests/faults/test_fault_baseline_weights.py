"""A baseline's local weights file that is hostile or foreign (issue 18 item 7): ``simzss eval gem:NAME@FILE``
refuses a pickle that needs code with the one-line refusal ``import-official`` gives (nothing in it runs), calls
random bytes what they are, and never prints a traceback."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from simzss.baselines import load_baseline
from simzss.baselines.weights import WeightsFileError, check_weights_file
from simzss.cli.eval import main as eval_main


class _Payload:
    """Unpickling this calls ``os.system`` (through ``__reduce__``): it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def folder_dataset(tmp_path: Path) -> Path:
    from simzss.data.synthetic import generate_toy_world

    generate_toy_world(tmp_path / "toy", num_train=0, num_val=1, image_size=32)
    return tmp_path / "toy" / "val"


def _evil_files(tmp_path: Path) -> list:
    marker = tmp_path / "PWNED"
    raw = tmp_path / "evil.pt"  # a plain pickle
    raw.write_bytes(pickle.dumps({"visual.proj": _Payload(marker)}))
    zipped = tmp_path / "evil_zip.pt"  # torch.save's zip format around the same payload
    torch.save({"visual.proj": torch.zeros(2), "x": _Payload(marker)}, zipped)
    return [raw, zipped]


def _output(capsys, caplog) -> str:
    """Everything the command printed or logged (pytest captures log records apart from stderr)."""
    out = capsys.readouterr()
    text = out.out + out.err + "".join(r.getMessage() + "\n" for r in caplog.records)
    caplog.clear()
    return text


def test_pickle_with_code_is_refused_in_one_line_and_nothing_runs(tmp_path, folder_dataset, capsys, caplog) -> None:
    for evil in _evil_files(tmp_path):
        rc = eval_main([f"gem:ViT-B-16@{evil}", "--task", "segmentation", "--datasets", f"folder:{folder_dataset}",
                        "--device", "cpu", "--no-progress"])
        text = _output(capsys, caplog)
        assert rc == 2
        assert "Traceback" not in text and "weights_only=False" not in text
        lines = [ln for ln in text.splitlines() if "refusing to load" in ln]
        assert len(lines) == 1 and str(evil) in lines[0] and "GLOBAL posix.system" in lines[0]
        assert "refusing to load a pickle that needs code" in lines[0]  # import-official's words
    assert not (tmp_path / "PWNED").exists()


_RNG = random.Random(0)


@pytest.mark.parametrize("content,why", [
    (_RNG.randbytes(4096), "not a weights file"),
    (b"", "not a weights file .the file is empty"),
    (b"\x89PNG\r\n\x1a\n" + _RNG.randbytes(200), "not a weights file"),
])
def test_foreign_bytes_are_not_a_weights_file(tmp_path, folder_dataset, capsys, caplog, content, why) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsFileError, match=why):
        check_weights_file(path)
    rc = eval_main([f"gem:ViT-B-16@{path}", "--datasets", f"folder:{folder_dataset}", "--device", "cpu",
                    "--no-progress"])
    text = _output(capsys, caplog)
    assert rc == 2 and "Traceback" not in text
    line = next(ln for ln in text.splitlines() if "not a weights file" in ln)
    assert str(path) in line and "pickle" not in line and "weights_only" not in line


def test_foreign_safetensors_and_non_tensor_pickles(tmp_path) -> None:
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(os.urandom(64))
    with pytest.raises(WeightsFileError, match="not a weights file .*unreadable safetensors"):
        check_weights_file(bad)
    plain = tmp_path / "list.pt"
    torch.save([1, 2, 3], plain)  # loads with weights_only, but holds no tensors
    with pytest.raises(WeightsFileError, match="holds list, not named tensors"):
        check_weights_file(plain)
    with pytest.raises(FileNotFoundError):
        check_weights_file(tmp_path / "missing.pt")


def test_a_real_state_dict_still_loads(tmp_path) -> None:
    """The check lets honest files through: a tiny model's state dict, zip and legacy formats."""
    import json

    cfg = tmp_path / "tiny_fault_clip.json"
    cfg.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                                                "patch_size": 16, "head_width": 16},
                               "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1,
                                            "layers": 1}}))
    torch.manual_seed(0)
    model = load_baseline(f"maskclip:{cfg}/random")
    for legacy in (False, True):
        path = tmp_path / f"w{int(legacy)}.pt"
        torch.save(model.clip.state_dict(), path, _use_new_zipfile_serialization=not legacy)
        check_weights_file(path)
        again = load_baseline(f"maskclip:{cfg}@{path}")
        torch.testing.assert_close(again.clip.visual.proj, model.clip.visual.proj)
