"""The SimZSS model: frozen vision tower + trainable text tower, L = L_g + λ L_l."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simzss.config import ModelConfig
from simzss.data.batch import Batch
from simzss.data.transforms import image_to_tensor
from simzss.losses import (
    contrastive_loss,
    pool_visual_concepts,
    slot_classes,
    slot_concept_loss,
    slot_prototypes,
)
from simzss.models.pretrained import WEIGHTS_NAME, load_state, read_export
from simzss.models.text import TextTower, is_right_padded
from simzss.models.vision import FrozenVisionTower, build_vision_tower, vision_embed_dim
from simzss.models.zeroshot import get_mean_std, segment_image, text_classifier


__all__ = ["SimZSS", "SimZSSOutput"]

_QUERIES = ("concept", "prototype")
_TARGETS = ("label", "argmax")
_POOLINGS = ("mean", "sum_normalized")


@dataclass
class SimZSSOutput:
    """One training step's losses and statistics (statistics are detached, over the global batch)."""

    loss: Tensor  # global_loss + concept_weight * concept_loss
    global_loss: Tensor
    concept_loss: Tensor
    concept_accuracy: Tensor  # argmax == true label over concepts; nan when none (or LiT)
    num_concepts: int | Tensor  # 0-d tensors from the concept branch (read them when logging: no sync in the step)
    num_classes: int | Tensor
    logit_scale: Tensor  # exp of the clamped learned logit scale


