"""Data files shipped with simzss (``classnames/*.txt``, ``synonyms.txt``, ``templates.json``) and their readers."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Dict, List, Sequence, Tuple, Union

# Evaluation datasets whose class names make up the default concept bank, in union order.
DEFAULT_BANK_SOURCES: Tuple[str, ...] = ("voc20", "context59", "coco_object80", "coco_stuff171", "cityscapes19", "ade20k150")
CLASSNAME_FILES: Dict[str, int] = {  # resource name -> expected number of classes
    "voc20": 20,
    "context59": 59,
    "coco_object80": 80,
    "coco_stuff171": 171,
    "cityscapes19": 19,
    "ade20k150": 150,
    "imagenet1k": 1000,
}


def resource_text(relpath: str) -> str:
    """The text of a packaged resource file, by path relative to ``simzss/resources``."""
    ref = resources.files("simzss.resources").joinpath(*relpath.split("/"))
    if not ref.is_file():
        raise FileNotFoundError(f"built-in resource not found: simzss/resources/{relpath}")
    return ref.read_text(encoding="utf-8")


def available_classnames() -> List[str]:
    """Names accepted by :func:`load_classnames`."""
    return sorted(CLASSNAME_FILES)


@lru_cache(maxsize=None)
def _classnames(name: str) -> Tuple[str, ...]:
    if name not in CLASSNAME_FILES:
        raise KeyError(f"unknown class-name list {name!r}; available: {', '.join(available_classnames())}")
    lines = resource_text(f"classnames/{name}.txt").splitlines()
    # lines starting with "#" are provenance comments (e.g. the mmseg METAINFO the id order follows)
    names = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if len(names) != CLASSNAME_FILES[name]:
        raise RuntimeError(f"classnames/{name}.txt has {len(names)} names, expected {CLASSNAME_FILES[name]}")
    return names


def load_classnames(name: str) -> List[str]:
    """Class names of a built-in dataset list (index i = label i; background excluded), e.g. ``"voc20"``."""
    return list(_classnames(name))


@lru_cache(maxsize=None)
def _templates() -> Dict[str, Tuple[str, ...]]:
    data = json.loads(resource_text("templates.json"))
    return {k: tuple(v) for k, v in data.items()}


def available_templates() -> List[str]:
    """Names accepted by :func:`load_templates`."""
    return sorted(_templates())


def load_templates(name: str) -> List[str]:
    """Prompt templates with one ``{}`` placeholder: ``"imagenet80"``, ``"tcl9"`` or ``"single"``."""
    templates = _templates()
    if name not in templates:
        raise KeyError(f"unknown template set {name!r}; available: {', '.join(sorted(templates))}")
    return list(templates[name])


def resolve_templates(templates: Union[str, Sequence[str]]) -> List[str]:
    """Prompt templates from a set name (imagenet80, tcl9, single) or an explicit list; each must hold one ``{}``.

    Unknown names and malformed templates raise ``ValueError`` (commands report it as bad input).
    """
    if isinstance(templates, str):
        try:
            out = load_templates(templates)
        except KeyError as e:
            raise ValueError(str(e).strip("'\"")) from None
    else:
        out = list(templates)
    if not out:
        raise ValueError("empty template list")
    bad = [t for t in out if t.count("{}") != 1]
    if bad:
        raise ValueError(f"templates must contain exactly one '{{}}' placeholder, got {bad[:3]}")
    return out
