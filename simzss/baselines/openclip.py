"""open_clip models for the training-free baselines: spec parsing, loading, and the zero-shot wrapper.

A baseline model is an open_clip CLIP whose patch tokens come from a training-free pathway (GEM, MaskCLIP);
:class:`ClipZeroShot` gives it the interface the evaluations use for SimZSS exports (``encode_image``,
``encode_texts``, ``vision.patch_size``, ``vision.mean/std``, ``logit_scale``).

Model part of a baseline spec (after ``gem:`` / ``maskclip:``), see :func:`parse_clip_source`:

* ``NAME/TAG``      open_clip built-in model + pretrained tag (``ViT-B-16/openai``; open_clip downloads and caches)
* ``NAME@FILE``     open_clip built-in model + a local weights file (``ViT-B-16@/models/clip-b16.bin``)
* ``CONFIG.json/random`` or ``NAME/random``   random init (smoke tests); CONFIG.json is an open_clip model
  config file (``{"embed_dim", "vision_cfg", "text_cfg"}``), also usable as ``CONFIG.json@FILE``
* ``hf-hub:ORG/REPO`` or ``local-dir:FOLDER``   open_clip's own schemas (config and weights together)
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simzss.baselines.weights import check_weights_file

log = logging.getLogger(__name__)

RANDOM_TAG = "random"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class ClipSource:
    """Where an open_clip model comes from: ``name`` (built-in name, config JSON path or schema URL) plus
    either a pretrained ``tag``, a local ``weights`` file, or neither (schema sources carry their weights;
    tag ``random`` = random init)."""

    name: str
    tag: Optional[str] = None
    weights: Optional[str] = None

    @property
    def random_init(self) -> bool:
        return self.tag == RANDOM_TAG

    def __str__(self) -> str:
        if self.weights:
            return f"{self.name}@{self.weights}"
        return f"{self.name}/{self.tag}" if self.tag else self.name


def parse_clip_source(text: str) -> ClipSource:
    """Parse the model part of a baseline spec (syntax in the module docstring); ValueError naming the fix."""
    text = text.strip()
    if not text:
        raise ValueError("empty model: use e.g. ViT-B-16/openai, ViT-B-16@/path/weights.bin or hf-hub:ORG/REPO")
    if text.startswith(("hf-hub:", "local-dir:")):
        return ClipSource(text)
    if "@" in text:
        name, weights = text.split("@", 1)
        if not name or not weights:
            raise ValueError(f"{text!r}: expected NAME@WEIGHTS_FILE, e.g. ViT-B-16@/models/clip-b16.bin")
        return ClipSource(name, weights=weights)
    if text.endswith(".json") or "/" not in text:
        raise ValueError(
            f"{text!r}: no weights given; add a pretrained tag (ViT-B-16/openai), a local file "
            f"(ViT-B-16@/path/weights.bin), or /{RANDOM_TAG} for a random-init model"
        )
    name, tag = text.rsplit("/", 1)
    if not name or not tag:
        raise ValueError(f"{text!r}: expected NAME/TAG, e.g. ViT-B-16/openai")
    return ClipSource(name, tag=tag)


def _resolve_name(name: str) -> str:
    """The open_clip model name; a ``*.json`` model-config file is registered with open_clip (name = file stem)."""
    import open_clip

    if not name.endswith(".json"):
        return name
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config not found: {path}")
    open_clip.add_model_config(path)
    return path.stem


def _check_source(src: ClipSource, name: str) -> bool:
    """Validate a source before open_clip sees it (open_clip's own errors list every model); returns whether
    the tag asks for QuickGELU (the OpenAI weights were trained with it)."""
    import open_clip

    if src.name.startswith("local-dir:"):
        folder = Path(src.name[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{src.name}: expected a folder with open_clip_config.json")
        if not any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir()):
            raise FileNotFoundError(f"{src.name}: no weights file (*.safetensors, *.bin, *.pth) in {folder}")
        return False
    if src.name.startswith("hf-hub:"):
        return False
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models() (e.g. ViT-B-16)")
    if src.weights is not None:
        if not Path(src.weights).expanduser().is_file():
            raise FileNotFoundError(f"open_clip weights file not found: {src.weights}")
        return False
    if src.random_init:
        return False
    tags = open_clip.list_pretrained_tags_by_model(name)
    if src.tag not in tags:
        raise ValueError(f"unknown pretrained tag {src.tag!r} for {name}; known: {', '.join(tags) or 'none'} "
                         f"(or /{RANDOM_TAG}, or {name}@/path/to/weights)")
    return bool(open_clip.get_pretrained_cfg(name, src.tag).get("quick_gelu", False))


def load_open_clip(src: ClipSource, device: str | torch.device = "cpu") -> Tuple[nn.Module, Callable[..., Tensor]]:
    """(CLIP model in eval mode, tokenizer) for a source; no grad anywhere. Raises ValueError /
    FileNotFoundError with the fix for bad sources, RuntimeError when open_clip cannot build or load it."""
    import open_clip

    name = _resolve_name(src.name)
    quick_gelu = _check_source(src, name)
    if src.weights is not None:
        check_weights_file(src.weights)  # a pickle with code or foreign bytes: one line, nothing executed
    pretrained = None if src.random_init else (str(Path(src.weights).expanduser()) if src.weights else src.tag)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
    except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise RuntimeError(f"open_clip could not load {src}: {' '.join(str(e).split())[:500]}") from None
    if src.random_init:
        log.warning("%s: random-init weights (smoke tests only; numbers are meaningless)", src)
    model.eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(name)


def clip_mean_std(visual: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Input normalisation of an open_clip image tower (its preprocess config; OpenAI CLIP's by default)."""
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))


