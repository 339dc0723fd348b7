"""User errors end in one line naming the input and the fix, with a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from fault_helpers import tiny_overrides, write_uneven_shards
from simzss.config import TrainConfig, load_config
from simzss.cli import train as train_cli


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    from conftest import tiny_tokenizer

    root = tmp_path_factory.mktemp("usererr")
    write_uneven_shards(root / "data", [6, 6])
    tiny_tokenizer(root / "tok")
    pickle_weights = root / "weights.pth"
    torch.save({"model": RunsCode()}, pickle_weights)  # unpickling it would call a function
    torch.save({"model": argparse.Namespace(a=1)}, root / "namespace.pth")  # loads, but is no state dict
    return {"root": root, "pickle": pickle_weights}


def _args(base: Dict[str, Path], *extra: str) -> List[str]:
    root = base["root"]
    return tiny_overrides(root, f"data.shards=[{root / 'data'}]", f"model.tokenizer={root / 'tok'}", "data.workers=0",
                          *extra)


class RunsCode:
    """Pickles as a call of ``os.getpid``: what a hostile weights file does with ``os.system``."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.getpid, ())


CASES = {
    "missing shard": (["data.shards=[/nonexistent/a.tar]"], "/nonexistent/a.tar"),
    "missing tokenizer": (["model.tokenizer=/nonexistent"], "/nonexistent"),
    "batch larger than the data": (["batch_size=5000"], "batch_size"),
    "negative workers": (["data.workers=-1"], "data.workers"),
    "missing concept bank": (["data.concept_bank=/nonexistent.txt"], "/nonexistent.txt"),
    "README brace override": (["data.shards=[/data/…/{00000..00059}.tar]"], "/data/…/00000.tar"),
    # text fields (run_name, mixed_precision ...) take any value literally (issue 19); other fields are YAML
    "unparseable override": (["optim.lr={oops"], "optim.lr"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_user_error_is_one_line(case: str, base: Dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    extra, named = CASES[case]
    rc = train_cli.main(_args(base, *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert named in err, err


def test_vision_weights_holding_a_pickle(base: Dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = train_cli.main(_args(base, f"model.vision.weights={base['pickle']}"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(base["pickle"]) in err and "pickle" in err and "safetensors" in err
    rc = train_cli.main(_args(base, f"model.vision.weights={base['root'] / 'namespace.pth'}"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "namespace.pth" in err, err


def test_readme_brace_list_override_is_accepted() -> None:
    cfg = load_config(TrainConfig, None, ["data.shards=[/data/cc3m/{00000..00059}.tar, /data/x/{a,b}.tar]"])
    assert cfg.data.shards == ["/data/cc3m/{00000..00059}.tar", "/data/x/{a,b}.tar"]


def test_vision_pretrained_takes_a_local_path(capsys) -> None:
    """model.vision.pretrained accepts a local weights file or folder (as model.vision.weights); a missing one is
    a one-line error naming it."""
    from simzss.cli import train as train_cli
    from simzss.config import ConfigError, TrainConfig, load_config

    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    cfg = load_config(TrainConfig, config, ["model.vision.pretrained=/models/dinov2"])
    assert cfg.model.vision.weights == "/models/dinov2" and cfg.model.vision.pretrained is True
    with pytest.raises(ConfigError, match="two weights files"):
        load_config(TrainConfig, config, ["model.vision.pretrained=/a", "model.vision.weights=/b"])
    assert train_cli.main(["--config", str(config), "model.vision.pretrained=/models/dinov2",
                           "eval.datasets=[]", "data.shards=[/nonexistent/a.tar]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
