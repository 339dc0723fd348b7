"""The README's bash blocks run as written.

Blocks that fit on a CPU with toy data are run, in order, in a scratch folder next to the repository's configs.
A block whose first line is ``# needs: ...`` (real data, a GPU, the network) is skipped; those blocks are listed,
and each of their ``simzss`` / ``train.py`` commands is still parsed by the command's own parser (options, and for
``train`` the config file and every override key), so a renamed option or config key breaks this test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from simzss.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEEDS = re.compile(r"^#\s*needs:\s*(.+)$")


def readme_blocks() -> List[Tuple[str, Optional[str]]]:
    """(block text, what it needs or None) for every ```bash block of the README, in order."""
    out = []
    for m in re.finditer(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        text = m.group(1)
        first = text.strip().splitlines()[0] if text.strip() else ""
        needs = NEEDS.match(first)
        out.append((text, needs.group(1).strip() if needs else None))
    return out


def commands(block: str) -> List[str]:
    """The block's command lines, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


# Anything that would make bash run a command (lists, pipes, redirections, substitutions): never expanded.
SHELL_CONTROL = re.compile(r"&&|\|\||[;|<>`]|\$\(")


def bash_words(line: str) -> List[str]:
    """The words bash makes of ``line`` (quotes, braces, globs and variables expanded), without running it.

    Only a simple command is expanded: ``line`` must hold no shell control (``&&``, ``;``, pipes, redirections,
    command substitution), which would run something."""
    if SHELL_CONTROL.search(line):
        raise ValueError(f"not a simple command, refusing to expand: {line}")
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, check=True, cwd=ROOT)
    return [w.decode() for w in out.stdout.split(b"\0")[:-1]]


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parse_only(command: str, argv: List[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """Run the command's argument parsing (its real parser) and stop right after it."""
    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_intermixed_args")}

    def stopper(name: str):  # type: ignore[no-untyped-def]
        def parse_and_stop(self: argparse.ArgumentParser, args=None, namespace=None):  # type: ignore[no-untyped-def]
            raise _Parsed(originals[name](self, args, namespace))
        return parse_and_stop

    module, func, _ = COMMANDS[command]
    with monkeypatch.context() as m:
        for name in originals:  # train parses intermixed (overrides after options)
            m.setattr(argparse.ArgumentParser, name, stopper(name))
        with pytest.raises(_Parsed) as parsed:
            getattr(importlib.import_module(module), func)(argv)
    return parsed.value.namespace


def check_parses(line: str, monkeypatch: pytest.MonkeyPatch) -> Optional[str]:
    """Parse one README command line with its own parser; returns the command name checked (None: not ours)."""
    first = shlex.split(line)
    while first and re.match(r"^[A-Z_][A-Z0-9_]*=", first[0]):
        first = first[1:]
    if not first or (first[0] != "simzss" and "train.py" not in first):
        return None  # not ours (installs, img2dataset, python -c ...): syntax-checked only
    words = bash_words(line)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:1] == ["simzss"]:
        command, argv = words[1], words[2:]
    elif "train.py" in words:
        command, argv = "train", words[words.index("train.py") + 1 :]
    else:
        return None
    ns = parse_only(command, argv, monkeypatch)
    if command == "train":
        from simzss.config import TrainConfig, load_config, to_dict

        cfg = load_config(TrainConfig, str(ROOT / ns.config), ns.overrides)  # unknown keys raise
        assert to_dict(cfg)["data"]["shards"], f"{line}: no data.shards"
    return command


def test_blocks_that_need_real_data_are_marked_and_their_commands_parse(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    skipped = [(text, needs) for text, needs in readme_blocks() if needs]
    assert skipped and any(needs is None for _, needs in readme_blocks())
    checked = []
    for text, needs in skipped:
        for line in commands(text):
            subprocess.run(["bash", "-n", "-c", line], check=True)  # shell syntax
            name = check_parses(line, monkeypatch)
            if name:
                checked.append(name)
    with capsys.disabled():
        print(f"\nREADME blocks skipped (not runnable on a CPU with toy data): {len(skipped)}")
        for text, needs in skipped:
            print(f"  needs {needs}: {commands(text)[0][:90]}")
    for expected in ("shards", "prepare", "train", "export", "eval", "segment", "cache-features"):
        assert expected in checked, f"no README command of {expected} was checked"


def test_multi_gpu_example_is_complete() -> None:
    lines = [ln for text, _ in readme_blocks() for ln in commands(text) if ln.startswith("accelerate launch")]
    assert lines and all("data.shards=" in ln for ln in lines)
    assert all("--num_processes 8" in ln for ln in lines)


def test_runnable_blocks_run_as_written(tmp_path: Path) -> None:
    runnable = [text for text, needs in readme_blocks() if needs is None]
    assert runnable, "the README has no block the test can run"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    for text in runnable:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=400)
        assert proc.returncode == 0, f"README block failed:\n{text}\n--- stderr ---\n{proc.stderr[-4000:]}"
        assert "Traceback" not in proc.stderr
        # redirected output: progress lines, not carriage-return frames
        assert "\r" not in proc.stderr
    results = json.loads((tmp_path / "quickstart" / "eval.json").read_text())
    assert "folder:quickstart/data/val" in results["results"]
    assert (tmp_path / "quickstart" / "overlay.png").stat().st_size > 0
    # the CPU block writes only to its own folder: it never clobbers the output of `simzss demo` (demo/)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "quickstart"]
    # run again as the README says it behaves: its first command refuses in one line naming --overwrite (exit 2)
    first = commands(runnable[0])[0]
    assert first.startswith("simzss demo-data quickstart/")
    again = subprocess.run(["bash", "-c", first], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr and again.stderr.count("\n") == 1, again.stderr
    assert "delete `quickstart/` first" in README.read_text(encoding="utf-8")


def test_every_block_says_what_you_should_see() -> None:
    """Each bash block is followed, within a few lines, by a "What you should see" line."""
    text = README.read_text(encoding="utf-8")
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        after = text[m.end():m.end() + 400]
        assert "What you should see" in after, f"no 'What you should see' after the block:\n{m.group(1)[:200]}"
