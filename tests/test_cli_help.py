"""`simzss COMMAND --help`: every option of every command has help, defaults shown one way, no reST markup."""

from __future__ import annotations

import argparse
import importlib
import re
from typing import List

import pytest

from simzss.cli import COMMANDS
from simzss.helpformat import HelpFormatter, has_default, plain_text

MARKUP = re.compile(r"``|:(?:func|class|meth|mod|data|attr):`")


def _parsers(command: str, monkeypatch: pytest.MonkeyPatch) -> List[argparse.ArgumentParser]:
    """The parser `simzss COMMAND --help` prints, and its sub-command parsers."""
    seen: List[argparse.ArgumentParser] = []
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda self, file=None: seen.append(self))
    module, func, _ = COMMANDS[command]
    with pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), func)(["--help"])
    assert exit_.value.code in (0, None)
    assert len(seen) == 1, f"{command}: --help printed {len(seen)} parsers"
    parsers = list(seen)
    for action in seen[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.extend(action.choices.values())
    return parsers


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_one_default_style(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for parser in _parsers(command, monkeypatch):
        assert issubclass(parser.formatter_class, HelpFormatter), f"{parser.prog}: not the shared help style"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help is not argparse.SUPPRESS, f"{parser.prog} {name}: no help"
            if has_default(action):
                # the formatter appends "(default: X)"; a hand-written default would say it twice, differently
                assert not re.search(r"\bdefault\b", action.help), f"{parser.prog} {name}: default written by hand"
        text = parser.format_help()
        assert not MARKUP.search(text), f"{parser.prog}: reST markup in --help"


def test_formatter_output() -> None:
    p = argparse.ArgumentParser(prog="x", description="Uses ``code`` and :func:`simzss.f`.",
                                formatter_class=HelpFormatter)
    p.add_argument("--n", type=int, default=3, help="a number")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--path", help="a path")
    p.add_argument("--seed", type=int, default=0, help="a seed")
    text = p.format_help()
    assert "a number (default: 3)" in text and "a seed (default: 0)" in text
    assert "a flag\n" in text and "a path\n" in text  # no "(default: False/None)" noise
    assert "Uses code and simzss.f." in text
    assert plain_text(":class:`~a.B` and ``c``") == "a.B and c"
