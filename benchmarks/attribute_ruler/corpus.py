"""Real-world English sentences from Debian's `fortunes` package (fortune-mod data, 1:1.99.1-7.3).

    python corpus.py [--dir /usr/share/games/fortunes] [--out sentences.txt]

Every fortune cookie file except ``ascii-art`` (drawings) and ``translate-me`` (non-English) is split on
``%`` lines; each cookie is whitespace-normalised (backspace overstrikes removed), split into sentences at
``.!?`` followed by a space and an upper-case letter / quote, and kept when it has 4..60 words and is
mostly letters. Duplicates are dropped; the order is file name, then position (deterministic).
Also writes ``cookies_raw.jsonl``: the whole cookies with their line breaks and spacing (<= 200 words), so that
whitespace tokens (``_SP``) are exercised too.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

EXCLUDE = {"ascii-art", "translate-me"}
SPLIT = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+(?=[\"'(]?[A-Z])")


def cookies(path: Path, raw: bool = False):
    text = path.read_bytes().decode("utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)  # overstrike (bold / underline) sequences
    for cookie in re.split(r"^%\s*$", text, flags=re.M):
        yield cookie.strip("\n") if raw else " ".join(cookie.split())


def raw_cookies(folder: Path):
    """Whole cookies as written (line breaks, indentation, runs of spaces kept): spaCy makes SPACE tokens of them."""
    seen: set[str] = set()
    for path in sorted(folder.iterdir()):
        if "." in path.name or path.name in EXCLUDE or not path.is_file():
            continue
        for cookie in cookies(path, raw=True):
            if cookie.strip() and cookie not in seen and len(cookie.split()) <= 200:
                seen.add(cookie)
                yield path.name, cookie


def sentences(folder: Path):
    seen: set[str] = set()
    for path in sorted(folder.iterdir()):
        if "." in path.name or path.name in EXCLUDE or not path.is_file():
            continue
        for cookie in cookies(path):
            for sent in SPLIT.split(cookie):
                sent = sent.strip()
                words = sent.split()
                if not 4 <= len(words) <= 60 or sent in seen:
                    continue
                letters = sum(ch.isalpha() for ch in sent)
                if letters < 0.6 * len(sent.replace(" ", "")):
                    continue
                seen.add(sent)
                yield path.name, sent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/usr/share/games/fortunes")
    ap.add_argument("--out", default=str(Path(__file__).with_name("sentences.tsv")))
    args = ap.parse_args()
    rows = list(sentences(Path(args.dir)))
    with open(args.out, "w", encoding="utf-8") as f:
        for name, sent in rows:
            f.write(f"{name}\t{sent}\n")
    words = sum(len(s.split()) for _, s in rows)
    raw = list(raw_cookies(Path(args.dir)))
    with open(Path(args.out).with_name("cookies_raw.jsonl"), "w", encoding="utf-8") as f:
        for name, cookie in raw:
            f.write(json.dumps({"file": name, "text": cookie}) + "\n")
    print(f"{len(raw)} raw cookies (whitespace kept) -> cookies_raw.jsonl")
    print(f"{len(rows)} sentences, {words} words, from {len({n for n, _ in rows})} files -> {args.out}")


if __name__ == "__main__":
    main()
