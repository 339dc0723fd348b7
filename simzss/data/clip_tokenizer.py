"""CLIP's BPE tokenizer as a Hugging Face fast tokenizer giving open_clip ``SimpleTokenizer``'s exact ids, offline.

The vocabulary and merges come from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (shipped with
``open_clip_torch``), laid out as ``SimpleTokenizer`` builds them: 256 byte symbols, the same with ``</w>``,
the 48,894 merges, then ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407). Text is cleaned as
open_clip cleans it before BPE (``ftfy.fix_text``, HTML unescaped twice, whitespace runs collapsed, stripped,
lower-cased); the ftfy/HTML part cannot be expressed as a ``tokenizers`` normalizer, so
:class:`OpenCLIPTokenizerFast` applies it in Python before encoding. ``truncation=True, max_length=77`` keeps
the end-of-text id last, as open_clip's truncation does. Importing this module registers the class with
``AutoTokenizer`` so a saved copy loads with ``AutoTokenizer.from_pretrained(folder)``.
"""

from __future__ import annotations

import difflib
import gzip
import html
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import ftfy
import regex
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

__all__ = [
    "SOT_TOKEN",
    "EOT_TOKEN",
    "CONTEXT_LENGTH",
    "OpenCLIPTokenizerFast",
    "build_openclip_tokenizer",
    "default_bpe_path",
    "openclip_clean",
]

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
CONTEXT_LENGTH = 77
# open_clip's pre-tokenisation pattern (applied to cleaned, lower-cased text; special tokens are matched first)
_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_NUM_MERGES = 49152 - 256 - 2  # the merges SimpleTokenizer keeps (lines 1 .. 48894 of the file)
# The release's whitespace rule: the `regex` package's \s (Unicode White_Space), not str.split's.
_WHITESPACE = regex.compile(r"\s+")


