"""The README, `.ci/run`, the Dockerfile and pyproject agree on how simzss is installed and run."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pip_installs(text: str) -> list[tuple[str, frozenset[str]]]:
    """(target, extras) of every `pip install [-e] TARGET[extras]` in a shell text."""
    found = []
    for match in re.finditer(r"pip install ((?:-[-\w]+ )*)(\"[^\"]+\"|'[^']+'|\S+)", text):
        target = shlex.split(match.group(2))[0]
        m = re.fullmatch(r"(.+?)(?:\[([^\]]*)\])?", target)
        assert m is not None
        extras = frozenset(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
        found.append((m.group(1), extras))
    return found


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", quick, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_quick_start_is_two_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "simzss demo" in demo and "pytest" in tests


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci


def test_dockerfile_installs_the_readme_package_and_extras() -> None:
    demo_install = _pip_installs(_readme_commands()[0])
    docker = (ROOT / "Dockerfile").read_text()
    docker_install = _pip_installs(docker)
    assert demo_install and docker_install
    assert {extras for _, extras in docker_install} == {extras for _, extras in demo_install}
    assert {target for target, _ in docker_install} == {"."} == {target for target, _ in demo_install}
    base = re.search(r"^FROM (\S+)", docker, flags=re.M)
    assert base and base.group(1).startswith("pytorch/pytorch:") and "cuda" in base.group(1) and "runtime" in base.group(1)
    assert re.search(r'^ENTRYPOINT \["simzss"\]', docker, flags=re.M)
    # Everything the package build and the shipped configs need is copied into the image.
    for path in ("pyproject.toml", "simzss", "configs"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", docker, flags=re.M), path


def test_extras_exist_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["optional-dependencies"])
    used = {e for cmd in _readme_commands() for _, extras in _pip_installs(cmd) for e in extras}
    assert used <= declared, used - declared
    assert project["scripts"]["simzss"] == "simzss.cli:main"


def test_torch_is_not_pinned_to_a_local_build() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = [d for d in deps if re.match(r"torch\b(?!vision)", d)]
    assert torch and all("+cpu" not in d and "==" not in d for d in torch)


@pytest.mark.parametrize("name", ["demo", "demo-data", "prepare", "train", "eval", "export", "segment", "tokenizer", "cache-features"])
def test_every_cli_command_resolves(name: str) -> None:
    import importlib

    from simzss.cli import COMMANDS

    module, func, _ = COMMANDS[name]
    assert callable(getattr(importlib.import_module(module), func))
