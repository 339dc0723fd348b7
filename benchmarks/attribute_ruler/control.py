"""Negative control for compare.py: the same comparison must see differences when the ruler really differs.

    python control.py   (600 fortunes sentences; spaCy's pipeline vs the same with attribute_ruler disabled,
                         and vs a FastAttributeRuler missing its TAG=NN pattern)
"""
from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

from pathlib import Path

import spacy

import compare

try:
    from simzss.concepts.extract import use_fast_attribute_ruler
except ImportError:
    from simzss.concepts import use_fast_attribute_ruler

texts = [l.rstrip("\n").split("\t", 1)[1] for l in open(Path(__file__).with_name("sentences.tsv"), encoding="utf-8")][:600]


def count(nlp_other) -> dict:
    std = spacy.load(compare.MODEL, exclude=["ner"])
    a, b = list(std.pipe(texts)), list(nlp_other.pipe(texts))
    diffs = {f: 0 for f in compare.FIELDS}
    for da, db in zip(a, b):
        for ta, tb in zip(da, db):
            for f, x, y in zip(compare.FIELDS, compare.token_row(ta), compare.token_row(tb)):
                diffs[f] += x != y
    return diffs


no_ruler = spacy.load(compare.MODEL, exclude=["ner"])
no_ruler.disable_pipe("attribute_ruler")
print("ruler disabled:", count(no_ruler))
std = spacy.load(compare.MODEL, exclude=["ner"])
patterns = std.get_pipe("attribute_ruler").patterns
minus = spacy.load(compare.MODEL, exclude=["ner"])
use_fast_attribute_ruler(minus)
fast = minus.get_pipe("attribute_ruler")
fast.ruler.clear()
drop = next(i for i, p in enumerate(patterns) if p["patterns"] == [[{"TAG": "NN"}]])
fast.add_patterns(patterns[:drop] + patterns[drop + 1:])
print(f"fast ruler without pattern {patterns[drop]}:", count(minus))
