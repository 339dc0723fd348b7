"""The concept bank: the vocabulary of class names whose concepts become training targets (with synonyms)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from simzss.concepts.extract import ConceptExtractor
from simzss.resources import DEFAULT_BANK_SOURCES, load_classnames, resource_text

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
BUILTIN_PREFIX = "builtin:"  # ConceptBank.from_file("builtin:NAME") reads simzss/resources/banks/NAME.txt


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
    def from_file(cls, path: PathLike, synonyms: Union[None, PathLike, Sequence[Sequence[str]]] = None,
                  report_unreachable: bool = True) -> "ConceptBank":
        """Read one name per line (``#`` comments and blank lines skipped; duplicates warned and dropped).

        ``report_unreachable`` logs the names that can never match by their form alone (False: the caller
        reports its own, parsed count, as ``simzss prepare`` does).

        ``path`` may also be ``builtin:NAME``, a bank shipped in ``simzss/resources/banks/NAME.txt`` (e.g.
        ``builtin:release574``, the official release's 574-name vocabulary).
        """
        if str(path).startswith(BUILTIN_PREFIX):
            name = str(path)[len(BUILTIN_PREFIX):]
            try:
                text = resource_text(f"banks/{name}.txt")
            except FileNotFoundError:
                raise FileNotFoundError(f"unknown built-in concept bank {str(path)!r}; use a file path or builtin:release574") from None
        else:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"concept bank file not found: {path}")
            text = path.read_text(encoding="utf-8")
        names: List[str] = []
        first_line: Dict[str, int] = {}
        for lineno, line in enumerate(text.splitlines(), start=1):
            name = normalize_name(line.split("#", 1)[0])
            if not name:
                continue
            if name in first_line:
                # a shipped bank's duplicates are known (release574: "bed" / "bed "): not worth a warning each run
                log = logger.info if str(path).startswith(BUILTIN_PREFIX) else logger.warning
                log("%s:%d: duplicate name %r (first on line %d); ignored", path, lineno, name, first_line[name])
                continue
            first_line[name] = lineno
            names.append(name)
        if not names:
            raise ValueError(f"concept bank file {path} contains no names")
        bank = cls.from_names(names, synonyms)
        if report_unreachable:
            bank._log_unreachable(str(path))
        return bank

    @classmethod
    def default(cls, report_unreachable: bool = True) -> "ConceptBank":
        """Union of the class names of VOC, Pascal Context, COCO-Object, COCO-Stuff, Cityscapes and ADE20K
        (no background), with the built-in synonyms. ``report_unreachable`` as in :meth:`from_file`."""
        names = [n for source in DEFAULT_BANK_SOURCES for n in load_classnames(source)]
        bank = cls.from_names(names, _read_synonyms_text(resource_text("synonyms.txt")))
        if report_unreachable:
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
                "%s: %d of %d names can never match a 'compound + lemma' concept by their form alone "
                "(`simzss prepare` reports the full count, parsed with spaCy): %s",
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


