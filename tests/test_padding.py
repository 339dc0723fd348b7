"""Dynamic text padding (simzss.data.padding): trimmed batches give the model the same losses and gradients."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from simzss.config import ModelConfig, TextConfig, VisionConfig
from simzss.data.batch import Batch
from simzss.data.padding import padded_length, trim_padding
from simzss.models import SimZSS, TextTower

DIM = 32


def _batch(lengths: list[int], context: int = 40, k: int = 3) -> Batch:
    """Right-padded cached-feature batch with multi-token concepts inside each caption."""
    g = torch.Generator().manual_seed(0)
    b = len(lengths)
    attn = (torch.arange(context) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = torch.randint(1, 50, (b, context), generator=g) * attn
    cmask = torch.zeros(b, k, context, dtype=torch.bool)
    labels = torch.full((b, k), -1)
    for i, n in enumerate(lengths):
        for j in range(min(k, n // 2)):
            cmask[i, j, 2 * j : 2 * j + 2] = True
            labels[i, j] = (i + j) % 4
    return Batch(images=None, input_ids=ids, attention_mask=attn, concept_mask=cmask, concept_labels=labels,
                 captions=[""] * b, keys=[str(i) for i in range(b)], vision_cls=torch.randn(b, DIM, generator=g),
                 vision_patches=torch.randn(b, 3, 3, DIM, generator=g))


class _Tok:
    """The two things SimZSS.from_config reads from a tokenizer."""

    pad_token_id = 0

    def __len__(self) -> int:
        return 60


def _model(text: TextConfig) -> SimZSS:
    torch.manual_seed(0)
    cfg = ModelConfig(vision=VisionConfig(name="vit_small_patch14_reg4_dinov2", pretrained=False,
                                          model_kwargs={"depth": 1, "embed_dim": DIM, "num_heads": 2}),
                      text=text, concept_weight=0.5)
    return SimZSS.from_config(cfg, _Tok(), build_vision=False).train()


def test_padded_length_rounds_up_and_caps() -> None:
    assert [padded_length(n, 40) for n in (0, 1, 8, 9, 17, 39, 40)] == [1, 8, 8, 16, 24, 40, 40]
    assert padded_length(5, 6) == 6 and padded_length(5, 0) == 0 and padded_length(5, 40, multiple=1) == 5
    with pytest.raises(ValueError, match="multiple"):
        padded_length(5, 40, multiple=0)


def test_trim_padding_cuts_only_padding_columns() -> None:
    batch = _batch([5, 11, 3])
    trimmed = trim_padding(batch)
    assert trimmed.input_ids.shape == (3, 16) and trimmed.concept_mask.shape == (3, 3, 16)
    assert torch.equal(trimmed.input_ids, batch.input_ids[:, :16])
    assert int(batch.attention_mask[:, 16:].sum()) == 0 and not batch.concept_mask[..., 16:].any()
    assert trim_padding(_batch([40, 3])).input_ids.shape[1] == 40  # nothing to trim
    left = dataclasses.replace(batch, attention_mask=batch.attention_mask.flip(1))  # left padding: unchanged
    assert trim_padding(left) is left
    longest = trim_padding(batch, multiple=1)  # padded to the longest caption (as tokenize_batch does): 11
    assert longest.input_ids.shape[1] == 11 and trim_padding(longest) is longest  # nothing to cut, no pad_id
    aligned = trim_padding(longest, pad_id=0)  # padded up to the multiple of 8
    assert aligned.input_ids.shape[1] == 16 and torch.equal(aligned.input_ids, batch.input_ids[:, :16])
    assert torch.equal(aligned.attention_mask, batch.attention_mask[:, :16])
    assert torch.equal(aligned.concept_mask, batch.concept_mask[..., :16])
    assert trim_padding(longest, pad_id=0, max_length=12).input_ids.shape[1] == 12  # never past the context


def _losses_and_grads(model: SimZSS, batch: Batch) -> list[torch.Tensor]:
    out = model(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)  # BERT's pooler is unused
    return [out.loss.detach(), out.global_loss.detach(), out.concept_loss.detach(),
            *(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))]


@pytest.mark.parametrize("mode", ["causal_masked", "causal_right_padded", "causal_mean_pooling"])
def test_trimmed_batch_gives_the_same_losses_causal(mode: str) -> None:
    text = TextConfig(layers=2, width=DIM, heads=2, context_length=40,
                      pooling="mean" if mode == "causal_mean_pooling" else "eos")
    model = _model(text)
    model.right_padded_inputs = mode != "causal_masked"
    batch = _batch([5, 11, 3, 9])
    full, trimmed = _losses_and_grads(model, batch), _losses_and_grads(model, trim_padding(batch))
    assert trim_padding(batch).input_ids.shape[1] == 16
    for a, b in zip(full, trimmed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_trimmed_batch_gives_the_same_losses_bidirectional_pretrained(tmp_path: Path) -> None:
    """A BERT-style tower (bidirectional, learned absolute positions, attention mask applied)."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=60, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(tmp_path)
    model = _model(TextConfig(kind="pretrained", name_or_path=str(tmp_path), pooling="cls"))
    assert isinstance(model.text, TextTower) and model.text.kind == "pretrained"
    batch = _batch([5, 11, 3, 9])
    full, trimmed = _losses_and_grads(model, batch), _losses_and_grads(model, trim_padding(batch))
    for a, b in zip(full, trimmed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
