"""MaskCLIP (Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022): CLIP's last-block value embeddings
as patch features.

The ViT runs unchanged up to its last block. From the tokens x entering it: v = W_v ln_1(x) + b_v (the value
projection of the block's attention, heads concatenated), through the attention's output projection, then the
tower's ``ln_post`` and ``proj`` into the joint image-text space; query-key attention, the residual branch and
the MLP of the last block are not used. Position embeddings are resized bicubically to the input's grid.
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


class MaskClipVision(ClipPatchTower):
    """MaskCLIP over an open_clip ViT: global CLIP embedding and value-embedding patch features."""

    method = "maskclip"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        x, (h, w) = embed_tokens(self.visual, images)
        blocks = self.visual.transformer.resblocks
        for blk in blocks[:-1]:
            x = run_block(self.visual, blk, x)
        last = blocks[-1]
        dense = last.attn.out_proj(value_embeddings(last.attn, last.ln_1(x)))
        patches = project(self.visual, dense[:, 1:]).reshape(x.shape[0], h, w, -1)
        x = run_block(self.visual, last, x)
        return pooled_embedding(self.visual, x), patches


__all__ = ["value_embeddings", "MaskClipVision"]
