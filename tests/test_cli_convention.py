"""The CLI convention (CONTRIBUTING.md, "Add a command"), checked by walking every subcommand's parser.

- every command module exposes ``build_parser()``: prog ``simzss NAME``, the shared help style, a description
  that does not repeat ``simzss NAME:``, and at least one example under ``examples:``;
- ``--device auto|cpu|cuda[:i]`` wherever a model runs, ``--no-progress`` wherever there is a progress bar,
  ``--overwrite`` wherever an output folder could be replaced, ``--max-pixels`` wherever user pictures are decoded;
- old spellings still parse, with a deprecation line (``eval --cpu``, ``demo --fresh``);
- exit code 2 for a usage error (a natural mistake per command: its input does not exist), 1 for a failed run
  (an output that cannot be written), with one ``simzss NAME: ...`` line and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Dict, List

import pytest

from simzss.cli import COMMANDS, main
from simzss.cli.options import device_type
from simzss.helpformat import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
NOWHERE = "/no/such/place"

# Which commands each shared option belongs to (a new command must be added to the lists that fit it).
MODEL_RUNS = {"train", "eval", "segment", "serve", "cache-features"}
PROGRESS = {"demo", "shards", "prepare", "tokenizer", "train", "eval", "convert-benchmark", "cache-features"}
REPLACES_FOLDERS = {"demo", "demo-data", "shards", "prepare", "tokenizer", "export", "convert-benchmark",
                    "cache-features", "import-official"}
DECODES_USER_PICTURES = {"segment", "serve", "shards"}

# A natural mistake per command: the input it names does not exist -> exit code 2.
MISSING_INPUT: Dict[str, List[str]] = {
    "demo": ["--config-dir", NOWHERE, "--workdir", "{tmp}/w"],
    "demo-data": ["{tmp}/d", "--num-train", "-5"],
    "shards": ["coco", "--captions", f"{NOWHERE}/captions.json", "--images", NOWHERE, "--out", "{tmp}/s"],
    "prepare": [f"{NOWHERE}/a.tar", "--out", "{tmp}/p"],
    "tokenizer": ["--shards", NOWHERE, "--out", "{tmp}/t"],
    "train": ["--config", f"{NOWHERE}/c.yaml"],
    "eval": [NOWHERE, "--datasets", f"folder:{NOWHERE}"],
    "export": [NOWHERE, "{tmp}/e"],
    "segment": [f"{NOWHERE}/a.jpg", "--model", NOWHERE, "--labels", "a", "--out", "{tmp}/o.png"],
    "report": [f"{NOWHERE}/r.json", "--out", "{tmp}/r"],
    "plot": [NOWHERE, "--out", "{tmp}/p.png"],
    "serve": [NOWHERE, "--device", "cpu"],
    "convert-benchmark": ["cityscapes", NOWHERE, "--out", "{tmp}/cb"],
    "cache-features": [f"{NOWHERE}/a.tar", "--out", "{tmp}/cf", "--model-config", str(REPO / "configs" / "demo.yaml")],
    "import-official": [f"{NOWHERE}/x.pt", "--out", "{tmp}/io"],
}
# A run that cannot write its output -> exit code 1, checked before any work. /proc takes no new files, even for
# root (the tests may run as root, where a chmod-ed folder would still be writable).
UNWRITABLE = "/proc/simzss-test/out"
FAILED_RUN: Dict[str, List[str]] = {
    "train": ["--config", str(REPO / "configs" / "demo.yaml"), f"output_dir={UNWRITABLE}", "data.shards=[x]"],
    "eval": [NOWHERE, "--datasets", "folder:{tmp}", "--out", f"{UNWRITABLE}/r.json"],
    "report": ["{tmp}/r.json", "--out", UNWRITABLE],
    "plot": ["{tmp}", "--out", f"{UNWRITABLE}.png"],
    "segment": [str(REPO / "docs" / "demo_overlay.png"), "--model", NOWHERE, "--labels", "a", "--out",
                f"{UNWRITABLE}/o.png"],
}


def build_parser(name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(COMMANDS[name][0])
    assert hasattr(module, "build_parser"), f"{module.__name__} must expose build_parser() (the CLI convention)"
    return module.build_parser()


def options(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """The options of a parser and of its sub-parsers (``simzss shards coco|table|resize``)."""
    found = dict(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(options(sub))
    return found


def test_every_command_is_listed_for_the_convention() -> None:
    assert set(MISSING_INPUT) == set(COMMANDS), "add the new command to MISSING_INPUT (and the option lists)"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_parser_style_and_example(name: str) -> None:
    parser = build_parser(name)
    assert parser.prog == f"simzss {name}"
    assert issubclass(parser.formatter_class, HelpFormatter)
    assert parser.description and not parser.description.lstrip().startswith(f"simzss {name}:")
    assert parser.epilog and parser.epilog.startswith("examples:\n")
    examples = [line.strip() for line in parser.epilog.splitlines()[1:] if line.strip()]
    assert examples and all(f"simzss {name}" in e or f"simzss.cli {name}" in e for e in examples), examples
    assert "examples:" in parser.format_help()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_shared_options_where_they_apply(name: str) -> None:
    opts = options(build_parser(name))
    if name in MODEL_RUNS:
        device = opts.get("--device")
        assert device is not None, f"simzss {name}: a model runs here, so it takes --device"
        assert device.type is device_type and device.default == "auto"
    for option, where in (("--no-progress", PROGRESS), ("--overwrite", REPLACES_FOLDERS),
                          ("--max-pixels", DECODES_USER_PICTURES)):
        if name in where:
            assert option in opts, f"simzss {name} lacks {option}"
            assert opts[option].help


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_values(value: str) -> None:
    for name in sorted(MODEL_RUNS):
        parser = build_parser(name)
        required = {"train": [], "eval": ["m", "--datasets", "x:y"], "segment": ["i", "--model", "m", "--labels",
                    "a", "--out", "o.png"], "serve": ["m"], "cache-features": ["s.tar", "--out", "o"]}[name]
        assert parser.parse_args([*required, "--device", value]).device == value


@pytest.mark.parametrize("name", sorted(MODEL_RUNS))
def test_bad_device_is_a_usage_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--device", "tpu"])
    assert e.value.code == 2 and "is not a device" in capsys.readouterr().err


def test_old_spellings_still_work_with_a_deprecation_line(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser("eval").parse_args(["m", "--datasets", "x:y", "--cpu"])
    assert args.device == "cpu"
    assert "--cpu is deprecated" in capsys.readouterr().err
    args = build_parser("demo").parse_args(["--fresh"])
    assert args.overwrite is True
    assert "--fresh is deprecated" in capsys.readouterr().err
    assert build_parser("demo").parse_args([]).overwrite is False


@pytest.mark.parametrize("name", sorted(MISSING_INPUT))
def test_missing_input_is_exit_2_in_one_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in MISSING_INPUT[name]]
    try:
        code = main([name, *argv])
    except SystemExit as e:  # argparse-level usage errors exit 2 as well
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, f"simzss {name}: exit {code}, expected 2 (usage error): {err[-300:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err
    assert lines[-1].startswith(f"simzss {name}: "), lines[-1]


@pytest.mark.parametrize("name", sorted(FAILED_RUN))
def test_unwritable_output_is_exit_1_in_one_line(name: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.json").write_text('{"task": "segmentation", "model": "m", "results": {}}')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in FAILED_RUN[name]]
    code = main([name, *argv])
    err = capsys.readouterr().err
    assert code == 1, f"simzss {name}: exit {code}, expected 1 (a failed run): {err[-300:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"simzss {name}: ") and "/proc" in lines[-1] and "Traceback" not in err


def test_benchmark_names_match_the_converters() -> None:
    """convert-benchmark lists the names without importing the converters (fast --help); the lists agree."""
    from simzss.cli.convert_benchmark import BENCHMARK_NAMES
    from simzss.data.convert.benchmarks import BENCHMARKS

    assert tuple(BENCHMARK_NAMES) == tuple(BENCHMARKS)


@pytest.mark.parametrize("name", sorted(MODEL_RUNS))
def test_device_mps_still_parses_with_a_deprecation_line(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--device mps` was accepted by segment, serve and cache-features before the convention: it keeps working
    for one release (auto picks MPS), with a deprecation line; on a machine without MPS it is a one-line usage
    error, not a traceback."""
    from simzss.cli.options import DeviceError, resolve_device

    assert device_type("mps") == "mps"
    assert "--device mps is deprecated" in capsys.readouterr().err
    required = {"train": [], "eval": ["m", "--datasets", "x:y"], "segment": ["i", "--model", "m", "--labels", "a",
                "--out", "o.png"], "serve": ["m"], "cache-features": ["s.tar", "--out", "o"]}[name]
    assert build_parser(name).parse_args([*required, "--device", "mps"]).device == "mps"
    import torch

    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="MPS is not available"):
            resolve_device("mps")


def test_segment_device_mps_without_mps_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code = main(["segment", str(REPO / "docs" / "demo_overlay.png"), "--model", str(tmp_path), "--labels", "a,b",
                 "--out", str(tmp_path / "o.png"), "--device", "mps"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("simzss segment: --device mps: Apple's MPS is not"), err
