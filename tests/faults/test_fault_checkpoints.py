"""Damaged checkpoints, resume honouring changed settings, and metrics.jsonl after a resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
from safetensors.torch import load_file

from fault_helpers import tiny_cfg, tiny_overrides, use_memory_data
from simzss.engine import checkpoint as ckpt_io
from simzss.cli import train as train_cli
from simzss.engine import trainer as trainer_mod

torch.set_num_threads(1)


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])
    return damage


def _garble(name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        (ckpt / name).write_text('{"state": [1, 2', encoding="utf-8")
    return damage


def _delete(name: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).unlink()


DAMAGES = {
    "model.safetensors truncated": ("model.safetensors", _truncate("model.safetensors")),
    "optimizer.safetensors truncated": ("optimizer.safetensors", _truncate("optimizer.safetensors")),
    "optimizer.json deleted": ("optimizer.json", _delete("optimizer.json")),
    "scheduler.json garbled": ("scheduler.json", _garble("scheduler.json")),
    "rank-0.json garbled": ("rank-0.json", _garble("rank-0.json")),
    "trainer_state.json garbled": ("trainer_state.json", _garble("trainer_state.json")),
}


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """A straight 8-step run, and the same run dying in step 7 after checkpoints at steps 2, 4 and 6."""
    mp = pytest.MonkeyPatch()
    try:
        use_memory_data(mp, trainer_mod)
        root = tmp_path_factory.mktemp("ckpts")
        straight = trainer_mod.train(tiny_cfg(root, "run_name=straight", "max_steps=8"))
        from simzss.models.simzss import SimZSS

        forward, calls = SimZSS.forward, {"n": 0}

        def node_dies_at_step_7(self: SimZSS, batch: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 7:
                raise RuntimeError("node died")
            return forward(self, batch)

        mp.setattr(SimZSS, "forward", node_dies_at_step_7)
        with pytest.raises(RuntimeError, match="node died"):
            trainer_mod.train(tiny_cfg(root, "run_name=split", "max_steps=8", "checkpoint_every=2"))
        split = {"run_dir": str(root / "runs" / "split")}
    finally:
        mp.undo()
    return {"root": root, "straight": straight, "split": split}


def _copy_run(src_run: Path, dst_root: Path) -> Path:
    dst = dst_root / "runs" / "split"
    shutil.copytree(src_run, dst)
    return dst


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_each_damage_is_detected_and_latest_falls_back(case: str, three_checkpoints: Dict[str, Any], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    run = _copy_run(Path(three_checkpoints["split"]["run_dir"]), tmp_path)
    newest = run / "checkpoints" / "step-000000006"
    name, damage = DAMAGES[case]
    damage(newest)
    with pytest.raises(ckpt_io.CheckpointError, match=name.replace(".", r"\.")):
        ckpt_io.validate_checkpoint(newest)
    with caplog.at_level("WARNING"):
        chosen = ckpt_io.resolve_resume("latest", run / "checkpoints", validate=True)
    assert chosen is not None and chosen.name == "step-000000004"
    assert "step-000000006" in caplog.text  # the skipped one is named
    with pytest.raises(ckpt_io.CheckpointError, match=name.replace(".", r"\.")):
        ckpt_io.resolve_resume(str(newest), run / "checkpoints", validate=True)


def test_requeued_job_with_damaged_newest_checkpoint_resumes_bit_exactly(
    three_checkpoints: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_memory_data(monkeypatch, trainer_mod)
    run = _copy_run(Path(three_checkpoints["split"]["run_dir"]), tmp_path)
    _truncate("model.safetensors")(run / "checkpoints" / "step-000000006")
    rows_before = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows_before == [1, 2, 3, 4, 5, 6]
    resumed = trainer_mod.train(tiny_cfg(tmp_path, "run_name=split", "max_steps=8", "checkpoint_every=2",
                                         "resume=latest"))
    assert resumed["step"] == 8
    a = load_file(str(Path(three_checkpoints["straight"]["checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["checkpoint"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact: resumed from step 4, as if never interrupted
    opt_a = ckpt_io.load_state(Path(three_checkpoints["straight"]["checkpoint"]), "optimizer")
    opt_b = ckpt_io.load_state(Path(resumed["checkpoint"]), "optimizer")
    assert torch.equal(opt_a["state"][0]["exp_avg"], opt_b["state"][0]["exp_avg"])
    # Steps 5 and 6 ran twice; metrics.jsonl keeps one row per step.
    steps = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_explicit_damaged_resume_is_one_line_error(three_checkpoints: Dict[str, Any], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    use_memory_data(monkeypatch, trainer_mod)
    run = _copy_run(Path(three_checkpoints["split"]["run_dir"]), tmp_path)
    newest = run / "checkpoints" / "step-000000006"
    _garble("scheduler.json")(newest)
    rc = train_cli.main(tiny_overrides(tmp_path, "run_name=other", "max_steps=8", "--resume", str(newest)))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "scheduler.json" in err and "Traceback" not in err


def test_changed_lr_on_resume_takes_effect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """The non-finite stop says 'lower optim.lr': the resumed run must use the lowered value."""
    use_memory_data(monkeypatch, trainer_mod)
    common = ("run_name=lr", "max_steps=6", "optim.warmup=0", "checkpoint_every=3", "optim.betas=[0.9,0.98]")
    trainer_mod.train(tiny_cfg(tmp_path, *common, "optim.lr=1e-1", "optim.weight_decay=0.2"))
    ckpt = tmp_path / "runs" / "lr" / "checkpoints" / "step-000000003"
    shutil.rmtree(tmp_path / "runs" / "lr" / "checkpoints" / "step-000000006")
    with caplog.at_level("WARNING"):
        tr = trainer_mod.Trainer(tiny_cfg(tmp_path, *common, "optim.lr=1e-4", "optim.weight_decay=0.05",
                                          f"resume={ckpt}"))
    assert tr.step == 3
    expected = 1e-4 * trainer_mod.build_scheduler.__globals__["WarmupCosine"](0, 6)(3)
    groups = tr.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
    assert {g["initial_lr"] for g in groups} == {1e-4}
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    inner = getattr(tr.scheduler, "scheduler", tr.scheduler)
    assert inner.base_lrs == [1e-4] * len(groups)
    assert "optim.lr changed" in caplog.text and "optim.weight_decay changed" in caplog.text
    # And the logged lr of the resumed steps follows the new base.
    result = tr.fit()
    rows = [json.loads(r) for r in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["lr"] == pytest.approx(expected, rel=1e-6) and rows[0]["lr"] == pytest.approx(1e-1)
