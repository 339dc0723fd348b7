"""Tokenizers: loading, training a byte-level BPE on captions, and caption/concept tokenization.

``tokenize_batch`` turns captions plus the character spans of their in-bank concepts into the training
tensors: token ids, attention mask, and for every kept concept a boolean mask over the caption's tokens
(a token belongs to a concept when its character range overlaps one of the concept's word spans).

``simzss tokenizer --shards 'data/shard-{000000..000009}.tar' --out tok/ --vocab-size 8192`` (in
:mod:`simzss.cli.tokenizer`) trains the BPE on the ``KEY.txt`` captions of image-text tar shards; the folder
records what it was trained on (``training_source.json``) so a rerun never keeps a tokenizer of other data.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from simzss.data.clip_tokenizer import build_openclip_tokenizer  # also registers OpenCLIPTokenizerFast
from simzss.data.shards import follow_umask, source_fingerprint, split_key

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
#: In a folder written by ``simzss tokenizer``: the fingerprints of the shards and the settings it was trained with.
TRAINING_SOURCE_FILE = "training_source.json"

Span = Tuple[int, int]
CaptionConcepts = List[Tuple[int, List[Span]]]  # [(class_id, char spans), ...] of one caption


# --------------------------------------------------------------------------------------------------
# Loading and training
# --------------------------------------------------------------------------------------------------


OPENCLIP_TOKENIZER = "open_clip"  # load_tokenizer name of open_clip's CLIP tokenizer
#: What to give instead, said once in every load_tokenizer error (callers should not add their own).
_ADVICE = (f"give the folder written by `simzss tokenizer` or save_pretrained, a Hugging Face hub name, or "
           f"{OPENCLIP_TOKENIZER!r} (CLIP's tokenizer, offline)")


def load_tokenizer(name_or_path: Union[str, Path]) -> PreTrainedTokenizerFast:
    """Load a fast (Rust-backed) Hugging Face tokenizer from a local folder or a hub name.

    A local folder is read with ``local_files_only`` (never a network call). Tokenizers without a pad
    token get their EOS token as pad token (a common convention for GPT-style vocabularies).
    ``"open_clip"`` (when no such folder exists) is CLIP's BPE tokenizer with open_clip's exact ids, built
    offline from the file ``open_clip_torch`` ships (:mod:`simzss.data.clip_tokenizer`).
    """
    name = str(name_or_path)
    local = Path(name).exists()
    if name == OPENCLIP_TOKENIZER and not local:
        return build_openclip_tokenizer()
    if local and not Path(name).is_dir():
        raise ValueError(f"tokenizer path {name!r} is a file; give the folder written by save_pretrained")
    if not local and _looks_local(name):
        raise FileNotFoundError(f"tokenizer folder {name!r} not found; {_ADVICE}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True, local_files_only=local)
    except (OSError, ValueError) as exc:
        where = "local folder" if local else "Hugging Face hub name (or its cached copy)"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"cannot load tokenizer from {where} {name!r} ({detail}); {_ADVICE}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"tokenizer {name!r} is a slow (Python) tokenizer ({type(tokenizer).__name__}); a fast tokenizer "
            "is required for character offsets (convert it or save a tokenizer.json)"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an eos token")
        logger.info("tokenizer %r has no pad token; using its eos token %r", name, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _looks_local(name: str) -> bool:
    """A name that can only be a local path: absolute, ``./``-relative, more than one ``/`` (hub names are
    ``org/name``), or inside a folder that exists here (``runs/tok`` when ``runs/`` exists)."""
    path = Path(name)
    return (path.is_absolute() or name.startswith(".") or len(path.parts) > 2
            or (len(path.parts) == 2 and path.parent.is_dir()))


def training_source(shards: Sequence[str], **settings: Any) -> Dict[str, Any]:
    """What a tokenizer is trained from: each shard's path, size and mtime, plus the training ``settings``."""
    return {"version": 1, "shards": [source_fingerprint(p) for p in shards], "settings": dict(sorted(settings.items()))}


