"""Tokenizer loading/training, concept span -> token mapping, and the ``simzss tokenizer`` command."""

from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from simzss.cli import tokenizer as tokenizer_cli
from simzss.data import tokenize as tk
from simzss.data.tokenize import load_tokenizer, tokenize_batch, train_bpe_tokenizer

ADJECTIVES = ["a red", "two small", "the old", "three happy", "a wooden", "an empty"]
NOUNS = ["dog", "tennis rackets", "dining table", "motorcycle", "bus", "grass", "person", "sofa"]
PLACES = ["on a table.", "next to the street", "in the park!", "near the café in Zürich"]
CORPUS = [f"{a} {n} {p}" for a, n, p in itertools.product(ADJECTIVES, NOUNS, PLACES)]  # 192 sentences


def span(caption: str, word: str) -> Tuple[int, int]:
    start = caption.index(word)
    return start, start + len(word)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    out = tmp_path_factory.mktemp("bpe") / "tok"
    train_bpe_tokenizer(CORPUS, out, vocab_size=300)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        bos_token="[CLS]", eos_token="[SEP]",
    )


# --------------------------------------------------------------------------------------------------
# Training / loading
# --------------------------------------------------------------------------------------------------


def test_trained_bpe_round_trip(bpe: PreTrainedTokenizerFast) -> None:
    assert bpe.is_fast
    assert [bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id] == [0, 1, 2]
    caption = "Two Tennis rackets near the café in Zürich"
    enc = bpe(caption, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert ids[0] == bpe.bos_token_id and ids[-1] == bpe.eos_token_id
    assert offsets[0] == offsets[-1] == (0, 0)
    # trimmed offsets: no token's character range includes the space it carries (a bare "Ġ" token is
    # empty); together the tokens cover every other character (multi-byte characters may be shared)
    pieces = [caption[s:e] for s, e in offsets[1:-1]]
    assert all(p == p.strip() for p in pieces)
    covered = {i for s, e in offsets for i in range(s, e)}
    assert covered == {i for i, ch in enumerate(caption) if ch != " "}
    assert bpe.decode(ids, skip_special_tokens=True).strip() == caption.lower()


def test_train_bpe_overwrites_atomically(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "tok"
    train_bpe_tokenizer(CORPUS[:50], out, vocab_size=280)
    with caplog.at_level(logging.WARNING, logger="simzss.data.tokenize"):
        tok = train_bpe_tokenizer(iter(CORPUS + ["", None]), out, vocab_size=300)  # type: ignore[list-item]
    assert "skipped 2 empty or non-text captions" in caplog.text
    assert len(load_tokenizer(out)) == len(tok) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary folders left behind


def test_train_bpe_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(CORPUS, tmp_path / "a", vocab_size=100)
    with pytest.raises(ValueError, match="no captions"):
        train_bpe_tokenizer(["", "   "], tmp_path / "b", vocab_size=300)
    assert not (tmp_path / "b").exists()


def test_load_tokenizer_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="local folder"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(tmp_path / "file.json")

    class Slow:
        is_fast = False

    monkeypatch.setattr(tk.AutoTokenizer, "from_pretrained", lambda *a, **k: Slow())
    with pytest.raises(TypeError, match="fast tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_missing_tokenizer_folder_states_its_advice_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19 defect 5: one message, the advice once; a path inside an existing folder (``runs/tok``) or with more
    than one ``/`` is a local folder, never tried as a hub name (no network retries)."""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a local path must not be looked up on the hub")

    monkeypatch.setattr(tk.AutoTokenizer, "from_pretrained", no_hub)
    for name in (str(tmp_path / "nope"), "./nope", "runs/tok", "a/b/c"):
        with pytest.raises(FileNotFoundError) as caught:
            load_tokenizer(name)
        message = str(caught.value)
        assert message.startswith(f"tokenizer folder {name!r} not found") and "\n" not in message
        assert message.count("simzss tokenizer") == 1 and message.count("hub name") == 1


def test_load_tokenizer_without_pad_uses_eos(tmp_path: Path, wordpiece: PreTrainedTokenizerFast) -> None:
    tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece.backend_tokenizer, unk_token="[UNK]", eos_token="[SEP]")
    tok.save_pretrained(str(tmp_path / "nopad"))
    loaded = load_tokenizer(tmp_path / "nopad")
    assert loaded.pad_token == "[SEP]" and loaded.pad_token_id == wordpiece.eos_token_id


# --------------------------------------------------------------------------------------------------
# Span -> token mapping
# --------------------------------------------------------------------------------------------------


def masked_text(tokenizer: PreTrainedTokenizerFast, caption: str, mask: torch.Tensor) -> List[str]:
    """Caption characters of the tokens selected by ``mask``."""
    offsets = tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
    return [caption[s:e] for (s, e), m in zip(offsets, mask.tolist()) if m]


def content_tokens_through(tokenizer: PreTrainedTokenizerFast, caption: str, end_char: int) -> int:
    """Number of non-special tokens (zero-width ones included) whose characters start before ``end_char``."""
    enc = tokenizer(caption, return_offsets_mapping=True, return_special_tokens_mask=True)
    return sum(1 for (s, _), special in zip(enc["offset_mapping"], enc["special_tokens_mask"]) if not special and s < end_char)


@pytest.mark.parametrize("name", ["bpe", "wordpiece"])
def test_concept_masks(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer: PreTrainedTokenizerFast = request.getfixturevalue(name)
    captions = ["Two tennis rackets on a table.", "a dog", "", "the old sofa, in Zürich"]
    c0, c1, c3 = captions[0], captions[1], captions[3]
    concepts = [
        [(5, [span(c0, "tennis"), span(c0, "rackets")]), (7, [span(c0, "table")])],
        [(3, [span(c1, "dog")])],
        [],
        [(9, [span(c3, "sofa")])],
    ]
    out = tokenize_batch(tokenizer, captions, concepts, context_length=64)
    b, length = out["input_ids"].shape
    assert b == 4 and out["attention_mask"].shape == (4, length)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == out["concept_labels"].dtype == torch.long
    assert out["concept_mask"].dtype == torch.bool and out["concept_mask"].shape == (4, 2, length)
    assert out["concept_labels"].tolist() == [[5, 7], [3, -1], [-1, -1], [9, -1]]
    lengths = out["attention_mask"].sum(1)
    assert lengths.max().item() == length  # L = longest caption
    # right padding: EOS pooling picks the last real token
    last = out["input_ids"][torch.arange(4), lengths - 1]
    assert (last == tokenizer.eos_token_id).all()
    assert out["attention_mask"][2].tolist()[:2] == [1, 1] and lengths[2] == 2  # empty caption: bos, eos
    mask = out["concept_mask"]
    assert "".join(masked_text(tokenizer, c0, mask[0, 0][: lengths[0]])).lower() == "tennisrackets"
    assert "".join(masked_text(tokenizer, c0, mask[0, 1][: lengths[0]])).lower() == "table"
    assert "".join(masked_text(tokenizer, c1, mask[1, 0][: lengths[1]])).lower() == "dog"
    assert "".join(masked_text(tokenizer, c3, mask[3, 0][: lengths[3]])).lower() == "sofa"
    assert not mask[1, 1].any() and not mask[2].any()
    assert not (mask & ~out["attention_mask"].bool()[:, None]).any()  # never on padding


@pytest.mark.parametrize("name", ["bpe", "wordpiece"])
def test_truncation_drops_cut_concepts(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer: PreTrainedTokenizerFast = request.getfixturevalue(name)
    caption = "Two tennis rackets on a table."
    concepts = [[(5, [span(caption, "tennis"), span(caption, "rackets")]), (7, [span(caption, "table")])]]
    # keep everything through "tennis" but nothing of "rackets": bos + content + eos
    keep = content_tokens_through(tokenizer, caption, caption.index("tennis") + len("tennis"))
    out = tokenize_batch(tokenizer, [caption], concepts, context_length=keep + 2)
    assert out["input_ids"].shape == (1, keep + 2)
    assert out["input_ids"][0, -1].item() == tokenizer.eos_token_id  # truncation keeps EOS
    # "table" cut off entirely and "tennis rackets" in part: both dropped (K = 0)
    assert out["concept_labels"].shape == (1, 0)

    # one token more keeps "rackets" (at least its first token) only if the whole word fits
    whole = content_tokens_through(tokenizer, caption, caption.index("rackets") + len("rackets"))
    out = tokenize_batch(tokenizer, [caption], concepts, context_length=whole + 2)
    assert out["concept_labels"].tolist() == [[5]]
    assert "".join(masked_text(tokenizer, caption, out["concept_mask"][0, 0])).lower() == "tennisrackets"
    if whole > keep + 1:  # "rackets" spans several tokens: cutting inside the word drops the concept
        out = tokenize_batch(tokenizer, [caption], concepts, context_length=whole + 1)
        assert out["concept_labels"].shape == (1, 0)

    # a context so short that no concept survives: K = 0 with valid shapes
    out = tokenize_batch(tokenizer, [caption, "a dog"], concepts + [[]], context_length=3)
    assert out["concept_mask"].shape == (2, 0, 3) and out["concept_labels"].shape == (2, 0)
    assert out["input_ids"][:, -1].tolist() == [tokenizer.eos_token_id] * 2


def test_no_concepts_and_max_concepts(bpe: PreTrainedTokenizerFast) -> None:
    captions = ["a dog on the grass", "a bus"]
    out = tokenize_batch(bpe, captions, [[], []], context_length=16)
    length = out["input_ids"].shape[1]
    assert out["concept_mask"].shape == (2, 0, length) and out["concept_labels"].shape == (2, 0)
    c = captions[0]
    many = [[(1, [span(c, "dog")]), (2, [span(c, "grass")]), (3, [span(c, "the")])], []]
    out = tokenize_batch(bpe, captions, many, context_length=16, max_concepts=2)
    assert out["concept_labels"].tolist() == [[1, 2], [-1, -1]]
    out = tokenize_batch(bpe, captions, many, context_length=16, max_concepts=0)
    assert out["concept_mask"].shape == (2, 0, length)
    out = tokenize_batch(bpe, [], [], context_length=16)
    assert out["input_ids"].shape == (0, 0) and out["concept_mask"].shape == (0, 0, 0)


def test_left_padding_tokenizer_is_padded_right(bpe: PreTrainedTokenizerFast) -> None:
    bpe.padding_side = "left"
    try:
        out = tokenize_batch(bpe, ["a dog on the grass", "a bus"], [[], []], context_length=16)
    finally:
        bpe.padding_side = "right"
    assert out["attention_mask"][1, 0].item() == 1 and out["attention_mask"][1, -1].item() == 0


@pytest.mark.parametrize(
    "concepts,error",
    [
        ([[(1, [(0, 1)])]], ValueError),  # one list for two captions
        ([[(-1, [(0, 1)])], []], ValueError),
        ([[(True, [(0, 1)])], []], TypeError),
        ([[("dog", [(0, 1)])], []], TypeError),
        ([[(1, [(3, 2)])], []], ValueError),
        ([[(1, [(0, 1, 2)])], []], ValueError),
    ],
)
def test_tokenize_batch_rejects_bad_concepts(bpe: PreTrainedTokenizerFast, concepts: list, error: type) -> None:
    with pytest.raises(error):
        tokenize_batch(bpe, ["a dog", "a cat"], concepts, context_length=8)


def test_tokenize_batch_accepts_numpy_and_tensor_ids(bpe: PreTrainedTokenizerFast) -> None:
    import numpy as np

    out = tokenize_batch(bpe, ["a dog", "a bus"], [[(np.int64(4), [(2, 5)])], [(torch.tensor(6), [(2, 5)])]], 8)
    assert out["concept_labels"].tolist() == [[4], [6]]


# --------------------------------------------------------------------------------------------------
# `simzss tokenizer`
# --------------------------------------------------------------------------------------------------


def write_shard(path: Path, members: Dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tokenizer_cli(tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    from simzss import cli

    for shard in range(2):
        members: Dict[str, bytes] = {}
        for i, caption in enumerate(CORPUS[shard::2]):
            key = f"{shard:02d}{i:04d}"
            members[f"{key}.jpg"] = b"\xff\xd8 not really a jpeg"
            members[f"{key}.txt"] = caption.encode("utf-8")
            members[f"{key}.json"] = json.dumps({"caption": "IGNORED"}).encode()
            members[f"{key}.concepts.json"] = b'{"version": 1, "concepts": []}'
        members["bad.txt"] = b"\xff\xfe\xfa"  # not UTF-8: counted and skipped
        write_shard(tmp_path / f"shard-{shard:06d}.tar", members)
    (tmp_path / "shard-000002.tar").write_bytes(b"this is not a tar file" * 50)
    out = tmp_path / "tok"
    argv = ["tokenizer", "--shards", str(tmp_path / "shard-{000000..000002}.tar"), "--out", str(out), "--vocab-size", "300"]
    with caplog.at_level(logging.INFO, logger="simzss.cli.tokenizer"):
        assert cli.main(argv) == 0
    assert "read 192 captions from 2 shards (1 unreadable shards, 2 bad captions)" in caplog.text
    tok = load_tokenizer(out)
    assert len(tok) == 300 and tok("IGNORED")["input_ids"][0] == tok.bos_token_id

    assert tokenizer_cli.main(["--shards", str(tmp_path / "missing-{0..1}.tar"), "--out", str(tmp_path / "x")]) == 2
    assert "2 shard(s) not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert tokenizer_cli.main(["--shards", str(tmp_path / "shard-000002.tar"), "--out", str(tmp_path / "y")]) == 1
    # a folder stands for its shards; --max-captions limits the training text
    assert tokenizer_cli.main(["--shards", str(tmp_path), "--out", str(tmp_path / "z"), "--vocab-size", "280", "--max-captions", "20"]) == 0
    assert len(load_tokenizer(tmp_path / "z")) <= 280
