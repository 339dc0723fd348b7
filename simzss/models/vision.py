"""The frozen DINOv2 vision tower (a timm ViT): CLS token and patch-token grid, never in autograd."""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["FrozenVisionTower", "vision_embed_dim"]


def _create(name: str, pretrained: bool, img_size: int | None, model_kwargs: dict[str, Any] | None) -> nn.Module:
    """timm.create_model with the tower's fixed settings (headless, dynamic image size)."""
    kwargs = dict(model_kwargs or {})
    if img_size is not None:
        if "img_size" in kwargs and kwargs["img_size"] != img_size:
            raise ValueError(f"img_size={img_size} conflicts with model_kwargs img_size={kwargs['img_size']}")
        kwargs["img_size"] = img_size
    kwargs.setdefault("num_classes", 0)
    kwargs["dynamic_img_size"] = True
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, AssertionError, TypeError) as e:  # unknown name; bad or inconsistent kwargs
        raise ValueError(f"cannot create timm vision model {name!r}: {e}") from e


def vision_embed_dim(name: str, model_kwargs: dict[str, Any] | None = None) -> int:
    """Width of a vision tower without allocating it (built on the meta device, no weights)."""
    with torch.device("meta"):
        return int(_create(name, False, None, model_kwargs).embed_dim)


class FrozenVisionTower(nn.Module):
    """A frozen timm DINOv2 ViT returning the CLS token [B, D] and the patch grid [B, h, w, D].

    Weights come from the hub name (``pretrained=True``), or from a local ``weights`` file
    (safetensors or a torch file, loaded with ``weights_only=True``; original DINOv2 checkpoints are
    converted by timm's filter). ``img_size`` sets the stored position-embedding grid; ``None`` keeps
    the pretrained grid (518 px for DINOv2), which is best since ``dynamic_img_size`` interpolates
    it to every input size that is a multiple of the patch size. Features are taken after the final
    norm, with the register tokens dropped. The tower never requires grad, runs under
    ``torch.no_grad`` and stays in eval mode whatever ``train()`` is called with. Inputs must be
    normalised with ``mean``/``std`` (ImageNet's).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        weights: str | None = None,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.model = _create(name, pretrained and weights is None, img_size, model_kwargs)
        if weights is not None:
            self._load_weights(weights)
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
        if not (_close(mean, IMAGENET_DEFAULT_MEAN) and _close(std, IMAGENET_DEFAULT_STD)):
            raise ValueError(
                f"{name}: pretrained_cfg mean/std {mean}/{std} are not ImageNet's; SimZSS expects a DINOv2 "
                "model normalised with ImageNet mean/std (not CLIP's)"
            )
        self.mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
        self.std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]
        self.embed_dim: int = int(self.model.embed_dim)
        patch = self.model.patch_embed.patch_size
        self.patch_size: int = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_prefix_tokens: int = int(self.model.num_prefix_tokens)  # CLS + registers
        self.requires_grad_(False)
        self.train(False)

    def _load_weights(self, path: str) -> None:
        """Load a local checkpoint strictly; a mismatch is reported with the offending keys."""
        from timm.models import load_checkpoint
        from timm.models.vision_transformer import checkpoint_filter_fn

        if not Path(path).is_file():
            raise FileNotFoundError(f"vision weights file not found: {path}")
        try:
            load_checkpoint(self.model, path, strict=True, filter_fn=checkpoint_filter_fn, weights_only=True)
        except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
            # RuntimeError: missing/unexpected keys or shapes; UnpicklingError: not a plain weights file
            raise ValueError(f"cannot load vision weights {path} into {self.name}: {str(e)[:2000]}") from e
        log.info("loaded vision weights from %s", path)

    def train(self, mode: bool = True) -> "FrozenVisionTower":
        """Always eval mode: the tower is frozen (dropout / drop-path must never be active)."""
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images`` [B, 3, H, W] (H, W multiples of the patch size) -> (cls [B, D], patches [B, h, w, D])."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        if h * self.patch_size != images.shape[-2] or w * self.patch_size != images.shape[-1]:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        # no_grad rather than inference_mode: the outputs feed autograd ops of the trainable side
        # (inference tensors cannot be saved for backward). bf16 autocast only on CUDA; elsewhere
        # the input dtype is used as is.
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            tokens = self.model.forward_features(images)  # [B, prefix + h*w, D], final norm applied
        cls = tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens :].reshape(tokens.shape[0], h, w, -1)
        return cls, patches


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-3) for x, y in zip(a, b))
