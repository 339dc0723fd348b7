"""The DVT denoiser (Denoising Vision Transformers): one transformer block that cleans the frozen patch grid."""

from __future__ import annotations

import logging
import math
import pickle
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, Mlp
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["DENOISERS", "DVT_GRID", "DVTDenoiser", "read_denoiser_state"]

DENOISERS = ("none", "dvt")
DVT_GRID = 37  # DVT learns its position embedding on a 37 x 37 patch grid (518 px at patch 14)


class DVTDenoiser(nn.Module):
    """DVT's generalizable denoiser as the SimZSS release uses it, on patch tokens [B, h, w, D].

    A learned ``pos_embed`` (1 x 37*37 x D), resampled to the input grid with timm's
    ``resample_abs_pos_embed`` (bicubic, antialiased), is added to the tokens, which then go through one
    timm ``Block`` (D wide, D // 64 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, exact GELU, no layer
    scale). Parameter names follow DVT's (``denoiser.*``, ``pos_embed``), so DVT weight files load as they are.
    """

    def __init__(self, dim: int, *, grid: int = DVT_GRID) -> None:
        super().__init__()
        self.dim = dim
        self.grid = grid
        self.denoiser = Block(
            dim=dim,
            num_heads=max(1, dim // 64),
            mlp_ratio=4,
            qkv_bias=True,
            qk_norm=False,
            init_values=None,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            mlp_layer=Mlp,
        )
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)

    def forward(self, patches: Tensor) -> Tensor:
        """Denoised patch tokens, same shape as ``patches`` [B, h, w, D]."""
        b, h, w, d = patches.shape
        x = patches.reshape(b, h * w, d)
        pos = resample_abs_pos_embed(self.pos_embed, [h, w], num_prefix_tokens=0)
        x = self.denoiser(x + pos.to(x.dtype))
        return x.reshape(b, h, w, d)

    def load_state(self, state: Mapping[str, Tensor], source: str) -> None:
        """Load DVT weights (``denoiser.*`` and ``pos_embed``); a mismatch is a ``ValueError`` naming the keys."""
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state)
        unexpected = sorted(k for k in state if k not in own)
        if missing or unexpected:
            raise ValueError(
                f"{source}: DVT denoiser weights do not match"
                + (f"; missing {_names(missing)}" if missing else "")
                + (f"; unexpected {_names(unexpected)}" if unexpected else "")
            )
        bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
               for k, v in own.items() if state[k].shape != v.shape]
        if bad:
            grid = state["pos_embed"].shape[1] if state["pos_embed"].ndim == 3 else None
            hint = ""
            if grid is not None and math.isqrt(grid) ** 2 == grid and state["pos_embed"].shape[-1] == self.dim:
                side = math.isqrt(grid)
                hint = f" (a {side}x{side} position grid; this denoiser uses {self.grid}x{self.grid})"
            raise ValueError(f"{source}: DVT denoiser weights have other shapes: {_names(bad)}{hint}")
        self.load_state_dict(dict(state), strict=True)


def read_denoiser_state(path: str | Path) -> dict[str, Tensor]:
    """DVT weights from a local file: ``torch.load(weights_only=True)``, the ``denoiser`` entry when present.

    ``module.`` prefixes are dropped; the frozen backbone's copy (``vit.*``), which some DVT files carry, is
    left out (the tower has its own). Files that need code to unpickle are refused.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DVT denoiser weights file not found: {p} (set model.vision.denoiser_weights)")
    try:
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "global" not in str(e).lower():  # garbage, not code
            raise ValueError(f"{p}: not a readable torch weights file ({first})") from None
        raise ValueError(f"{p}: refusing to load, the file needs pickled code to be unpickled ({first})") from None
    except Exception as e:  # torch's unpickler raises anything (KeyError, TypeError, ...) on foreign bytes
        raise ValueError(f"{p}: not a readable torch weights file ({type(e).__name__}: {e})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("denoiser"), Mapping):
        obj = obj["denoiser"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{p}: expected a state dict (or a dict with a 'denoiser' state dict) of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    backbone = [k for k in state if k.startswith("vit.")]
    if backbone:
        log.info("%s: leaving out %d backbone keys (vit.*) of the DVT file", p, len(backbone))
    return {k: v for k, v in state.items() if not k.startswith("vit.")}


def _names(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")
