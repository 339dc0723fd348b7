"""The defects a newcomer hit (issue 13): log format and progress lines, rank-aware logging, the all_gather
FutureWarning, the spaCy fallback warning, `checkpoints/latest`, `acc=nan` in LiT runs, a readable demo overlay."""

from __future__ import annotations

import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch
from PIL import Image

from simzss import logs
from simzss.engine import trainer as trainer_mod
from tests.test_trainer import memory_data, tiny_cfg  # noqa: F401  (fixture)


def bare_root(monkeypatch: pytest.MonkeyPatch) -> logging.Logger:
    """The root logger without pytest's capture handlers, as a command sees it (call inside the test: pytest
    adds its handlers after the fixtures are set up)."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    return root


def test_progress_on_a_log_file_prints_plain_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="simzss.progress")
    bar = logs.progress(total=400, desc="train", unit="step", interval=3600)  # stderr is not a terminal here
    for _ in range(400):
        bar.update(1)
    bar.set_postfix(loss="0.5")
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "simzss.progress"]
    assert 1 <= len(lines) <= 3  # start and end (and one refresh for the postfix), not one frame per step
    assert all("\r" not in line and "\n" not in line for line in lines)
    assert lines[-1].startswith("train: 400/400") and "loss=0.5" in lines[-1]

    caplog.clear()
    for _ in logs.progress(range(50), desc="off", enabled=False):
        pass
    assert not [r for r in caplog.records if r.name == "simzss.progress"]


def test_progress_only_on_rank_zero(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="simzss.progress")
    monkeypatch.setenv("RANK", "1")
    for _ in logs.progress(range(5), desc="r1"):
        pass
    assert not caplog.records


def test_setup_logging_one_format_and_once_per_job(monkeypatch: pytest.MonkeyPatch) -> None:
    root = bare_root(monkeypatch)
    buf0, buf1 = io.StringIO(), io.StringIO()
    logs.setup_logging(rank=0, stream=buf0)
    logging.getLogger("simzss.x").info("hello %s", "there")
    logs.setup_logging(rank=1, stream=buf1)  # replaces the handler installed above
    logging.getLogger("simzss.x").info("same message on every rank")
    logging.getLogger("simzss.x").warning("same warning on every rank")
    logging.getLogger("simzss.x").error("rank-specific failure")
    line = buf0.getvalue().strip()
    assert line.endswith("INFO simzss.x: hello there") and line[:4].isdigit()  # timestamp first
    assert buf1.getvalue().strip().splitlines() == [buf1.getvalue().strip()]  # one line: the error
    assert "ERROR simzss.x: [rank 1] rank-specific failure" in buf1.getvalue()
    assert len([h for h in root.handlers if getattr(h, "_simzss_handler", False)]) == 1


def test_gather_with_grad_does_not_warn_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from simzss import losses

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(losses, "_dist_world", lambda: (0, 2))  # take the multi-rank path on one process
        x = torch.randn(3, 4, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, sizes = losses._gather_varlen(x, with_grad=True, sizes=[3, 3])
        out.sum().backward()
    finally:
        dist.destroy_process_group()
    assert sizes == [3, 3] and x.grad is not None
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_packaged_spacy_fallback_is_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from simzss.concepts import extract

    pytest.importorskip(extract.FALLBACK_SPACY_MODEL)
    if importlib.util.find_spec(extract.DEFAULT_SPACY_MODEL) is not None:
        pytest.skip("en_core_web_sm itself is installed: no fallback to test")
    caplog.set_level(logging.INFO, logger=extract.__name__)
    extract.load_spacy.__wrapped__(extract.DEFAULT_SPACY_MODEL, numpy_gemm=False)
    records = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert records and all(r.levelno == logging.INFO for r in records)
    caplog.clear()
    extract.load_spacy.__wrapped__("no_such_pipeline_xyz", numpy_gemm=False)  # asked by name
    assert [r.levelno for r in caplog.records if "falling back" in r.getMessage()] == [logging.WARNING]


def test_checkpoints_latest_is_the_newest_complete(tmp_path: Path, memory_data: Dict[str, Any]) -> None:  # noqa: F811
    from simzss.io.checkpoint import resolve_checkpoint

    trainer_mod.train(tiny_cfg(tmp_path, "run_name=r", "max_steps=3", "checkpoint_every=1", "keep_checkpoints=0"))
    run = tmp_path / "runs" / "r"
    newest = run / "checkpoints" / "step-000000003"
    assert resolve_checkpoint(run / "checkpoints" / "latest") == newest  # the README's form
    assert resolve_checkpoint(run / "latest") == newest
    (run / "checkpoints" / "tmp-step-000000004").mkdir()  # a write in progress is never "latest"
    assert resolve_checkpoint(run / "checkpoints" / "latest") == newest
    with pytest.raises(Exception, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nowhere" / "latest")


def test_lit_progress_line_has_no_nan_accuracy(tmp_path: Path, memory_data: Dict[str, Any],  # noqa: F811
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="simzss.progress")
    trainer_mod.train(tiny_cfg(tmp_path, "run_name=lit", "model.concept_weight=0", "max_steps=2"))
    lit = [r.getMessage() for r in caplog.records if r.name == "simzss.progress"]
    assert any("loss=" in m for m in lit) and not any("nan" in m for m in lit), lit
    caplog.clear()
    trainer_mod.train(tiny_cfg(tmp_path, "run_name=simzss", "max_steps=2"))
    assert any("acc=" in r.getMessage() for r in caplog.records if r.name == "simzss.progress")


def test_small_picture_overlay_is_upscaled_and_readable() -> None:
    from simzss.inference import render_overlay

    image = Image.fromarray(np.full((112, 112, 3), 90, dtype=np.uint8))
    label_map = np.zeros((112, 112), dtype=np.int64)
    label_map[56:, :] = 1
    out = render_overlay(image, label_map, ["snow", "brick wall"], min_width=448)
    assert out.width == 448 and out.height > 448
    arr = np.asarray(out)
    assert (arr[:224, :448] == arr[0, 0]).all() and not (arr[224, 0] == arr[0, 0]).all()  # labels scaled 4x
    legend = arr[448:]
    dark_rows = np.where((legend.min(axis=(1, 2)) < 80))[0]
    assert dark_rows.max() - dark_rows.min() >= 12  # legend text at least ~12 px tall
    assert render_overlay(image, label_map, ["a", "b"]).width == 112  # default: unchanged size


def test_vision_weights_from_a_local_folder(tmp_path: Path) -> None:
    """model.vision.weights may name a downloaded hub snapshot folder (model.safetensors inside), not only a file."""
    from safetensors.torch import save_file

    from simzss.models.vision import FrozenVisionTower

    kwargs = {"img_size": 56, "depth": 1}
    source = FrozenVisionTower("vit_small_patch14_reg4_dinov2", pretrained=False, model_kwargs=kwargs)
    snapshot = tmp_path / "vit_small_patch14_reg4_dinov2.lvd142m"
    snapshot.mkdir()
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(snapshot / "model.safetensors"))
    loaded = FrozenVisionTower("vit_small_patch14_reg4_dinov2", pretrained=True, weights=str(snapshot),
                               model_kwargs=kwargs)
    for k, v in source.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        FrozenVisionTower("vit_small_patch14_reg4_dinov2", pretrained=False, weights=str(tmp_path / "runs"),
                          model_kwargs=kwargs) if (tmp_path / "runs").mkdir() is None else None