# ----------------------------------------------------------------------------------- the CLIP image tower


def check_clip_vit(visual: nn.Module, what: str) -> None:
    """``what`` needs an open_clip ViT with standard attention blocks and CLS/avg pooling (no attention pool)."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "conv1"):
        raise ValueError(f"{what} needs an open_clip VisionTransformer image tower, got {type(visual).__name__}")
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError(f"{what} does not support image towers with an attentional pooler")
    for blk in blocks:
        if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention):
            raise ValueError(f"{what} needs blocks with nn.MultiheadAttention, got {type(getattr(blk, 'attn', None)).__name__}")


def resized_pos_embed(visual: nn.Module, grid: Tuple[int, int], *, antialias: bool = True) -> Tensor:
    """The tower's position embeddings ``[1 + h*w, D]`` resized bicubically to ``grid`` (CLS entry kept).

    ``antialias=True`` is timm's ``resample_abs_pos_embed`` (what GEM's official code uses); ``False`` is plain
    ``F.interpolate(mode="bicubic", align_corners=False)`` (cubic coefficient -0.75), what MaskCLIP's code uses."""
    from timm.layers import resample_abs_pos_embed

    pos = visual.positional_embedding
    old = tuple(visual.grid_size)
    if tuple(grid) == old:
        return pos
    if antialias:
        return resample_abs_pos_embed(pos.unsqueeze(0), list(grid), list(old), num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=True)[0]
    patch = pos[1:].reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.flatten(2)[0].transpose(0, 1)], dim=0)


def embed_tokens(visual: nn.Module, images: Tensor, *, antialias: bool = True) -> Tuple[Tensor, Tuple[int, int]]:
    """Patch embedding + CLS + resized position embeddings (:func:`resized_pos_embed`) + ``ln_pre``: tokens
    ``[B, 1 + h*w, D]`` and grid."""
    x = visual.conv1(images)  # [B, D, h, w]
    grid = (int(x.shape[2]), int(x.shape[3]))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + resized_pos_embed(visual, grid, antialias=antialias).to(x.dtype)
    return visual.ln_pre(x), grid


def run_block(visual: nn.Module, blk: nn.Module, x: Tensor) -> Tensor:
    """One residual block on batch-first tokens (open_clip towers may run sequence-first)."""
    if getattr(visual.transformer, "batch_first", True):
        return blk(x)
    return blk(x.transpose(0, 1)).transpose(0, 1)


def pooled_embedding(visual: nn.Module, x: Tensor) -> Tensor:
    """The tower's global image embedding from the final tokens (CLS or average pooling, ``ln_post``, ``proj``)."""
    pooled = x[:, 1:].mean(dim=1) if getattr(visual, "pool_type", "tok") == "avg" else x[:, 0]
    return project(visual, pooled)


def project(visual: nn.Module, x: Tensor) -> Tensor:
    """``ln_post`` then the output projection (into the joint image-text space)."""
    x = visual.ln_post(x)
    return x @ visual.proj if visual.proj is not None else x


def split_qkv(attn: nn.MultiheadAttention, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-head q, k, v ``[B, heads, N, d]`` of an ``nn.MultiheadAttention`` on batch-first ``x`` ``[B, N, C]``."""
    b, n, c = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, h, c // h)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


class ClipPatchTower(nn.Module):
    """Base of the baselines' image towers: ``forward(images) -> (global [B,E], patches [B,h,w,E])`` in the
    joint space (not normalised); ``mean``/``std``/``patch_size`` describe the input it expects."""

    method = "clip"

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        check_clip_vit(visual, type(self).__name__)
        self.visual = visual
        self.mean, self.std = clip_mean_std(visual)
        ps = visual.patch_size
        self.patch_size: int = int(ps[0] if isinstance(ps, (tuple, list)) else ps)

    @property
    def variant(self) -> str:
        """What the patch features are (method and options), recorded with every result."""
        return self.method

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class ClipZeroShot(nn.Module):
    """A CLIP text tower plus a training-free patch pathway, with the zero-shot model interface.

    ``logit_scale`` is CLIP's (log space; the evaluations exponentiate it and cap it at 100).
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable[..., Tensor], vision: ClipPatchTower, *, name: str) -> None:
        super().__init__()
        self.clip = clip
        self.vision = vision
        self.tokenizer = tokenizer
        self.name = name
        self.logit_scale_max = math.log(100.0)
        self.requires_grad_(False)
        self.eval()

    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def variant(self) -> str:
        """The patch pathway and its options (e.g. MaskCLIP with or without the residual), for results."""
        return self.vision.variant

    def train(self, mode: bool = True) -> "ClipZeroShot":
        """Always eval mode: nothing here is trained."""
        return super().train(False)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """L2-normalised global embedding ``[B, E]`` and patch grid ``[B, h, w, E]`` (fp32) of normalised images."""
        cls, patches = self.vision(images)
        return F.normalize(cls.float(), dim=-1), F.normalize(patches.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised CLIP text embeddings ``[N, E]`` of ``texts``."""
        device = self.clip.logit_scale.device
        tokens = self.tokenizer(list(texts)).to(device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


__all__ = [
    "RANDOM_TAG", "OPENAI_MEAN", "OPENAI_STD", "ClipSource", "parse_clip_source", "load_open_clip", "clip_mean_std",
    "check_clip_vit", "resized_pos_embed", "embed_tokens", "run_block", "pooled_embedding", "project", "split_qkv",
    "ClipPatchTower", "ClipZeroShot",
]
