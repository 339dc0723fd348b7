"""Concepts: what a caption talks about (spaCy extraction) and which of those concepts train (the bank).

A caption's concepts are its noun chunks reduced to "last compound child of the root + root lemma"
("two tennis rackets" -> "tennis racket"). Only concepts found in a :class:`ConceptBank` (a vocabulary
of class names) become training targets; the bank maps them to class ids at load time, so shards keep
every concept (``KEY.concepts.json``) and a bank can change without re-preparing.
"""

from simzss.concepts.bank import ConceptBank, naive_singular, normalize_name
from simzss.concepts.extract import (
    DEFAULT_SPACY_MODEL,
    FALLBACK_SPACY_MODEL,
    Concept,
    ConceptExtractor,
    blas_single_threaded,
    doc_concepts,
    load_spacy,
)

__all__ = [
    "DEFAULT_SPACY_MODEL",
    "FALLBACK_SPACY_MODEL",
    "Concept",
    "ConceptBank",
    "ConceptExtractor",
    "blas_single_threaded",
    "doc_concepts",
    "load_spacy",
    "naive_singular",
    "normalize_name",
]
