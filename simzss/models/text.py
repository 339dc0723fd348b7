"""The trainable text tower: a CLIP-style causal transformer from scratch, or a pretrained HF model."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor, nn

from simzss.config import TextConfig

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

__all__ = ["TextTower", "is_right_padded"]

_POOLINGS = ("eos", "cls", "mean", "argmax")
_ACTIVATIONS = ("gelu", "quick_gelu")


class TextTower(nn.Module):
    """Text transformer plus the projection g (``proj``: width -> output_dim, the vision width).

    ``cfg.kind == "scratch"``: a randomly initialised ``CLIPTextModel`` (causal mask, learned
    positions, ``cfg.context_length`` positions) sized by ``cfg.layers/width/heads`` with the
    tokenizer's vocabulary. ``cfg.kind == "pretrained"``: ``AutoModel.from_pretrained(cfg.name_or_path)``
    (a local folder or a hub name) in fp32 (trainable weights; mixed precision comes from autocast);
    for dual encoders (CLIP, SigLIP) the text model is kept, for encoder-decoders the encoder.
    Pooling (``cfg.pooling``) is done here from the last hidden state: ``eos`` = the last non-pad
    token (``attention_mask.sum(1) - 1`` for right padding), ``cls`` = the first token, ``mean`` =
    the mean over non-pad tokens, ``argmax`` = the token with the highest id (open_clip's rule: with
    CLIP's vocabulary, whose end-of-text id is the largest, the first end-of-text token).
    ``cfg.proj_bias`` gives ``proj`` a bias (open_clip's ``text_projection`` has none);
    ``cfg.activation`` picks the scratch tower's MLP activation (exact ``gelu`` or CLIP's ``quick_gelu``).

    ``hf_config`` (kind ``pretrained`` only): build the architecture from this transformers config
    (a ``PretrainedConfig`` or a local folder holding its ``config.json``) with random init instead
    of loading ``cfg.name_or_path``, for weights that are loaded right after (exports): no hub or
    base-model access. ``self.hf_config`` is the config the model was built from (the whole model's,
    before the text part is taken), which exports save for that purpose; ``None`` for ``scratch``.

    The scratch tower is causal, so with right padding the real tokens' outputs do not depend on
    the padding mask: ``forward`` then passes no mask, which lets SDPA use its causal fast path.
    """

    def __init__(
        self,
        cfg: TextConfig,
        vocab_size: int,
        pad_token_id: int,
        output_dim: int,
        *,
        hf_config: Union["PretrainedConfig", str, os.PathLike, None] = None,
    ) -> None:
        super().__init__()
        if cfg.pooling not in _POOLINGS:
            raise ValueError(f"text pooling must be one of {_POOLINGS}, got {cfg.pooling!r}")
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"text activation must be one of {_ACTIVATIONS}, got {cfg.activation!r}")
        self.kind = cfg.kind
        self.pooling = cfg.pooling
        self.context_length: int | None = None
        self.hf_config: "PretrainedConfig | None" = None
        if cfg.kind == "scratch":
            if hf_config is not None:
                raise ValueError("hf_config is only for text kind 'pretrained'; a scratch tower is built from TextConfig")
            self.transformer = self._build_scratch(cfg, vocab_size, pad_token_id)
            self.context_length = cfg.context_length
        elif cfg.kind == "pretrained":
            self.transformer, self.hf_config = self._load_pretrained(cfg, vocab_size, hf_config)
            max_pos = getattr(self.transformer.config, "max_position_embeddings", None)
            self.context_length = int(max_pos) if isinstance(max_pos, int) else None
        else:
            raise ValueError(f"text kind must be 'scratch' or 'pretrained', got {cfg.kind!r}")
        self.width: int = int(self.transformer.config.hidden_size)
        self.proj = nn.Linear(self.width, output_dim, bias=cfg.proj_bias)

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
            hidden_act=cfg.activation,
            attention_dropout=0.0,
            # Only used by CLIPTextModel's own pooler, which we ignore; set in-vocabulary ids.
            pad_token_id=pad_token_id,
            bos_token_id=pad_token_id,
            eos_token_id=pad_token_id,
        )
        config._attn_implementation = "sdpa"
        return CLIPTextModel(config)

    @staticmethod
    def _load_pretrained(
        cfg: TextConfig, vocab_size: int, hf_config: Union["PretrainedConfig", str, os.PathLike, None]
    ) -> tuple[nn.Module, "PretrainedConfig"]:
        """(text model, the whole model's config): from ``name_or_path``, or built from ``hf_config``."""
        from transformers import AutoConfig, AutoModel, PretrainedConfig

        if hf_config is not None:
            source = str(hf_config) if not isinstance(hf_config, PretrainedConfig) else "the given config"
            try:
                if not isinstance(hf_config, PretrainedConfig):
                    hf_config = AutoConfig.from_pretrained(str(hf_config), local_files_only=True)
                model = AutoModel.from_config(hf_config, dtype=torch.float32)
            except (OSError, ValueError, KeyError) as e:  # missing/invalid config.json, unknown model_type
                raise ValueError(f"cannot build the text model from {source}: {e}") from e
        else:
            if not cfg.name_or_path:
                raise ValueError("text kind 'pretrained' needs text.name_or_path (a local folder or a hub name)")
            source = repr(cfg.name_or_path)
            try:
                # fp32: these weights are trained (checkpoints may be stored in fp16/bf16).
                model = AutoModel.from_pretrained(cfg.name_or_path, dtype=torch.float32)
            except OSError as e:
                raise ValueError(f"cannot load the pretrained text model {cfg.name_or_path!r}: {e}") from e
        full_config = model.config
        if hasattr(model, "text_model"):  # dual encoder: keep only the text side
            model = model.text_model
        elif getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        n_emb = model.get_input_embeddings().num_embeddings
        if vocab_size > n_emb:
            raise ValueError(
                f"tokenizer vocabulary ({vocab_size}) is larger than the text model's embedding table "
                f"({n_emb}) of {source}: use the model's own tokenizer"
            )
        return model, full_config

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, *, right_padded: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """Token features [B, L, width] and the pooled feature [B, width], both before ``proj``.

        ``right_padded``: whether every row's padding is at its end, when the caller already knows
        (``SimZSS`` reads it in its one host sync per step); ``None`` checks it here. Only the
        scratch (causal) tower uses it: it then runs without a mask. Pad positions' outputs differ
        from a masked run, but none of them is pooled or in a concept span.
        """
        if self.context_length is not None and input_ids.shape[1] > self.context_length:
            raise ValueError(
                f"text of {input_ids.shape[1]} tokens exceeds the text tower's context length {self.context_length}"
            )
        model_mask: Tensor | None = attention_mask
        if self.kind == "scratch":
            if right_padded is None:
                right_padded = bool(is_right_padded(attention_mask))
            if right_padded:
                model_mask = None
        tokens = self.transformer(input_ids=input_ids, attention_mask=model_mask).last_hidden_state
        return tokens, self.pool(tokens, attention_mask, input_ids)

    def pool(self, tokens: Tensor, attention_mask: Tensor, input_ids: Tensor | None = None) -> Tensor:
        """Pooled text feature per ``self.pooling`` (see the class docstring); ``argmax`` needs ``input_ids``."""
        if self.pooling == "cls":
            return tokens[:, 0]
        if self.pooling == "argmax":
            if input_ids is None:
                raise ValueError("argmax pooling needs the input ids")
            # torch.argmax returns the first maximal index: the first end-of-text, as open_clip takes it
            return tokens[torch.arange(tokens.shape[0], device=tokens.device), input_ids.argmax(dim=-1)]
        mask = attention_mask.to(tokens.dtype)
        if self.pooling == "mean":
            return (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        # Index of the last non-pad token; equals attention_mask.sum(1) - 1 for right padding.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]


def is_right_padded(attention_mask: Tensor) -> Tensor:
    """0-d bool tensor (on the mask's device, no host sync): no row has a real token after a pad."""
    mask = attention_mask.bool()
    return ~(mask[:, 1:] & ~mask[:, :-1]).any()
