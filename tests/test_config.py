"""Config loading: YAML + overrides, unknown keys rejected by name, shipped configs valid, CLI exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from simzss.config import ConfigError, TrainConfig, load_config, to_dict
from simzss.cli.train import main
from simzss.engine.startup_checks import validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_unknown_key_rejected_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_config(TrainConfig, None, ["optim.lrr=1e-3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  text:\n    layerz: 3\n")
    with pytest.raises(ConfigError, match=r"model\.text\.layerz"):
        load_config(TrainConfig, bad)


def test_override_beats_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("batch_size: 64\noptim:\n  lr: 0.001\nmodel:\n  vision:\n    model_kwargs: {depth: 4}\n")
    cfg = load_config(TrainConfig, f, ["optim.lr=0.5", "model.vision.model_kwargs.depth=2", "data.crop_scale=[0.5,1.0]"])
    assert cfg.batch_size == 64
    assert cfg.optim.lr == 0.5
    assert cfg.model.vision.model_kwargs == {"depth": 2}
    assert tuple(cfg.data.crop_scale) == (0.5, 1.0)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_config(TrainConfig, path)
    validate_config(cfg)
    if path.stem.endswith("_lit"):
        assert cfg.model.concept_weight == 0
    assert to_dict(cfg)["model"]["text"]["layers"] == cfg.model.text.layers


def test_paper_settings() -> None:
    cfg = load_config(TrainConfig, ROOT / "configs" / "coco_vitb14.yaml")
    assert cfg.model.vision.name == "vit_base_patch14_reg4_dinov2.lvd142m" and cfg.model.vision.pretrained
    assert (cfg.model.text.layers, cfg.model.text.width) == (12, 512)
    assert (cfg.batch_size, cfg.optim.lr, cfg.optim.scale_lr, cfg.optim.warmup, cfg.epochs) == (1024, 3e-5, True, 0.1, 10)
    assert (cfg.model.concept_weight, cfg.model.tau, cfg.data.image_size) == (0.05, 0.1, 224)
    assert tuple(cfg.data.crop_scale) == (0.9, 1.0)


def test_grad_accum_refused_by_field_name() -> None:
    cfg = load_config(TrainConfig, None, ["grad_accum=4", "data.shards=[x.tar]"])
    with pytest.raises(ConfigError, match="grad_accum"):
        validate_config(cfg)


def test_cli_exit_code_2_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "optim.no_such_key=1"]) == 2
    assert "optim.no_such_key" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "report_to=carrier-pigeon"]) == 2
    assert "report_to" in capsys.readouterr().err


def test_cli_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--print-config", "batch_size=3"]) == 0
    assert "batch_size: 3" in capsys.readouterr().out


def test_text_fields_take_enum_words_literally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19, defect 2: `mixed_precision=no` is the word "no", not YAML's false, on the command line and in a
    file; the same holds for every text field (report_to, run_name ...), while bool fields still read yes/no."""
    cfg = load_config(TrainConfig, None, ["mixed_precision=no", "report_to=none", "run_name=1e3", "cpu=yes",
                                          "resume=null", "model.tokenizer='on'"])
    assert (cfg.mixed_precision, cfg.report_to, cfg.run_name) == ("no", "none", "1e3")
    assert cfg.cpu is True and cfg.resume is None and cfg.model.tokenizer == "on"
    validate_config(dataclasses_replace_shards(cfg))
    f = tmp_path / "c.yaml"
    f.write_text("mixed_precision: no\nrun_name: 007\ncpu: no\nresume: null\nmodel:\n  tokenizer: off\n"
                 "  vision:\n    pretrained: false\n")
    cfg = load_config(TrainConfig, f)
    assert (cfg.mixed_precision, cfg.run_name, cfg.model.tokenizer) == ("no", "007", "off")
    assert cfg.cpu is False and cfg.resume is None and cfg.model.vision.pretrained is False
    # through the command, as the newcomer typed it
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "mixed_precision=no", "--print-config"]) == 0
    assert "mixed_precision: 'no'" in capsys.readouterr().out
    # a word outside the enum is still refused by name
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "mixed_precision=maybe", "--print-config"]) == 2
    assert "mixed_precision must be one of" in capsys.readouterr().err


def dataclasses_replace_shards(cfg: TrainConfig) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=["x.tar"]))


def test_overrides_after_resume(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18, item 8: `simzss train --config c.yaml --resume latest max_steps=62` takes the override."""
    demo = str(ROOT / "configs" / "demo.yaml")
    assert main(["--config", demo, "--resume", "latest", "max_steps=62", "optim.lr=0.01", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 62" in out and "resume: latest" in out and "lr: 0.01" in out
    assert main(["max_steps=61", "--config", demo, "--print-config", "--resume", "runs/x"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 61" in out and "resume: runs/x" in out


def test_train_device_option(capsys: pytest.CaptureFixture[str]) -> None:
    """--device cpu is the config's cpu: true; a CUDA device on a machine without one is a usage error."""
    import torch

    demo = str(ROOT / "configs" / "demo.yaml")
    assert main(["--config", demo, "--device", "cpu", "--print-config"]) == 0
    assert "cpu: true" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["--config", demo, "--device", "cuda", "--print-config"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_data_workers_auto_by_default_and_resolved_from_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from simzss.config import ConfigError, DataConfig, TrainConfig, load_config
    from simzss.data import loader

    assert DataConfig().workers == "auto"
    assert load_config(TrainConfig, None, ["data.workers=6"]).data.workers == 6
    assert load_config(TrainConfig, None, ["data.workers=auto"]).data.workers == "auto"
    for bad in ("data.workers=-1", "data.workers=many"):
        with pytest.raises(ConfigError, match="data.workers must be auto or a number"):
            load_config(TrainConfig, None, [bad])
    with pytest.raises(ConfigError, match="data.workers"):  # OmegaConf's own words for a boolean
        load_config(TrainConfig, None, ["data.workers=true"])
    # cores per training process on the node, less two for the loop (less one on small machines)
    assert [loader.auto_workers(c, 1) for c in (1, 2, 3, 4, 16)] == [0, 1, 2, 2, 14]
    assert loader.auto_workers(96, 8) == 10 and loader.auto_workers(7, 1) == 5 and loader.auto_workers(4, 8) == 0
    monkeypatch.setattr(loader, "usable_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader.resolve_workers("auto") == 6 and loader.resolve_workers(3) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader.resolve_workers("auto") == 14
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")  # a launcher's garbage: one process, a warning, no traceback
    assert loader.resolve_workers("auto") == 14
