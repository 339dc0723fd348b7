"""Run ``simzss prepare`` with one attribute ruler and numpy's BLAS in both arms (one arm of the speed benchmark).

    python prepare_arm.py fast|spacy  PREPARE-ARGS...

``fast``: simzss's FastAttributeRuler (``load_spacy(fast_pos=True, numpy_gemm=True)``, what ``simzss prepare``
runs by default). ``spacy``: spaCy's own AttributeRuler, everything else equal (``fast_pos=False,
numpy_gemm=True``). The choice is forced on every ``load_spacy`` call of the run (the prepare worker and the
unreachable-bank-name report), then the ``simzss`` CLI runs ``prepare PREPARE-ARGS``. BLAS gets one thread,
as prepare's workers do.
"""
from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import sys

try:  # the concepts module is being moved by the layout refactor (issue 9)
    import simzss.concepts.extract as extract
except ImportError:
    import simzss.concepts as extract
from simzss.cli import main as simzss_main

ARMS = {"fast": True, "spacy": False}


def main() -> int:
    arm, argv = sys.argv[1], sys.argv[2:]
    fast_pos = ARMS[arm]
    original = extract.load_spacy

    calls = []

    def load_spacy(name: str = extract.DEFAULT_SPACY_MODEL, fast_pos_: bool = True, numpy_gemm=None):
        nlp = original(name, fast_pos, True)
        calls.append(f"load_spacy({name!r}, {fast_pos_}, {numpy_gemm}) -> {nlp.get_pipe('attribute_ruler')!r}")
        return nlp

    extract.load_spacy = load_spacy  # ConceptExtractor.nlp looks it up in this module at call time
    rc = simzss_main(["prepare", *argv])
    if not calls:
        raise SystemExit(f"ARM {arm}: the patched load_spacy was never called; the benchmark is invalid")
    print(f"ARM {arm}: " + "; ".join(calls), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
