"""Resume and export take the same checkpoint: one validation, the same "skipping damaged checkpoint" warning, and an
export of ``latest`` that falls back says (and records) the step it exported, with that step's evaluation results.

A real 6-step run (checkpoints and evaluations at steps 2, 4, 6; the checkpoints hold a real tokenizer) is damaged
in four ways the second fault-injection run reported (issue 18, items 3, 4 and 10).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_tokenizer
from fault_helpers import tiny_cfg, use_memory_data
from simzss.cli import export as export_cli
from simzss.engine import checkpoint as ckpt_io
from simzss.engine import trainer as trainer_mod
from simzss.io.checkpoint import resolve_checkpoint
from simzss.models.pretrained import ExportError, load_tokenizer_dir

torch.set_num_threads(1)
NEWEST, PREVIOUS = "step-000000006", "step-000000004"


def weights_score(model: torch.nn.Module) -> float:
    """A stand-in evaluation whose value is a function of the weights: results of step N belong to step N's model."""
    return float(sum(p.double().sum() for p in model.trainable_state_dict().values()))


def _bad_header(ckpt: Path) -> None:
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")  # header length past the end of the file
    (ckpt / "model.safetensors").write_bytes(bytes(data))


DAMAGES: Dict[str, tuple[str, Callable[[Path], None]]] = {
    "config.yaml missing": ("config.yaml", lambda c: (c / "config.yaml").unlink()),
    "tokenizer.json missing": ("tokenizer.json", lambda c: (c / "tokenizer" / "tokenizer.json").unlink()),
    "trainer_state.json missing": ("trainer_state.json", lambda c: (c / "trainer_state.json").unlink()),
    "model.safetensors bad header": ("model.safetensors", _bad_header),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN folder of a 6-step run: checkpoints at 2, 4 and 6, the stand-in evaluation at the same steps."""
    root = tmp_path_factory.mktemp("fallback")
    tok = tiny_tokenizer(root / "tok")
    (root / "val").mkdir()
    mp = pytest.MonkeyPatch()
    try:
        use_memory_data(mp, trainer_mod)
        mp.setattr(trainer_mod, "build_tokenizer", lambda cfg: tok)  # saved into each checkpoint's tokenizer/
        mp.setattr(trainer_mod, "run_evaluation",
                   lambda cfg, model, acc, *a, **k: {"folder:val": {"mIoU": weights_score(model)}})
        trainer_mod.train(tiny_cfg(root, "run_name=r", "max_steps=6", "checkpoint_every=2", "eval.every=2",
                                   f"eval.datasets=[folder:{root / 'val'}]"))
    finally:
        mp.undo()
    run = root / "runs" / "r"
    assert [p.name for p in ckpt_io.list_checkpoints(run / "checkpoints")][-2:] == [PREVIOUS, NEWEST]
    assert (run / "checkpoints" / NEWEST / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((run / "eval.json").read_text())["step"] == 6
    return run


def _damaged_copy(run: Path, tmp_path: Path, case: str) -> Path:
    copy = tmp_path / "runs" / "r"
    shutil.copytree(run, copy)
    DAMAGES[case][1](copy / "checkpoints" / NEWEST)
    return copy


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_resume_and_export_skip_the_same_damaged_checkpoint(case: str, run: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    name = DAMAGES[case][0]
    copy = _damaged_copy(run, tmp_path, case)
    newest = copy / "checkpoints" / NEWEST
    with caplog.at_level("WARNING"):
        resumed = ckpt_io.resolve_resume("latest", copy / "checkpoints", validate=True)
    resume_warning = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING"):
        exported = resolve_checkpoint(copy / "checkpoints" / "latest")
    export_warning = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    assert resumed == exported == copy / "checkpoints" / PREVIOUS
    assert resume_warning == export_warning and len(resume_warning) == 1  # the same warning, word for word
    assert NEWEST in resume_warning[0] and name in resume_warning[0]

    # Named explicitly, the damaged checkpoint is refused by both, naming the file.
    with pytest.raises(ckpt_io.CheckpointError, match=name.replace(".", r"\.")):
        ckpt_io.resolve_resume(str(newest), copy / "checkpoints", validate=True)
    with pytest.raises(ExportError, match=name.replace(".", r"\.")):
        resolve_checkpoint(newest)
    capsys.readouterr()
    assert export_cli.main([str(newest), str(tmp_path / "explicit")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "Traceback" not in err
    assert not (tmp_path / "explicit").exists()


def test_export_of_latest_exports_and_describes_the_step_it_fell_back_to(run: Path, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18 item 3: the weights, config.json and model card all say step 4, with step 4's evaluation; and
    (issue 19) the command says which step and checkpoint folder it used."""
    copy = _damaged_copy(run, tmp_path, "model.safetensors bad header")
    out = tmp_path / "export"
    with caplog.at_level("INFO"):
        assert export_cli.main([str(copy / "checkpoints" / "latest"), str(out)]) == 0
    previous = copy / "checkpoints" / PREVIOUS
    printed = capsys.readouterr().out
    assert f"{previous} (training step 4)" in printed
    assert any("step 4" in r.getMessage() and str(previous) in r.getMessage() for r in caplog.records)

    # The weights are step 4's.
    want = {k: v for k, v in load_file(str(previous / "model.safetensors")).items() if not k.startswith("vision.")}
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in want.items())
    # The export records its source.
    meta = json.loads((out / "config.json").read_text())
    assert meta["source"] == {"checkpoint": str(previous.absolute()), "step": 4}
    # The card says step 4 and shows the evaluation the trainer ran on step 4's weights, not step 6's.
    from simzss.io.load import load_pretrained

    score = weights_score(load_pretrained(out))
    history = [json.loads(r) for r in (copy / "eval_history.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["eval/folder:val/mIoU"] for r in history}
    assert by_step[4] == pytest.approx(score, rel=1e-9, abs=1e-9) and by_step[6] != pytest.approx(score)
    card = (out / "README.md").read_text()
    assert "At training step 4:" in card and "At training step 6" not in card
    assert "Training step 4: exported from checkpoint `r/checkpoints/step-000000004`" in card
    assert json.dumps(by_step[4]) in card and json.dumps(by_step[6]) not in card


def test_export_of_an_intact_latest_shows_the_full_eval_json(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert export_cli.main([str(run), str(out)]) == 0  # a run folder: its newest valid checkpoint, step 6
    meta = json.loads((out / "config.json").read_text())
    assert meta["source"]["step"] == 6
    results = json.loads((run / "eval.json").read_text())
    card = (out / "README.md").read_text()
    assert "At training step 6:" in card and json.dumps(results["results"]["folder:val"]["mIoU"]) in card


def test_a_trainer_resume_skips_a_checkpoint_without_trainer_state(run: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Issue 18 item 10: a step folder that lost its trainer_state.json gets the damaged-checkpoint warning."""
    copy = _damaged_copy(run, tmp_path, "trainer_state.json missing")
    use_memory_data(monkeypatch, trainer_mod)
    tok = load_tokenizer_dir(copy / "checkpoints" / PREVIOUS / "tokenizer")
    monkeypatch.setattr(trainer_mod, "build_tokenizer", lambda cfg: tok)
    with caplog.at_level("WARNING"):
        tr = trainer_mod.Trainer(tiny_cfg(tmp_path, "run_name=r", "max_steps=8", "checkpoint_every=2",
                                          "resume=latest"))
    assert tr.step == 4
    assert f"skipping damaged checkpoint {NEWEST}" in caplog.text and "trainer_state.json: missing" in caplog.text
