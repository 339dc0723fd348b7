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


def test_progress_lines_to_a_file_every_interval_with_a_fake_clock(caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19, defect 6: 279 steps of 1.2 s with a postfix every 10 steps (the trainer's pattern) give one line
    per 30 s (not 139 lines), never the same step twice, and the last step at the end."""
    import tqdm.std

    clock = {"t": 1000.0}
    monkeypatch.setattr(tqdm.std, "time", lambda: clock["t"])
    caplog.set_level(logging.INFO, logger="simzss.progress")
    bar = logs.progress(total=279, desc="demo", unit="step")  # stderr is not a terminal here
    stamps = [clock["t"]]
    for step in range(1, 280):
        clock["t"] += 1.2
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{1 / step:.3f}")
        if len([r for r in caplog.records if r.name == "simzss.progress"]) > len(stamps):
            stamps.append(clock["t"])
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "simzss.progress"]
    counts = [int(line.split(": ", 1)[1].split("/", 1)[0]) for line in lines]
    assert counts == sorted(set(counts)), f"a step logged twice or out of order: {counts}"
    assert counts[0] == 0 and counts[-1] == 279
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert all(g >= 30.0 - 1e-9 for g in gaps), gaps  # every line but the closing one is 30 s after the last
    assert len(lines) == 1 + int(279 * 1.2 // 30) + 1  # the start, one per 30 s, the end: 13, not 139


def test_no_progress_turns_every_bar_off(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command's --no-progress (setup_logging(progress=False)) silences bars drawn by any layer."""
    monkeypatch.setattr(logs, "_progress_enabled", True)
    caplog.set_level(logging.INFO, logger="simzss.progress")
    logs.setup_logging(progress=False)
    for _ in logs.progress(range(5), desc="quiet", interval=0):
        pass
    assert not [r for r in caplog.records if r.name == "simzss.progress"]
    logs.setup_logging()  # None: unchanged
    assert logs._progress_enabled is False
    logs.setup_logging(progress=True)
    for _ in logs.progress(range(5), desc="loud", interval=0):
        pass
    assert [r for r in caplog.records if r.name == "simzss.progress"]


def _fake_eval(monkeypatch: pytest.MonkeyPatch) -> Dict[str, int]:
    """`simzss eval` with the model and the evaluation replaced by stand-ins (counts the evaluations)."""
    from simzss.cli import eval as runner

    calls = {"run": 0}

    def fake_run_task(model, task, spec, args, accelerator):
        calls["run"] += 1
        return {"dataset": spec, "mIoU": 50.0, "pixel_acc": 90.0, "num_images": 2, "skipped": {}}

    monkeypatch.setattr(runner, "load_model", lambda path, device: torch.nn.Identity())
    monkeypatch.setattr(runner, "run_task", fake_run_task)
    return calls


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_eval_out_follows_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int) -> None:
    """Issue 18, item 5: `eval --out r.json` was 0600 (mkstemp); it now gets 0666 & ~umask."""
    import os

    from simzss.cli.eval import main as eval_main

    _fake_eval(monkeypatch)
    old = os.umask(umask)
    try:
        assert eval_main(["m", "--datasets", f"folder:{tmp_path}", "--device", "cpu", "--out", str(tmp_path / "r.json")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_eval_checks_its_output_before_computing_and_survives_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18, item 6: an unwritable --out is refused before any evaluation (one line, exit 1); a disk that
    fills up while the results are written is one line and exit 1, with no temp file left behind."""
    import errno
    import os

    from simzss.cli.eval import main as eval_main

    calls = _fake_eval(monkeypatch)
    (tmp_path / "a-file").write_text("x")
    for out in ("/proc/simzss/r.json", str(tmp_path / "a-file" / "r.json")):
        assert eval_main(["m", "--datasets", f"folder:{tmp_path}", "--device", "cpu", "--out", out]) == 1
        err = capsys.readouterr().err
        assert err.startswith("simzss eval: cannot write") and err.count("\n") == 1, err
    assert calls["run"] == 0  # nothing was computed

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "res" / "r.json"
    assert eval_main(["m", "--datasets", f"folder:{tmp_path}", "--device", "cpu", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert calls["run"] == 1 and not out.exists() and not list(out.parent.iterdir())


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_train_full_disk_is_one_line_and_exit_1(error: str, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Issue 18, item 6: a disk that fills up during training (an OSError from Python's writers, or safetensors'
    own SafetensorError) ends in one line and exit 1, not a traceback."""
    import errno

    from safetensors import SafetensorError

    from simzss.cli.train import main as train_main

    def full(cfg):
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "x"))
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(trainer_mod, "train", full)
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    rc = train_main(["--config", str(config), f"output_dir={tmp_path / 'runs'}", "data.shards=[x.tar]"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("simzss train: run failed") and err.count("\n") == 1, err


def test_demo_overlay_shows_the_image_the_readme_describes(tmp_path: Path) -> None:
    """Issue 19: the README describes a held-out picture with snow, a brick wall, a plank floor and an apple; the
    demo draws its overlay from that picture (chosen by its mask), and the README names it."""
    from simzss.cli import main as simzss_main
    from simzss.cli.demo import OVERLAY_CLASSES, overlay_image

    # held-out image i depends only on the seed and i, so 4 images are the demo's first 4 of 100
    assert simzss_main(["demo-data", str(tmp_path), "--num-train", "2", "--num-val", "4", "--shard-size", "2"]) == 0
    image, classes = overlay_image(tmp_path / "val")
    assert set(OVERLAY_CLASSES) <= set(classes)
    mask = np.asarray(Image.open(tmp_path / "val" / "masks" / f"{image.stem}.png"))
    names = (tmp_path / "val" / "classes.txt").read_text().split()
    assert {names[i] for i in np.unique(mask) if i < len(names)} == set(classes)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"images/{image.name}" in readme and "snow, a brick\nwall, a plank floor and an apple" in readme


@pytest.mark.parametrize("task, spec, message", [
    ("segmentation", "folder:{tmp}/missing", "does not exist"),
    ("segmentation", "vocc:{tmp}", "no segmentation dataset is called 'vocc'"),
    ("segmentation", "{tmp}", "must look like NAME:PATH"),
    ("classification", "folder:{tmp}", "no classification dataset is called 'folder'"),
    ("retrieval", "karpathy:{tmp}", "karpathy takes the dataset's json file"),
    ("retrieval", "karpathy:{tmp}/dataset_coco.json", "does not exist"),
])
def test_eval_refuses_a_bad_dataset_spec_before_loading_a_model(
        task: str, spec: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19, defect 8: a dataset named by the user that does not exist (or an unknown dataset name) is a usage
    error, exit 2 in one line, as a missing input is in every command; it is found before the model is loaded
    (which takes minutes for a real one), not after it as a failed dataset with exit 1."""
    from simzss.cli.eval import main as eval_main

    calls = _fake_eval(monkeypatch)
    loaded = []
    from simzss.cli import eval as runner

    monkeypatch.setattr(runner, "load_model", lambda path, device: loaded.append(path))
    rc = eval_main(["m", "--task", task, "--datasets", spec.replace("{tmp}", str(tmp_path)), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("simzss eval: --datasets") and message in err, err
    assert not loaded and calls["run"] == 0


def test_demo_prints_the_lines_the_readme_quotes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The README's quick start says what `simzss demo` prints (`SimZSS mIoU: ...` and `LiT mIoU: ...`); the
    summary lines are those words verbatim, so a newcomer can find them (the stages are stood in for here)."""
    import re

    from simzss.cli import demo

    summary = {"miou_simzss": 18.44, "miou_lit": 0.81, "export": str(tmp_path / "export"),
               "overlay": str(tmp_path / "overlay.png"), "overlay_image": str(tmp_path / "000003.jpg"),
               "overlay_classes": ["snow", "wall", "floor", "apple"], "curves": str(tmp_path / "curves.png")}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: summary)
    assert demo.main(["--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    quoted = re.search(r"`SimZSS mIoU: ([\d.]+)` and `LiT mIoU: ([\d.]+)`", readme)
    assert quoted, "the README's quick start no longer quotes the demo's two mIoU lines"
    assert "SimZSS mIoU: 18.4" in out and "LiT mIoU: 0.8" in out
    assert "overlay.png (held-out image 000003.jpg: snow, wall, floor, apple)" in out


def test_demo_config_without_the_demo_fails_at_once_on_the_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`simzss train --config configs/demo.yaml` in a folder where `simzss demo` never ran: the demo's tokenizer is
    written `./demo/tokenizer`, a path that can only be local, so the run stops at once in one line naming it. As
    `demo/tokenizer` it was also a valid hub name (org/name): without network that cost a minute of retries and
    45 warning lines before the same error."""
    from simzss.cli.train import main as train_main
    from simzss.config import TrainConfig, load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert load_config(TrainConfig, config).model.tokenizer == "./demo/tokenizer"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("simzss train: config error: model.tokenizer='./demo/tokenizer': "
                                           "tokenizer folder './demo/tokenizer' not found"), err
    assert "huggingface" not in err and "Retrying" not in err and "Traceback" not in err
