"""A full disk or a read-only destination while writing a checkpoint or an export (issue 18, item 6): no temporary
folder is left behind, and the error is one line that names the path and says what is wrong.

The full disk is simulated by making the writers fail half-way with the errors they raise on ENOSPC
(safetensors: ``SafetensorError(... No space left on device (os error 28))``; Python: ``OSError(ENOSPC)``). When
the tests may mount file systems (root), a real 1 MiB tmpfs and a read-only one are used as well.
"""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List

import pytest
import torch
from safetensors import SafetensorError

from conftest import tiny_model_config, tiny_tokenizer
from fault_helpers import tiny_cfg, use_memory_data
from simzss.cli import export as export_cli
from simzss.engine import checkpoint as ckpt_io
from simzss.engine import trainer as trainer_mod
from simzss.io import export as ex

torch.set_num_threads(1)
ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


def _disk_fills_at(monkeypatch: pytest.MonkeyPatch, module: Any, call: int) -> List[str]:
    """Make ``module.save_file`` write half a file and fail like safetensors on a full disk at its ``call``-th call
    (the earlier calls succeed). Returns the paths it was called with."""
    real, seen = module.save_file, []

    def save_file(tensors: Any, path: str, *args: Any, **kwargs: Any) -> None:
        seen.append(path)
        if len(seen) < call:
            return real(tensors, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 64)  # what reached the disk before it filled up
        raise SafetensorError(ENOSPC_SAFETENSORS)

    monkeypatch.setattr(module, "save_file", save_file)
    return seen


def _leftovers(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("call", [1, 2, 3], ids=["rank state", "model weights", "optimizer state"])
def test_full_disk_during_a_checkpoint(call: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_memory_data(monkeypatch, trainer_mod)
    seen = _disk_fills_at(monkeypatch, ckpt_io, call)
    with pytest.raises(ckpt_io.DiskFullError) as caught:
        trainer_mod.train(tiny_cfg(tmp_path, "max_steps=2", "checkpoint_every=1"))
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    first = str(caught.value).splitlines()[0]
    assert first.startswith(f"{ckpts / 'step-000000001'}: the disk is full"), first
    assert len(seen) == call
    assert _leftovers(ckpts) == [] and ckpt_io.list_step_folders(ckpts) == []  # no .tmp-step-*, no step-*


def test_full_disk_while_writing_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last write of a checkpoint (finalize_checkpoint) cleans up too."""
    use_memory_data(monkeypatch, trainer_mod)
    real_write = Path.write_text

    def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name == ckpt_io.MANIFEST_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(ckpt_io.DiskFullError, match="disk is full"):
        trainer_mod.train(tiny_cfg(tmp_path, "max_steps=1"))
    assert _leftovers(tmp_path / "runs" / "t" / "checkpoints") == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint to export (random-init vision: its weights are in the checkpoint and the export)."""
    from simzss.config import TrainConfig, to_yaml
    from simzss.models.simzss import SimZSS

    work = tmp_path_factory.mktemp("ckpt")
    tok = tiny_tokenizer(work / "tok")
    model = SimZSS.from_config(tiny_model_config(str(work / "tok")), tok)
    ckpt = work / "run" / "checkpoints" / "step-000000003"
    ckpt.mkdir(parents=True)
    state = {**model.trainable_state_dict(), **{f"vision.{k}": v for k, v in model.vision.state_dict().items()}}
    ckpt_io.save_model_weights(state, ckpt / "model.safetensors")
    (ckpt / "config.yaml").write_text(to_yaml(TrainConfig(model=model.config)))
    tok.save_pretrained(str(ckpt / "tokenizer"))
    (ckpt / "trainer_state.json").write_text('{"step": 3}')
    return ckpt


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("where", ["weights", "tokenizer"])
def test_full_disk_during_an_export(where: str, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exports" / "tiny"
    if where == "weights":
        _disk_fills_at(monkeypatch, ex, 1)
    else:
        import json as json_module

        def dump(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(json_module, "dump", dump)  # the tokenizer's and config.json's JSON writes
    assert export_cli.main([str(checkpoint), str(out)]) == 1
    err = _one_line_error(capsys)
    assert err.startswith(f"simzss export: {out.absolute()}: the disk is full"), err
    assert not out.exists() and _leftovers(out.parent) == []  # no hidden .tiny.tmp-PID-* folder


def _mount(*args: str) -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", options, "tmpfs", str(path)):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_real_full_disk(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "small"
    with _tmpfs(disk, "size=1m"):
        assert export_cli.main([str(checkpoint), str(disk / "export")]) == 1
        err = _one_line_error(capsys)
        assert f"{disk / 'export'}: the disk is full" in err
        assert os.listdir(disk) == []
        use_memory_data(monkeypatch, trainer_mod)
        with pytest.raises(ckpt_io.DiskFullError, match="the disk is full"):
            trainer_mod.train(tiny_cfg(tmp_path, f"output_dir={disk}", "max_steps=1"))
        assert _leftovers(disk / "t" / "checkpoints") == [] and ckpt_io.list_step_folders(disk / "t" / "checkpoints") == []


@contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """A folder nobody may write to: chmod 555, or for root (which ignores modes) a read-only tmpfs."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    with _tmpfs(folder, "ro,size=64k"):
        yield


def test_read_only_export_destination(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    with _read_only(folder):
        assert export_cli.main([str(checkpoint), str(folder / "export")]) == 1
        err = _one_line_error(capsys)
        assert err.startswith(f"simzss export: {folder}: cannot write the export there"), err
        assert "choose another OUT_DIR" in err and os.listdir(folder) == []