def read_training_source(out_dir: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The ``training_source.json`` of a tokenizer folder; None when absent or unreadable."""
    try:
        return json.loads((Path(out_dir) / TRAINING_SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def train_bpe_tokenizer(
    captions: Iterable[str], out_dir: Union[str, Path], vocab_size: int = 8192, min_frequency: int = 2,
    source: Optional[Dict[str, Any]] = None,
) -> PreTrainedTokenizerFast:
    """Train a lower-casing byte-level BPE on ``captions`` and save it (atomically) to ``out_dir``.

    Special tokens ``<|startoftext|>``, ``<|endoftext|>``, ``<|pad|>`` (ids 0, 1, 2); every encoding
    is wrapped in bos ... eos. Offsets exclude the space a byte-level token carries. The folder is
    written with ``save_pretrained`` so :func:`load_tokenizer` reads it back; ``source`` (see
    :func:`training_source`) is stored in it as ``training_source.json``, in the same atomic swap.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + special tokens), got {vocab_size}")

    counts = {"captions": 0, "skipped": 0}

    def texts() -> Iterator[str]:
        for caption in captions:
            if not isinstance(caption, str) or not caption.strip():
                counts["skipped"] += 1
                continue
            counts["captions"] += 1
            yield caption

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    if counts["skipped"]:
        logger.warning("skipped %d empty or non-text captions", counts["skipped"])
    if counts["captions"] == 0:
        raise ValueError("no captions to train the tokenizer on")
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=True),  # offsets of "Ġdog" cover "dog", not " dog"
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
                pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
                special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    _save_atomic(tokenizer, Path(out_dir), source)
    logger.info("trained a %d-token BPE on %d captions -> %s", tok.get_vocab_size(), counts["captions"], out_dir)
    return tokenizer


