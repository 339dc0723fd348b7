"""Opt-in checksums (``checkpoint_checksum: true``): a bit flipped inside tensor data is caught by resume and export.

Without the checksum such a flip is invisible (the safetensors header still matches the file length); with it the
checkpoint is treated as damaged, and ``latest`` falls back to the previous one (issue 18, item 12).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from fault_helpers import tiny_cfg, use_memory_data
from simzss.engine import checkpoint as ckpt_io
from simzss.engine import trainer as trainer_mod
from simzss.io.checkpoint import resolve_checkpoint
from simzss.models.pretrained import ExportError

torch.set_num_threads(1)
NEWEST, PREVIOUS = "step-000000004", "step-000000002"


def _run(root: Path, name: str, *extra: str) -> Path:
    mp = pytest.MonkeyPatch()
    try:
        use_memory_data(mp, trainer_mod)
        trainer_mod.train(tiny_cfg(root, f"run_name={name}", "max_steps=4", "checkpoint_every=2", *extra))
    finally:
        mp.undo()
    return root / "runs" / name / "checkpoints"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("checksum")
    return {"on": _run(root, "sum", "checkpoint_checksum=true"), "off": _run(root, "nosum")}


def flip_tensor_bit(path: Path) -> int:
    """Flip the lowest bit of a byte in the middle of the tensor data of a safetensors file (after its header);
    returns the offset."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    offset = 8 + header + (len(data) - 8 - header) // 2
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return offset


def test_manifest_holds_the_sha256_of_every_file(runs: dict) -> None:
    for ckpt in ckpt_io.list_checkpoints(runs["on"]):
        manifest = json.loads((ckpt / ckpt_io.MANIFEST_NAME).read_text())
        on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {ckpt_io.MANIFEST_NAME}
        assert set(manifest["files"]) == on_disk and manifest["checksum"] == "sha256"
        for rel, info in manifest["files"].items():
            data = (ckpt / rel).read_bytes()
            assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    # Without the option the manifest has sizes only (no hashing cost).
    manifest = json.loads((runs["off"] / NEWEST / ckpt_io.MANIFEST_NAME).read_text())
    assert manifest["checksum"] is None and all(set(i) == {"size"} for i in manifest["files"].values())


def test_bit_flip_in_weights_is_caught_by_resume_and_export(runs: dict, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    on, off = tmp_path / "on", tmp_path / "off"
    shutil.copytree(runs["on"], on)
    shutil.copytree(runs["off"], off)
    for ckpts in (on, off):
        flip_tensor_bit(ckpts / NEWEST / "model.safetensors")
    # Without a checksum nothing notices: the header still matches the file.
    assert ckpt_io.validate_checkpoint(off / NEWEST) == off / NEWEST
    # With it, the checkpoint is damaged for resume and export alike, and latest falls back.
    with pytest.raises(ckpt_io.CheckpointError, match=r"model\.safetensors: checksum mismatch"):
        ckpt_io.validate_checkpoint(on / NEWEST)
    with caplog.at_level("WARNING"):
        assert ckpt_io.resolve_resume("latest", on, validate=True) == on / PREVIOUS
        assert resolve_checkpoint(on / "latest") == on / PREVIOUS
    assert caplog.text.count(f"skipping damaged checkpoint {NEWEST}") == 2 and "checksum mismatch" in caplog.text
    with pytest.raises(ExportError, match="checksum mismatch"):
        resolve_checkpoint(on / NEWEST)


def test_bit_flip_in_optimizer_state_costs_resume_only(runs: dict, tmp_path: Path) -> None:
    """The training state is checked for resume; an export needs only the weights, which are intact."""
    on = tmp_path / "on"
    shutil.copytree(runs["on"], on)
    flip_tensor_bit(on / NEWEST / "optimizer.safetensors")
    assert ckpt_io.resolve_resume("latest", on, validate=True) == on / PREVIOUS
    assert resolve_checkpoint(on / "latest") == on / NEWEST


def test_resumed_training_from_a_checksummed_checkpoint_matches(runs: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming from the step-2 checkpoint after the flip gives the straight run's step-4 weights bit for bit."""
    run = tmp_path / "runs" / "sum"
    shutil.copytree(runs["on"].parent, run)
    flip_tensor_bit(run / "checkpoints" / NEWEST / "model.safetensors")
    use_memory_data(monkeypatch, trainer_mod)
    result = trainer_mod.train(tiny_cfg(tmp_path, "run_name=sum", "max_steps=4", "checkpoint_every=2",
                                        "checkpoint_checksum=true", "resume=latest"))
    from safetensors.torch import load_file

    a = load_file(str(runs["on"] / NEWEST / "model.safetensors"))
    b = load_file(str(Path(result["checkpoint"]) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt_io.validate_checkpoint(Path(result["checkpoint"]))  # the rewritten step 4 verifies again