class SimZSS(nn.Module):
    """SimZSS (``concept_weight > 0``) or LiT (``concept_weight == 0``, the concept branch is skipped).

    ``vision`` may be ``None`` when training from cached vision features (``batch.vision_cls`` and
    ``batch.vision_patches``); then ``embed_dim`` must be given and ``encode_image`` is unavailable.
    ``concept_scale=None`` uses the learned (clamped, exponentiated) logit scale in the concept loss.

    ``equal_batch_sizes`` (attribute, default False): set it when every rank always gets batches of
    the same size (the webdataset training stream only yields full batches); the contrastive loss
    then skips exchanging batch sizes under ``torch.distributed``.

    ``right_padded_inputs`` (attribute, default False): set it when every batch's text is padded on
    the right (``tokenize_batch`` / ``Batch.cat`` batches are); the causal scratch tower then runs
    without a mask without checking the mask first (the check is a host sync on an accelerator).
    ``concept_classes`` (attribute, default None): the concept bank's size (labels are bank ids below
    it); the concept branch then indexes its class table by label, with no host sync. Unset, the table
    has one row per class present in the global batch, counted with one host read (see
    :func:`simzss.losses.slot_classes`). Neither changes a number.
    """

    def __init__(
        self,
        vision: FrozenVisionTower | None,
        text: TextTower,
        *,
        embed_dim: int,
        tau: float = 0.1,
        query: str = "prototype",
        concept_weight: float = 0.05,
        concept_target: str = "argmax",
        concept_scale: float | None = 1 / 0.07,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float = math.log(100.0),
        concept_pooling: str = "sum_normalized",
        prototype_member_norm: bool = False,
    ) -> None:
        super().__init__()
        if query not in _QUERIES:
            raise ValueError(f"query must be one of {_QUERIES}, got {query!r}")
        if concept_pooling not in _POOLINGS:
            raise ValueError(f"concept_pooling must be one of {_POOLINGS}, got {concept_pooling!r}")
        if concept_target not in _TARGETS:
            raise ValueError(f"concept_target must be one of {_TARGETS}, got {concept_target!r}")
        if concept_weight < 0:
            raise ValueError(f"concept_weight must be >= 0, got {concept_weight}")
        if vision is not None and vision.embed_dim != embed_dim:
            raise ValueError(f"embed_dim {embed_dim} != vision width {vision.embed_dim}")
        if text.proj.out_features != embed_dim:
            raise ValueError(f"text projection outputs {text.proj.out_features}, expected embed_dim {embed_dim}")
        self.vision = vision
        self.text = text
        self.embed_dim = embed_dim
        self.tau = tau
        self.query = query
        self.concept_weight = concept_weight
        self.concept_target = concept_target
        self.concept_scale = concept_scale
        self.concept_pooling = concept_pooling
        self.prototype_member_norm = prototype_member_norm
        self.logit_scale_max = logit_scale_max
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.config: ModelConfig | None = None
        self.tokenizer: Any = None
        self.equal_batch_sizes = False
        self.right_padded_inputs = False
        self.concept_classes: int | None = None

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, tokenizer: Any, *, build_vision: bool = True, text_config: Any = None
    ) -> "SimZSS":
        """Build from a ``ModelConfig`` and a (fast) tokenizer, which sets the text vocabulary and padding.

        ``build_vision=False`` skips the vision tower (cached-feature training); its width is then
        read from the timm architecture without allocating weights. ``text_config`` (text kind
        ``pretrained``): a transformers config or a local folder with its ``config.json`` to build the
        text model from, with random init, instead of loading ``text.name_or_path`` (see
        ``TextTower``); for weights that are loaded right after.
        """
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
        vc = cfg.vision
        vision = None
        if build_vision:
            vision = build_vision_tower(vc)
            embed_dim = vision.embed_dim
        else:
            embed_dim = vision_embed_dim(vc.name, dict(vc.model_kwargs))
        text = TextTower(
            cfg.text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, output_dim=embed_dim,
            hf_config=text_config,
        )
        model = cls(
            vision,
            text,
            embed_dim=embed_dim,
            tau=cfg.tau,
            query=cfg.query,
            concept_weight=cfg.concept_weight,
            concept_target=cfg.concept_target,
            concept_scale=cfg.concept_scale,
            logit_scale_init=cfg.logit_scale_init,
            logit_scale_max=cfg.logit_scale_max,
            concept_pooling=cfg.concept_pooling,
            prototype_member_norm=cfg.prototype_member_norm,
        )
        model.config = cfg
        model.tokenizer = tokenizer
        return model

    # ----------------------------------------------------------------------------------- training
    def scale(self) -> Tensor:
        """The exponentiated logit scale, clamped at exp(logit_scale_max)."""
        return self.logit_scale.clamp(max=self.logit_scale_max).exp()

    def _vision_features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(cls [B,D], patches [B,h,w,D]) in fp32: cached features when the batch has them."""
        cached_cls, cached_patches = getattr(batch, "vision_cls", None), getattr(batch, "vision_patches", None)
        if cached_cls is not None and cached_patches is not None:
            return cached_cls.float(), cached_patches.float()
        if self.vision is None:
            raise ValueError("the model has no vision tower and the batch carries no cached vision features")
        if batch.images is None:
            raise ValueError("the batch has neither images nor cached vision features")
        return self.vision(batch.images, dtype=torch.float32)

    @staticmethod
    def _concept_mask(batch: Batch) -> Tensor:
        """Concept spans [B, K, L] restricted to real tokens: pad positions are never pooled (their
        outputs are not defined when the causal tower runs without a mask)."""
        return batch.concept_mask.bool() & batch.attention_mask.bool().unsqueeze(1)

    def _right_padded(self, attention_mask: Tensor) -> bool | None:
        """Whether the scratch (causal) tower may drop the mask; ``None`` for other towers (not needed)."""
        if self.text.kind != "scratch":
            return None
        if self.right_padded_inputs:
            return True
        return bool(is_right_padded(attention_mask))  # a host sync, unless the caller promised right padding

    def _text_concepts(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Projected text concepts c_t [B*K, D] of every concept slot (flat index b*K + k).

        ``tokens`` [B, L, width] are the text tower's outputs, ``mask`` [B, K, L] the concept spans
        (real tokens only). ``concept_pooling="mean"``: g(mean of the span's tokens);
        ``"sum_normalized"``: sum over the span of normalize(g(token)), as the official release does.
        An empty slot gives g(0) or 0; its weight in the loss is 0.
        """
        b, k, _ = mask.shape
        mask = mask.to(tokens.dtype)
        if self.concept_pooling == "mean":
            counts = mask.sum(-1, keepdim=True).clamp(min=1)
            span_mean = torch.bmm(mask, tokens) / counts  # [B, K, width]
            pooled = self.text.proj(span_mean.reshape(b * k, tokens.shape[-1]))
        else:
            projected = F.normalize(self.text.proj(tokens), dim=-1)  # [B, L, D]
            pooled = torch.bmm(mask, projected).reshape(b * k, projected.shape[-1])  # [B*K, D]
        return pooled

    def forward(self, batch: Batch) -> SimZSSOutput:
        """Losses for one (per-rank) batch; negatives and prototypes come from the global batch.

        The concept branch works on the fixed [B, K] grid of concept slots with masks (no data-dependent
        shape; no host sync when ``concept_classes`` is set; see :mod:`simzss.losses`).
        """
        use_concepts = self.concept_weight > 0
        cls, patches = self._vision_features(batch)
        tokens, pooled = self.text(batch.input_ids, batch.attention_mask,
                                   right_padded=self._right_padded(batch.attention_mask))
        scale = self.scale()
        global_loss = contrastive_loss(cls, self.text.proj(pooled), scale, equal_sizes=self.equal_batch_sizes)
        if not use_concepts:  # LiT: no concept work at all
            zero = global_loss.new_zeros(())
            nan = torch.full((), float("nan"), device=zero.device)
            return SimZSSOutput(global_loss, global_loss, zero, nan, 0, 0, scale.detach())

        mask = self._concept_mask(batch)
        b, k, _ = mask.shape
        # a slot holds a concept when it has a label and at least one real token to pool
        valid = (batch.concept_labels >= 0) & mask.any(-1)
        labels = torch.where(valid, batch.concept_labels, torch.full_like(batch.concept_labels, -1)).reshape(-1)
        # K (the most concepts of a caption) differs between ranks' batches: under torch.distributed the slot
        # counts are exchanged even with equal batch sizes
        classes = slot_classes(labels, self.concept_classes)
        text_concepts = self._text_concepts(tokens, mask)  # c_t, [B*K, D]
        protos, present = slot_prototypes(text_concepts, classes, normalize_members=self.prototype_member_norm)
        # each concept queries with its class prototype over the global batch, or with itself
        queries = protos.index_select(0, classes.index[classes.local]) if self.query == "prototype" else text_concepts
        _, h, w, d = patches.shape
        queries = torch.where(valid.reshape(-1, 1), queries, queries.new_zeros(()))  # empty slots: a zero query
        visual = pool_visual_concepts(patches.reshape(b, h * w, d), queries.reshape(b, k, d), self.tau)
        stats = slot_concept_loss(
            visual.reshape(b * k, d),
            classes,
            protos,
            present,
            scale=scale if self.concept_scale is None else self.concept_scale,
            target=self.concept_target,
        )
        loss = global_loss + self.concept_weight * stats.loss
        return SimZSSOutput(
            loss, global_loss, stats.loss, stats.accuracy, stats.num_concepts, stats.num_classes, scale.detach()
        )

    # ---------------------------------------------------------------------------------- inference
    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised CLS [B, D] and patch grid [B, h, w, D] (fp32) of ImageNet-normalised images."""
        if self.vision is None:
            raise ValueError("this model was built without a vision tower (build_vision=False)")
        cls, patches = self.vision(images, dtype=torch.float32)
        return F.normalize(cls, dim=-1), F.normalize(patches, dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised projected pooled text features [B, D]."""
        _, pooled = self.text(input_ids, attention_mask)
        return F.normalize(self.text.proj(pooled).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Tokenize with ``self.tokenizer`` (truncated to the context length) and ``encode_text``."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer attached to the model (build it with from_config / from_pretrained)")
        if isinstance(texts, str):
            raise TypeError("encode_texts expects a list of strings, got a single string")
        ctx = self.config.text.context_length if self.config is not None else self.text.context_length
        enc = self.tokenizer(
            list(texts), padding=True, truncation=ctx is not None, max_length=ctx, return_tensors="pt"
        )
        device = self.logit_scale.device
        return self.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))

    # ---------------------------------------------------------------------------------- weights
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything but the frozen vision tower: text tower, projection and logit scale."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision.")}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a ``trainable_state_dict``; every non-vision key must be present and no other."""
        vision_keys = [k for k in state if k.startswith("vision.")]
        if vision_keys:
            raise ValueError(f"trainable state must not contain vision weights, got {vision_keys[:5]}")
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("vision.")]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise ValueError(f"trainable state mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", *, build_vision: bool = True
    ) -> "SimZSS":
        """Load an export folder (``simzss export``, ``save_pretrained``, ``simzss import-official``) as an
        eval-mode model on ``device``.

        The vision tower comes from the export when its weights are included, otherwise from timm by name
        (``pretrained=True`` downloads it, or reads the local hub cache). ``build_vision=False`` gives a
        text-only model. Errors are :class:`simzss.models.pretrained.ExportError` naming the file.
        """
        parts = read_export(path, build_vision=build_vision)
        model = cls.from_config(parts.build_config, parts.tokenizer, build_vision=build_vision,
                                text_config=parts.text_config)
        load_state(model, parts.state, vision_included=parts.vision_included, source=Path(path) / WEIGHTS_NAME)
        model.config = parts.config
        return model.to(device).eval()

    def _image_batch(self, image: Any) -> Tensor:
        """``segment``'s input as a normalised float [1,3,H,W] on the model's device.

        Accepts a PIL image, a uint8 tensor [3,H,W] / [1,3,H,W] (0..255), or a float tensor that is already
        normalised with the vision tower's mean/std.
        """
        if not isinstance(image, Tensor):
            image = image_to_tensor(image, *get_mean_std(self))
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"segment takes one RGB image ([3,H,W] or [1,3,H,W]), got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            mean, std = get_mean_std(self)
            image = (image.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        return image.to(self.logit_scale.device, torch.float32)

    def segment(self, image: Any, labels: Sequence[str], **slide_kw: Any) -> tuple[Tensor, Tensor]:
        """Zero-shot segmentation of one image into ``labels``.

        ``image``: a PIL image, a uint8 tensor [3,H,W] (0..255), or a float tensor [1,3,H,W] / [3,H,W] already
        normalised with the vision tower's mean/std; it is moved to the model's device. Returns
        (prediction [H, W] long, class probabilities [C', H, W]) from :mod:`simzss.models.zeroshot`; ``templates`` (a set
        name such as "single" or a list of "{}" prompts) and the sliding-window / background options are passed
        on to ``text_classifier`` / ``segment_image``.
        """
        templates = slide_kw.pop("templates", "single")
        image = self._image_batch(image)
        with torch.no_grad():
            classifier = text_classifier(self, list(labels), templates)
            probs = segment_image(self, image, classifier, **slide_kw)
        return probs.argmax(0), probs