def openclip_clean(text: str) -> str:
    """open_clip's text cleaning before BPE: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _clean_any(text: Any) -> Any:
    """Clean a string or a list/tuple of strings; anything else (ids, None) is returned as is."""
    if isinstance(text, str):
        return openclip_clean(text)
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return [openclip_clean(t) for t in text]
    return text


def _offset_maps(raw: str, cleaned: str) -> tuple[list[int], list[int]]:
    """Where each character boundary of ``cleaned`` lies in ``raw``: (start of char j, end of char j - 1).

    Characters kept as they were (up to case) map one to one; a run that cleaning rewrote (an HTML entity,
    collapsed whitespace, a character ftfy fixed) maps to the whole raw run it came from.
    """
    if len(raw) == len(cleaned) and raw.lower() == cleaned:  # the common case: only lower-cased
        ident = list(range(len(raw) + 1))
        return ident, ident
    lowered = [c.lower() for c in raw]  # per character, so each lowered char knows its raw char
    back = [i for i, low in enumerate(lowered) for _ in low]
    starts, ends = [len(raw)] * (len(cleaned) + 1), [0] * (len(cleaned) + 1)
    matcher = difflib.SequenceMatcher(None, "".join(lowered), cleaned, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        for k in range(j2 - j1):
            lo, hi = (i1 + k, i1 + k + 1) if tag == "equal" else (i1, i2)
            starts[j1 + k] = back[lo] if lo < len(back) else len(raw)
            ends[j1 + k + 1] = back[hi - 1] + 1 if hi > 0 else 0
    return starts, ends


def _restore_offsets(enc: Any, raw: Any, cleaned: Any) -> None:
    """Rewrite ``enc["offset_mapping"]`` (lists, tensors or arrays; batched or not) from cleaned-text to raw-text
    character positions, in place. Special and pad tokens keep (0, 0)."""
    raws, cleans = ([raw], [cleaned]) if isinstance(raw, str) else (list(raw), list(cleaned))
    offsets = enc["offset_mapping"]
    rows: Any
    if hasattr(offsets, "reshape"):  # torch tensor / numpy array: rows are views, edited in place
        size = offsets.numel() if hasattr(offsets, "numel") else offsets.size
        if size == 0 or offsets.shape[-1] != 2:
            return
        rows = offsets.reshape(-1, offsets.shape[-2], 2)
    else:
        rows = [offsets] if isinstance(raw, str) else offsets
    if len(rows) != len(raws):  # overflowing windows: positions stay in cleaned-text terms
        return
    for row, r, c in zip(rows, raws, cleans):
        if r == c:
            continue
        starts, ends = _offset_maps(r, c)
        for t in range(len(row)):
            s, e = int(row[t][0]), int(row[t][1])
            if e > s:
                if isinstance(row, list):
                    row[t] = (starts[s], ends[e])
                else:
                    row[t][0], row[t][1] = starts[s], ends[e]


class OpenCLIPTokenizerFast(PreTrainedTokenizerFast):
    """A ``PreTrainedTokenizerFast`` that applies :func:`openclip_clean` to raw text before encoding.

    Pre-split input (``is_split_into_words=True``) is passed through unchanged. Offsets (when asked for) are
    character positions in the text as given, mapped back through the cleaning (for text pairs they refer to
    the cleaned texts).
    """

    if hasattr(PreTrainedTokenizerFast, "_batch_encode_plus"):  # transformers 4.x: every path ends here

        def _batch_encode_plus(self, batch_text_or_text_pairs: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("is_split_into_words", False):
                return super()._batch_encode_plus(batch_text_or_text_pairs, *args, **kwargs)
            raw = list(batch_text_or_text_pairs)
            cleaned = [tuple(_clean_any(t) for t in item) if isinstance(item, tuple) else _clean_any(item) for item in raw]
            enc = super()._batch_encode_plus(cleaned, *args, **kwargs)
            if kwargs.get("return_offsets_mapping") and all(isinstance(t, str) for t in raw):
                _restore_offsets(enc, raw, cleaned)
            return enc

    else:  # transformers 5.x: __call__, encode and tokenize all end in _encode_plus

        def _encode_plus(self, text: Any, text_pair: Any = None, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("is_split_into_words", False):
                return super()._encode_plus(text, text_pair, *args, **kwargs)
            cleaned = _clean_any(text)
            enc = super()._encode_plus(cleaned, _clean_any(text_pair), *args, **kwargs)
            if kwargs.get("return_offsets_mapping") and text_pair is None and cleaned is not text:
                _restore_offsets(enc, text, cleaned)
            return enc


class _OpenCLIPTokenizerConfig(PretrainedConfig):
    """Placeholder config type: ``AutoTokenizer.register`` keys tokenizer classes by a config class."""

    model_type = "simzss_openclip_tokenizer"


AutoTokenizer.register(_OpenCLIPTokenizerConfig, fast_tokenizer_class=OpenCLIPTokenizerFast, exist_ok=True)


def default_bpe_path() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip_torch`` (not imported)."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (torch, timm, ...)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("CLIP's BPE file comes with open_clip_torch (pip install open_clip_torch), or pass its path")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: open_clip_torch's BPE file is missing; reinstall open_clip_torch or pass its path")
    return path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable-character table (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def _read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    try:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{bpe_path}: not CLIP's gzipped BPE merges file ({e})") from None
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {_NUM_MERGES} merge lines of two symbols each")
    return merges  # type: ignore[return-value]


def build_openclip_tokenizer(bpe_path: Optional[Union[str, os.PathLike]] = None) -> OpenCLIPTokenizerFast:
    """The CLIP tokenizer built from open_clip's BPE file (default: the one ``open_clip_torch`` ships); no network.

    ``pad_token`` is ``<end_of_text>`` (padding never changes a causal text tower's real tokens; argmax pooling
    still finds the first end-of-text), ``model_max_length`` 77.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
    merges = _read_merges(path)
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != len(vocab_list):
        raise ValueError(f"{path}: the merges produce duplicate vocabulary entries; not CLIP's BPE file")
    bpe = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
    tok = Tokenizer(bpe)
    # The offset-preserving part of open_clip's cleaning, so a plain fast-tokenizer load still lower-cases.
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.Sequence([decoders.BPEDecoder(suffix="</w>"), decoders.ByteLevel()])
    sot, eot = vocab[SOT_TOKEN], vocab[EOT_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
        pair=f"{SOT_TOKEN} $A {EOT_TOKEN} $B:1 {EOT_TOKEN}:1",
        special_tokens=[(SOT_TOKEN, sot), (EOT_TOKEN, eot)],
    )
    tok.add_special_tokens([AddedToken(SOT_TOKEN, special=True), AddedToken(EOT_TOKEN, special=True)])
    return OpenCLIPTokenizerFast(
        tokenizer_object=tok,
        bos_token=SOT_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        model_max_length=CONTEXT_LENGTH,
    )
