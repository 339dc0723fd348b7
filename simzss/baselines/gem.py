"""GEM (Bousselham et al., "Grounding Everything", CVPR 2024): training-free patch features from a ViT.

A self-self attention pathway runs beside the last ``layers`` blocks of the frozen ViT. In each of those blocks,
from the block's normalised input tokens x (``ln_1``):

* q, k, v = the block's own projections, per head (width d);
* for p in (q, k, v): ``iterations`` times p <- softmax(p̂ p̂ᵀ / τ) p̂ with p̂ = p / ||p||₂ (row-wise), then the
  assignment A_p = softmax(p̂ p̂ᵀ / τ) is applied to the values: O_p = A_p v;
* the adaptive temperature τ = N·√d / Σᵢ ||xᵢ||₂ (N tokens, xᵢ at full width) unless a fixed one is given;
* qkv-ensemble O = (O_q + O_k + O_v) / 3, then the block's output projection (and layer scale if any);
* the pathway aggregates these outputs through residual connections, x_gem <- x_gem + out, starting from the
  tokens that enter the first GEM block; the ViT itself runs unchanged and feeds every block's x.

Patch features = ``ln_post(x_gem) @ proj`` without the CLS entry; the global embedding is the unchanged CLIP
one. Position embeddings are resized bicubically to the input's grid, so 448-px windows work with a 224-px
model. ``GemDinoVision`` (experimental) runs the same pathway over the frozen DINOv2 tower of a SimZSS model.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simzss.baselines.openclip import (
    ClipPatchTower, embed_tokens, pooled_embedding, project, run_block, split_qkv,
)

DEFAULT_LAYERS = 6  # the release's gem_depth=7 replaces blocks -1 .. -6
DEFAULT_ITERATIONS = 1


def adaptive_inverse_temperature(x: Tensor, head_dim: int) -> Tensor:
    """1/τ per sample, τ = N·√d / Σᵢ ||xᵢ||₂ over the tokens of ``x`` ``[B, N, C]``; shape ``[B, 1, 1, 1]``."""
    return (x.norm(dim=-1).mean(dim=-1) / head_dim**0.5).view(-1, 1, 1, 1)


def self_self_assignment(p: Tensor, inv_temp: Tensor | float, iterations: int = DEFAULT_ITERATIONS) -> Tensor:
    """The self-self attention map ``[..., N, N]`` of projected tokens ``p`` ``[..., N, d]`` after ``iterations``
    clustering steps p <- softmax(p̂ p̂ᵀ/τ) p̂ (p̂: row-wise L2-normalised)."""
    for _ in range(iterations):
        p = F.normalize(p, dim=-1)
        p = torch.softmax(p @ p.transpose(-2, -1) * inv_temp, dim=-1) @ p
    p = F.normalize(p, dim=-1)
    return torch.softmax(p @ p.transpose(-2, -1) * inv_temp, dim=-1)


def qkv_ensemble(q: Tensor, k: Tensor, v: Tensor, inv_temp: Tensor | float, iterations: int = DEFAULT_ITERATIONS) -> Tensor:
    """GEM's attention output ``[B, heads, N, d]``: the q-q, k-k and v-v assignments applied to v, averaged."""
    return sum(self_self_assignment(p, inv_temp, iterations) @ v for p in (q, k, v)) / 3


def gem_attention(x: Tensor, q: Tensor, k: Tensor, v: Tensor, temperature: Optional[float], iterations: int) -> Tensor:
    """GEM's per-block output before the output projection, heads merged: ``[B, N, C]``.

    ``x`` ``[B, N, C]`` are the block's normalised input tokens (for the adaptive temperature); q, k, v per head
    ``[B, heads, N, d]``."""
    inv_temp = adaptive_inverse_temperature(x, q.shape[-1]) if temperature is None else 1.0 / float(temperature)
    out = qkv_ensemble(q, k, v, inv_temp, iterations)
    return out.transpose(1, 2).reshape(x.shape)


