"""The ``--help`` style of every ``simzss`` command: defaults shown one way, plain text (no reST markup)."""

from __future__ import annotations

import argparse
import re

# ``literal`` -> literal, :func:`name` / :class:`~a.b.Name` -> name
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str) -> str:
    """Strip the reST markup that docstrings use (double back-quotes, ``:role:`` references)."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def has_default(action: argparse.Action) -> bool:
    """True when the option's default is worth showing: not None, False (a flag), an empty list or suppressed
    (identity checks: a default of 0 is a real default)."""
    d = action.default
    return not (d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (list, tuple)) and not d))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (minus reST markup); every option's help ends with ``(default: X)`` when it
    has a meaningful default (not None, False or an empty list), and never repeats a default by hand."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "%(default)" in help_ or not has_default(action):
            return help_
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{help_} (default: %(default)s)"
        return help_

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))


__all__ = ["HelpFormatter", "has_default", "plain_text"]
