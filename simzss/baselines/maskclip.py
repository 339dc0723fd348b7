"""MaskCLIP (Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022): CLIP's last-block value embeddings
as patch features, in two variants.

The ViT runs unchanged up to its last block. From the tokens x entering it, v = W_v ln_1(x) + b_v (the value
projection of the block's attention, heads concatenated) goes through the attention's output projection; query-key
attention is not used. Then:

* ``maskclip`` (:class:`MaskClipVision`, the authors' code, chongzhou96/MaskCLIP ``TransformerEncoderLayer.forward``
  with ``return_qkv``): the last block's residual and MLP are applied to the value path, ``v = v + x`` then
  ``v = v + mlp(ln_2(v))``, then the tower's ``ln_post`` and ``proj``. Position embeddings are resized with plain
  ``F.interpolate(mode="bicubic", align_corners=False)`` (no antialias), as mmseg's ``resize`` does there.
* ``maskclip-nores`` (``residual=False``): ``ln_post`` and ``proj`` straight after the output projection, without
  the residual and the MLP; the value-only path that ClearCLIP builds on. Same position-embedding resize.

Layer scale (``ls_1``/``ls_2``, absent from CLIP) is applied where the open_clip block has it, as its forward does.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simzss.baselines.openclip import ClipPatchTower, embed_tokens, pooled_embedding, project, run_block


def value_embeddings(attn: nn.MultiheadAttention, y: Tensor) -> Tensor:
    """v = W_v y + b_v of an ``nn.MultiheadAttention`` (the third slice of its packed input projection)."""
    c = y.shape[-1]
    w = attn.in_proj_weight[2 * c :]
    b = attn.in_proj_bias[2 * c :] if attn.in_proj_bias is not None else None
    return F.linear(y, w, b)


def _layer_scale(blk: nn.Module, name: str, x: Tensor) -> Tensor:
    scale = getattr(blk, name, None)
    return x if scale is None else scale(x)


def value_path(blk: nn.Module, x: Tensor, residual: bool = True) -> Tensor:
    """MaskCLIP's dense tokens from the tokens ``x`` ``[B, N, C]`` entering the last block ``blk`` (before
    ``ln_post``): the value path through the output projection, plus the block's residual and MLP if ``residual``."""
    v = _layer_scale(blk, "ls_1", blk.attn.out_proj(value_embeddings(blk.attn, blk.ln_1(x))))
    if not residual:
        return v
    v = v + x
    return v + _layer_scale(blk, "ls_2", blk.mlp(blk.ln_2(v)))


class MaskClipVision(ClipPatchTower):
    """MaskCLIP over an open_clip ViT: global CLIP embedding and value-path patch features.

    ``residual=True`` is the authors' code (``maskclip``); ``residual=False`` the residual-free value path
    (``maskclip-nores``)."""

    pos_antialias = False  # the authors' mmseg code resizes position embeddings without antialiasing

    def __init__(self, visual: nn.Module, *, residual: bool = True) -> None:
        super().__init__(visual)
        self.residual = residual
        self.method = "maskclip" if residual else "maskclip-nores"

    @property
    def variant(self) -> str:
        """What the patch features are, for results and reports (so variants are never mixed silently)."""
        if self.residual:
            return "maskclip (authors' code: value path + last block's residual and MLP; bicubic pos-embed, no antialias)"
        return "maskclip-nores (value path only, no residual or MLP; bicubic pos-embed, no antialias)"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        x, (h, w) = embed_tokens(self.visual, images, antialias=self.pos_antialias)
        blocks = self.visual.transformer.resblocks
        for blk in blocks[:-1]:
            x = run_block(self.visual, blk, x)
        dense = value_path(blocks[-1], x, self.residual)
        patches = project(self.visual, dense[:, 1:]).reshape(x.shape[0], h, w, -1)
        x = run_block(self.visual, blocks[-1], x)
        return pooled_embedding(self.visual, x), patches

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


__all__ = ["value_embeddings", "value_path", "MaskClipVision"]