def _check_args(layers: int, iterations: int, temperature: Optional[float], depth: int) -> int:
    if layers < 1:
        raise ValueError(f"GEM layers must be >= 1, got {layers}")
    if iterations < 0:
        raise ValueError(f"GEM iterations must be >= 0, got {iterations}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"GEM temperature must be > 0 (or None for the adaptive one), got {temperature}")
    return min(layers, depth)


class GemVision(ClipPatchTower):
    """GEM over an open_clip ViT: global CLIP embedding and GEM patch features, both in the joint space."""

    method = "gem"

    def __init__(self, visual: nn.Module, *, layers: int = DEFAULT_LAYERS, iterations: int = DEFAULT_ITERATIONS,
                 temperature: Optional[float] = None) -> None:
        super().__init__(visual)
        self.layers = _check_args(layers, iterations, temperature, len(visual.transformer.resblocks))
        self.iterations = iterations
        self.temperature = temperature

    def block_residual(self, blk: nn.Module, x: Tensor) -> Tensor:
        """What one block adds to the GEM pathway, from the ViT tokens ``x`` entering it."""
        y = blk.ln_1(x)
        q, k, v = split_qkv(blk.attn, y)
        out = blk.attn.out_proj(gem_attention(y, q, k, v, self.temperature, self.iterations))
        return blk.ls_1(out) if hasattr(blk, "ls_1") else out

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        x, (h, w) = embed_tokens(self.visual, images)
        blocks = self.visual.transformer.resblocks
        start = len(blocks) - self.layers
        x_gem = x
        for i, blk in enumerate(blocks):
            if i == start:
                x_gem = x
            if i >= start:
                x_gem = x_gem + self.block_residual(blk, x)
            x = run_block(self.visual, blk, x)
        patches = project(self.visual, x_gem[:, 1:])
        return pooled_embedding(self.visual, x), patches.reshape(x.shape[0], h, w, -1)

    @property
    def variant(self) -> str:
        """GEM and its options, recorded with every result (temperature divides: official ss_attn_temp = 1/t)."""
        temp = "adaptive" if self.temperature is None else f"{self.temperature:g}"
        return f"gem (layers={self.layers}, iterations={self.iterations}, temperature={temp})"

    def extra_repr(self) -> str:
        return f"layers={self.layers}, iterations={self.iterations}, temperature={self.temperature}"


class GemDinoVision(nn.Module):
    """EXPERIMENTAL: the GEM pathway over a frozen timm DINOv2 tower (``FrozenVisionTower``) of a SimZSS model.

    Same equations as :class:`GemVision` on timm blocks (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1``); the
    pathway's tokens go through the tower's final norm, register tokens dropped. Not from the GEM paper, which
    studies CLIP-like towers only; it answers whether SimZSS's text side can read a GEM-refined DINOv2 grid.
    """

    method = "gem-dinov2"

    def __init__(self, tower: nn.Module, *, layers: int = DEFAULT_LAYERS, iterations: int = DEFAULT_ITERATIONS,
                 temperature: Optional[float] = None) -> None:
        super().__init__()
        model = getattr(tower, "model", None)
        if model is None or not hasattr(model, "blocks") or not hasattr(getattr(model.blocks[0], "attn", None), "qkv"):
            raise ValueError(f"the GEM-over-DINOv2 experiment needs a timm ViT tower, got {type(tower).__name__}")
        self.tower = tower
        self.mean, self.std = tower.mean, tower.std
        self.patch_size: int = tower.patch_size
        self.embed_dim: int = tower.embed_dim
        self.layers = _check_args(layers, iterations, temperature, len(model.blocks))
        self.iterations = iterations
        self.temperature = temperature

    def block_residual(self, blk: nn.Module, x: Tensor) -> Tensor:
        """What one timm block adds to the GEM pathway, from the tokens ``x`` entering it."""
        attn = blk.attn
        y = blk.norm1(x)
        b, n, c = y.shape
        q, k, v = attn.qkv(y).view(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = gem_attention(y, q, k, v, self.temperature, self.iterations)
        out = attn.proj(getattr(attn, "norm", nn.Identity())(out))
        return blk.ls1(out)

    @torch.no_grad()
    def forward(self, images: Tensor, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """(CLS, patches) as the frozen tower returns them (``SimZSS.encode_image`` passes the ``dtype`` it wants)."""
        m, p = self.tower.model, self.patch_size
        h, w = images.shape[-2] // p, images.shape[-1] // p
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))  # timm's forward_features, unrolled
        start = len(m.blocks) - self.layers
        x_gem = x
        for i, blk in enumerate(m.blocks):
            if i == start:
                x_gem = x
            if i >= start:
                x_gem = x_gem + self.block_residual(blk, x)
            x = blk(x)
        prefix = self.tower.num_prefix_tokens
        patches = m.norm(x_gem)[:, prefix:].reshape(x.shape[0], h, w, -1)
        cls = m.norm(x)[:, 0]
        return (cls, patches) if dtype is None else (cls.to(dtype), patches.to(dtype))

    @property
    def variant(self) -> str:
        """The experiment and its options, recorded with every result."""
        temp = "adaptive" if self.temperature is None else f"{self.temperature:g}"
        return f"gem-dinov2 EXPERIMENTAL (layers={self.layers}, iterations={self.iterations}, temperature={temp})"

    def extra_repr(self) -> str:
        return f"EXPERIMENTAL, layers={self.layers}, iterations={self.iterations}, temperature={self.temperature}"


__all__ = [
    "DEFAULT_LAYERS", "DEFAULT_ITERATIONS", "adaptive_inverse_temperature", "self_self_assignment", "qkv_ensemble",
    "gem_attention", "GemVision", "GemDinoVision",
]
