"""The trainable text tower: a CLIP-style causal transformer from scratch, or a pretrained HF model."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from simzss.config import TextConfig

log = logging.getLogger(__name__)

__all__ = ["TextTower"]

_POOLINGS = ("eos", "cls", "mean")


class TextTower(nn.Module):
    """Text transformer plus the projection g (``proj``: width -> output_dim, the vision width).

    ``cfg.kind == "scratch"``: a randomly initialised ``CLIPTextModel`` (causal mask, learned
    positions, ``cfg.context_length`` positions) sized by ``cfg.layers/width/heads`` with the
    tokenizer's vocabulary. ``cfg.kind == "pretrained"``: ``AutoModel.from_pretrained(cfg.name_or_path)``
    (a local folder or a hub name); for dual encoders (CLIP, SigLIP) the text model is kept, for
    encoder-decoders the encoder. Pooling (``cfg.pooling``) is done here from the last hidden state:
    ``eos`` = the last non-pad token (``attention_mask.sum(1) - 1`` for right padding), ``cls`` =
    the first token, ``mean`` = the mean over non-pad tokens.
    """

    def __init__(self, cfg: TextConfig, vocab_size: int, pad_token_id: int, output_dim: int) -> None:
        super().__init__()
        if cfg.pooling not in _POOLINGS:
            raise ValueError(f"text pooling must be one of {_POOLINGS}, got {cfg.pooling!r}")
        self.kind = cfg.kind
        self.pooling = cfg.pooling
        self.context_length: int | None = None
        if cfg.kind == "scratch":
            self.transformer = self._build_scratch(cfg, vocab_size, pad_token_id)
            self.context_length = cfg.context_length
        elif cfg.kind == "pretrained":
            self.transformer = self._load_pretrained(cfg, vocab_size)
            max_pos = getattr(self.transformer.config, "max_position_embeddings", None)
            self.context_length = int(max_pos) if isinstance(max_pos, int) else None
        else:
            raise ValueError(f"text kind must be 'scratch' or 'pretrained', got {cfg.kind!r}")
        self.width: int = int(self.transformer.config.hidden_size)
        self.proj = nn.Linear(self.width, output_dim)

    @staticmethod
    def _build_scratch(cfg: TextConfig, vocab_size: int, pad_token_id: int) -> nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel

        if cfg.width % cfg.heads:
            raise ValueError(f"text width {cfg.width} is not divisible by heads {cfg.heads}")
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id {pad_token_id} outside the vocabulary of size {vocab_size}")
        config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.width,
            intermediate_size=4 * cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.context_length,
            hidden_act="gelu",
            attention_dropout=0.0,
            # Only used by CLIPTextModel's own pooler, which we ignore; set in-vocabulary ids.
            pad_token_id=pad_token_id,
            bos_token_id=pad_token_id,
            eos_token_id=pad_token_id,
        )
        config._attn_implementation = "sdpa"
        return CLIPTextModel(config)

    @staticmethod
    def _load_pretrained(cfg: TextConfig, vocab_size: int) -> nn.Module:
        from transformers import AutoModel

        if not cfg.name_or_path:
            raise ValueError("text kind 'pretrained' needs text.name_or_path (a local folder or a hub name)")
        try:
            model = AutoModel.from_pretrained(cfg.name_or_path)
        except OSError as e:
            raise ValueError(f"cannot load the pretrained text model {cfg.name_or_path!r}: {e}") from e
        if hasattr(model, "text_model"):  # dual encoder: keep only the text side
            model = model.text_model
        elif getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        n_emb = model.get_input_embeddings().num_embeddings
        if vocab_size > n_emb:
            raise ValueError(
                f"tokenizer vocabulary ({vocab_size}) is larger than the text model's embedding table "
                f"({n_emb}) of {cfg.name_or_path!r}: use the model's own tokenizer"
            )
        return model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Token features [B, L, width] and the pooled feature [B, width], both before ``proj``."""
        if self.context_length is not None and input_ids.shape[1] > self.context_length:
            raise ValueError(
                f"text of {input_ids.shape[1]} tokens exceeds the text tower's context length {self.context_length}"
            )
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return tokens, self.pool(tokens, attention_mask)

    def pool(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """Pooled text feature per ``self.pooling`` (see the class docstring)."""
        if self.pooling == "cls":
            return tokens[:, 0]
        mask = attention_mask.to(tokens.dtype)
        if self.pooling == "mean":
            return (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        # Index of the last non-pad token; equals attention_mask.sum(1) - 1 for right padding.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
