"""Class names and prompt templates for the zero-shot evaluations (resources owned by :mod:`simzss.concepts`)."""

from __future__ import annotations

from typing import List, Sequence, Union

from simzss.concepts import load_classnames as _load_classnames
from simzss.concepts import load_templates as _load_templates

TEMPLATE_SETS = ("imagenet80", "tcl9", "single")


def load_classnames(name: str) -> List[str]:
    """Class names of a packaged list (``voc20``, ``context59``, ``imagenet1k``, ...), in class-id order."""
    return list(_load_classnames(name))


def load_templates(templates: Union[str, Sequence[str]]) -> List[str]:
    """Prompt templates from a set name (imagenet80, tcl9, single) or an explicit list; each must hold one ``{}``."""
    if isinstance(templates, str):
        try:
            out = _load_templates(templates)
        except KeyError as e:  # the CLI reports ValueErrors as bad input
            raise ValueError(str(e).strip("'\"")) from None
    else:
        out = list(templates)
    if not out:
        raise ValueError("empty template list")
    bad = [t for t in out if t.count("{}") != 1]
    if bad:
        raise ValueError(f"templates must contain exactly one '{{}}' placeholder, got {bad[:3]}")
    return out


__all__ = ["TEMPLATE_SETS", "load_classnames", "load_templates"]
