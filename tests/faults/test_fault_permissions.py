"""Outputs follow the user's umask (tempfile would make them 0600 / 0700)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from fault_helpers import tiny_cfg, use_memory_data


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _assert_modes(root: Path, mask: int) -> None:
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert mode == want, f"{p}: {oct(mode)} != {oct(want)}"


def test_checkpoint_export_tokenizer_and_segment_outputs_follow_umask(tmp_path: Path, umask: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import tiny_model_config, tiny_tokenizer
    from simzss.engine import trainer as trainer_mod
    from simzss.inference import _save_atomic
    from simzss.io.export import save_pretrained
    from simzss.models.simzss import SimZSS

    use_memory_data(monkeypatch, trainer_mod, num_batches=2)
    result = trainer_mod.train(tiny_cfg(tmp_path, "max_steps=2"))
    ckpt = Path(result["checkpoint"])
    assert (ckpt / "model.safetensors").is_file()
    _assert_modes(ckpt, umask)

    tok_dir = tmp_path / "tok"
    tok = tiny_tokenizer(tok_dir)
    _assert_modes(tok_dir, umask)  # `simzss tokenizer` output folder

    out = tmp_path / "export"
    save_pretrained(SimZSS.from_config(tiny_model_config(str(tok_dir)), tok), out)
    _assert_modes(out, umask)

    png = tmp_path / "seg" / "overlay.png"
    _save_atomic(Image.new("RGB", (8, 8)), png)
    _assert_modes(png, umask)