def _save_atomic(tokenizer: PreTrainedTokenizerFast, out_dir: Path, source: Optional[Dict[str, Any]] = None) -> None:
    """save_pretrained (plus ``training_source.json``) into a temporary sibling folder, then swap it into place."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old: Optional[Path] = None
    try:
        tokenizer.save_pretrained(str(tmp))
        if source is not None:
            (tmp / TRAINING_SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
        follow_umask(tmp)  # mkdtemp creates 0700; the folder follows the user's umask like other outputs
        if out_dir.exists():
            if not out_dir.is_dir():
                raise NotADirectoryError(f"tokenizer output {out_dir} exists and is not a folder")
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)  # onto an empty folder: allowed by rename(2)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)  # put the previous tokenizer back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Batch tokenization
# --------------------------------------------------------------------------------------------------


def tokenize_batch(
    tokenizer: PreTrainedTokenizerFast,
    captions: List[str],
    concepts: List[CaptionConcepts],
    context_length: int,
    max_concepts: int = 32,
) -> Dict[str, torch.Tensor]:
    """Tokenize captions and map each concept's character spans to a mask over its tokens.

    Returns ``input_ids`` / ``attention_mask`` [B, L] long (right-padded, L = longest caption,
    <= ``context_length``; truncation keeps the tokenizer's EOS last), ``concept_mask`` [B, K, L] bool and
    ``concept_labels`` [B, K] long (-1 = padding), K = the most concepts kept by any caption, capped at
    ``max_concepts`` (K may be 0). A concept that truncation cuts off, wholly or in part, is dropped (the mean
    over part of its tokens would be a different concept); beyond ``max_concepts`` the first ones (caption
    order as given) are kept.
    """
    if len(captions) != len(concepts):
        raise ValueError(f"{len(captions)} captions but {len(concepts)} concept lists")
    if context_length < 1 or max_concepts < 0:
        raise ValueError(f"context_length must be >= 1 and max_concepts >= 0, got {context_length}, {max_concepts}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token (load it with simzss.data.tokenize.load_tokenizer)")
    batch = len(captions)
    if batch == 0:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone(),
                "concept_mask": torch.zeros(0, 0, 0, dtype=torch.bool), "concept_labels": empty.clone()}
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {i} is {type(caption).__name__}, expected str")

    kwargs = {} if getattr(tokenizer, "padding_side", "right") == "right" else {"padding_side": "right"}
    enc = tokenizer(
        captions,
        truncation=True,
        max_length=context_length,
        padding="longest",
        return_offsets_mapping=True,
        return_tensors="pt",
        **kwargs,
    )
    input_ids = enc["input_ids"].long()
    attention_mask = enc["attention_mask"].long()
    offsets = enc["offset_mapping"]  # [B, L, 2]; special and pad tokens are (0, 0)
    starts, ends = offsets[..., 0], offsets[..., 1]
    real = (ends > starts) & attention_mask.bool()
    covered_end = torch.where(real, ends, 0).amax(dim=1).tolist()  # the caption text kept by truncation ends here
    length = input_ids.shape[1]

    kept: List[List[Tuple[int, torch.Tensor]]] = []
    for b, caption_concepts in enumerate(concepts):
        row: List[Tuple[int, torch.Tensor]] = []
        for label, spans in caption_concepts:
            label = _check_concept(b, label, spans)
            mask = torch.zeros(length, dtype=torch.bool)
            for s, e in spans:
                mask |= (starts[b] < e) & (ends[b] > s)  # half-open ranges overlap
            mask &= real[b]
            if mask.any() and max(e for _, e in spans) <= covered_end[b]:
                row.append((label, mask))
        if len(row) > max_concepts:
            logger.debug("caption %d: keeping the first %d of %d concepts", b, max_concepts, len(row))
        kept.append(row[:max_concepts])

    k = max((len(row) for row in kept), default=0)
    concept_mask = torch.zeros(batch, k, length, dtype=torch.bool)
    concept_labels = torch.full((batch, k), -1, dtype=torch.long)
    for b, row in enumerate(kept):
        for j, (label, mask) in enumerate(row):
            concept_mask[b, j] = mask
            concept_labels[b, j] = label
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "concept_mask": concept_mask,
        "concept_labels": concept_labels,
    }


def _check_concept(b: int, label: object, spans: Sequence[Span]) -> int:
    """Validate one (class_id, spans) entry; returns the class id as int."""
    try:
        if isinstance(label, bool):
            raise TypeError
        label = operator.index(label)  # int, numpy integer or integer scalar tensor
    except TypeError:
        raise TypeError(f"caption {b}: concept class id {label!r} is not an integer") from None
    if label < 0:
        raise ValueError(f"caption {b}: concept class id {label} is negative")
    for span in spans:
        if len(span) != 2 or not (0 <= span[0] < span[1]):
            raise ValueError(f"caption {b}: invalid concept span {span!r}")
    return label


# --------------------------------------------------------------------------------------------------
# `simzss tokenizer`
# --------------------------------------------------------------------------------------------------


def iter_shard_captions(paths: Sequence[str], stats: Optional[Dict[str, int]] = None) -> Iterator[str]:
    """Yield the UTF-8 ``KEY.txt`` captions of tar shards (stdlib tarfile; nothing is unpickled).

    Unreadable shards and undecodable captions are skipped, counted in ``stats`` and logged.
    """

    stats = stats if stats is not None else {}
    for key in ("shards", "captions", "bad_shards", "bad_captions"):
        stats.setdefault(key, 0)
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard not found: {path}")
        try:
            with tarfile.open(path, mode="r:*") as tar:
                for member in tar:
                    key_ext = split_key(member.name) if member.isfile() else None
                    if key_ext is None or key_ext[1] != "txt":
                        continue
                    data = tar.extractfile(member)
                    try:
                        text = data.read().decode("utf-8") if data is not None else None
                    except UnicodeDecodeError:
                        text = None
                    if text is None:
                        stats["bad_captions"] += 1
                        logger.warning("%s: %s is not UTF-8 text; skipped", path, member.name)
                        continue
                    stats["captions"] += 1
                    yield text.strip()
            stats["shards"] += 1
        except (tarfile.TarError, EOFError, OSError) as exc:
            stats["bad_shards"] += 1
            logger.warning("%s: unreadable tar shard (%s); skipped the rest of it", path, exc)
