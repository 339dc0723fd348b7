"""Importing the SimZSS release (tileb1/simzss): its checkpoints turned into simzss exports.

The release is an open_clip fork; its checkpoints are state dicts of its ``SimZSS(CustomTextCLIP)`` model:

- ``text.*``: open_clip's ``TextTransformer`` (causal, ``ln_final``, ``text_projection`` without bias on every
  token, caption embedding at the first end-of-text id). It maps exactly onto a scratch :class:`TextTower`
  (a ``CLIPTextModel``): ``in_proj`` is split into q/k/v, the projection is transposed, pooling is ``argmax``.
- ``visual.vit.model.*``: the frozen timm DINOv2 ViT (``vit_base_patch14_reg4_dinov2`` for the released ViT-B/14).
- ``visual.denoiser.*`` + ``visual.pos_embed``: the DVT denoiser block (:mod:`simzss.models.denoiser`).
- ``logit_scale``, and training-only state that inference does not use (``logit_scale_local``,
  ``classification_weights_ema``, ``beta_ema``, ``logit_bias*``).

The checkpoint is read with ``torch.load(weights_only=True)`` (pickled code is refused), as a bare state dict or
``{"state_dict": ...}``, with or without ``module.`` prefixes. A file that is not a PyTorch checkpoint at all (an
image, text, random bytes) is recognised from its first bytes and refused in one line saying what file is
expected, without handing it to the unpickler (whose messages advise ``weights_only=False``, an unsafe step).
Every key is accounted for: unknown or missing keys are errors naming them. The tokenizer is CLIP's BPE with open_clip's exact ids
(:mod:`simzss.data.clip_tokenizer`), saved into the export, so nothing is downloaded, now or when loading.
The ``simzss import-official`` command is :mod:`simzss.cli.import_official`.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
from torch import Tensor

from simzss.config import ModelConfig, TextConfig, VisionConfig
from simzss.data.clip_tokenizer import build_openclip_tokenizer
from simzss.data.tokenize import OPENCLIP_TOKENIZER
from simzss.io.export import write_export
from simzss.models.denoiser import DVT_GRID, DVTDenoiser
from simzss.models.simzss import SimZSS
from simzss.models.vision import vision_state_shapes
from simzss.weights_files import HEAD_BYTES, PICKLE, SAFETENSORS, TORCH_ZIP, sniff

logger = logging.getLogger(__name__)

__all__ = [
    "RELEASE_VISION",
    "OfficialCheckpointError",
    "ConvertedCheckpoint",
    "read_official_checkpoint",
    "convert_official",
    "import_official",
    "EXPECTED_FILE",
]

RELEASE_VISION = "vit_base_patch14_reg4_dinov2.lvd142m"  # the released checkpoints' frozen tower
CLIP_VOCAB_SIZE = 49408  # CLIP's BPE: 48,894 merges + 2 x 256 byte symbols + start / end of text
VISION_SRC = "visual.vit.model."
DENOISER_SRC = "visual.denoiser."
DENOISER_POS_SRC = "visual.pos_embed"
TEXT_SRC = "text."
TEXT_TOWER = "text.transformer."  # the CLIPTextModel inside simzss's TextTower
# Training-time state of the release's model that inference does not use.
TRAINING_ONLY = ("logit_scale_local", "classification_weights_ema", "beta_ema", "logit_bias", "logit_bias_local")
# Top-level keys of the fork's older CLIP layout (text tower not under ``text.``).
_LEGACY_TEXT = ("text_projection", "positional_embedding", "token_embedding.", "transformer.", "ln_final.")
# Per-block renames: fork (open_clip ResidualAttentionBlock) -> transformers CLIPEncoderLayer.
_BLOCK_MAP = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_IN_PROJ = ("attn.in_proj_weight", "attn.in_proj_bias")
_LIST_LIMIT = 20
#: What a refusal tells the user to give instead.
EXPECTED_FILE = ("expected a release checkpoint: a .pt file holding a state dict of tensors (torch.save) "
                 "or a .safetensors file")
_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


class OfficialCheckpointError(ValueError):
    """A checkpoint that is not a release checkpoint simzss can import (the message names the keys or file)."""


@dataclass
class ConvertedCheckpoint:
    """A release checkpoint in simzss terms: the model config and the ``SimZSS`` state dict."""

    config: ModelConfig
    state: Dict[str, Tensor]  # SimZSS.state_dict() names (text.*, logit_scale, vision.*)
    unused: List[str] = field(default_factory=list)  # training-only keys left out
    ignored_unknown: List[str] = field(default_factory=list)  # unknown keys left out (only with ignore_unknown)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_official_checkpoint(path: str | Path) -> Dict[str, Tensor]:
    """The release checkpoint's state dict: ``weights_only`` load, ``state_dict`` unwrapped, ``module.`` dropped.

    ``.safetensors`` files are read with safetensors. Anything that needs code to unpickle, or that is not a
    mapping of names to tensors, is an :class:`OfficialCheckpointError` with a one-line message.
    """
    p = Path(path)
    if p.is_dir():
        raise OfficialCheckpointError(f"{p}: a folder, not a file; {EXPECTED_FILE}")
    if not p.is_file():
        raise OfficialCheckpointError(f"{p}: no such checkpoint file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except (SafetensorError, OSError) as e:
            raise OfficialCheckpointError(f"{p}: unreadable safetensors file ({_one_line(e)})") from None
    else:
        obj = _load_torch_file(p)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        others = sorted(k for k in obj if k != "state_dict")
        if others:
            logger.info("%s: using its state_dict; leaving out %s", p, ", ".join(map(str, others)))
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise OfficialCheckpointError(f"{p}: expected a state dict (or {{'state_dict': ...}}), got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise OfficialCheckpointError(f"{p}: entries that are not named tensors: {_names(bad)}")
    state = {_strip_module(k): v for k, v in obj.items()}
    if len(state) != len(obj):
        raise OfficialCheckpointError(f"{p}: keys collide once their 'module.' prefixes are removed")
    if any(k.startswith(_LEGACY_TEXT) for k in state) and not any(k.startswith(TEXT_SRC) for k in state):
        # the fork's CLIP (not CustomTextCLIP) layout: same text tower, not under ``text.``
        state = {(TEXT_SRC + k if k.startswith(_LEGACY_TEXT) else k): v for k, v in state.items()}
    return state


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _not_torch(head: bytes) -> Optional[str]:
    """What a file is when its first bytes say it is not a PyTorch checkpoint (zip or protocol 2-5 pickle);
    None when it may be one."""
    kind = sniff(head)
    if kind in (TORCH_ZIP, PICKLE):
        return None
    return "a safetensors file (give it the .safetensors suffix)" if kind == SAFETENSORS else kind


def _load_torch_file(p: Path) -> Any:
    """``torch.load(weights_only=True)`` of ``p``, each failure one line naming ``p`` and the file expected.

    Files that are not PyTorch checkpoints are refused from their first bytes; pickles that need code are
    refused naming the code; torch's own messages (which advise ``weights_only=False``) are never quoted.
    """
    try:
        with open(p, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as e:
        raise OfficialCheckpointError(f"{p}: cannot read it ({e.strerror or type(e).__name__})") from None
    kind = _not_torch(head)
    if kind is not None:
        raise OfficialCheckpointError(f"{p}: not a PyTorch checkpoint ({kind}); {EXPECTED_FILE}")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickles in words that advise weights_only=False
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = _GLOBAL.search(str(e))
        if code is not None:
            raise OfficialCheckpointError(
                f"{p}: refusing to load a pickle that needs code ({code.group(1)}), which could run anything; "
                f"{EXPECTED_FILE} (re-save it with torch.save(model.state_dict(), PATH) where you trust the file)"
            ) from None
        raise OfficialCheckpointError(f"{p}: not a PyTorch checkpoint (a pickle without torch's layout); "
                                      f"{EXPECTED_FILE}") from None
    except Exception:  # torch's unpickler raises anything (KeyError, RuntimeError, EOFError...) on foreign bytes
        kind = "a damaged or foreign zip archive" if sniff(head) == TORCH_ZIP else "a damaged or foreign pickle"
        raise OfficialCheckpointError(f"{p}: not a PyTorch checkpoint ({kind}); {EXPECTED_FILE}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__


def _names(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f" ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


# --------------------------------------------------------------------------------------------------
# Converting
# --------------------------------------------------------------------------------------------------


class _Keys:
    """Bookkeeping of which checkpoint keys were used, so that unknown and missing ones are reported."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.state = state
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.shapes: list[str] = []

    def take(self, key: str, shape: Optional[Tuple[int, ...]] = None) -> Optional[Tensor]:
        if key not in self.state:
            self.missing.append(key)
            return None
        self.used.add(key)
        value = self.state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.shapes.append(f"{key} {tuple(value.shape)} (expected {tuple(shape)})")
        return value


def _text_config(state: Mapping[str, Tensor], heads: Optional[int], activation: str) -> TextConfig:
    """The scratch text tower matching the fork's ``TextTransformer`` shapes (heads: given, else width / 64)."""
    need = [f"{TEXT_SRC}ln_final.weight", f"{TEXT_SRC}positional_embedding", f"{TEXT_SRC}token_embedding.weight",
            f"{TEXT_SRC}text_projection"]
    missing = [k for k in need if k not in state]
    if missing:
        raise OfficialCheckpointError(f"not a SimZSS release checkpoint: missing text tower keys {_names(missing)}")
    width = int(state[f"{TEXT_SRC}ln_final.weight"].shape[0])
    block_key = re.compile(rf"{re.escape(TEXT_SRC)}transformer\.resblocks\.(\d+)\.")
    blocks = {int(m.group(1)) for k in state if (m := block_key.match(k))}
    layers = max(blocks) + 1 if blocks else 0
    if layers == 0:
        raise OfficialCheckpointError("not a SimZSS release checkpoint: no text.transformer.resblocks.* keys")
    heads = heads if heads is not None else max(1, width // 64)  # open_clip's text towers use 64-wide heads
    if width % heads:
        raise OfficialCheckpointError(f"text width {width} is not divisible by {heads} heads (set --text-heads)")
    fc = state.get(f"{TEXT_SRC}transformer.resblocks.0.mlp.c_fc.weight")
    if fc is not None and fc.shape[0] != 4 * width:
        raise OfficialCheckpointError(
            f"text MLP width {fc.shape[0]} is not 4 x {width}; only open_clip's mlp_ratio 4 text towers are supported"
        )
    return TextConfig(
        kind="scratch",
        layers=layers,
        width=width,
        heads=heads,
        context_length=int(state[f"{TEXT_SRC}positional_embedding"].shape[0]),
        pooling="argmax",
        proj_bias=False,
        activation=activation,
    )


def _convert_text(keys: _Keys, cfg: TextConfig, embed_dim: int, vocab_size: int) -> Dict[str, Tensor]:
    """Fork text tower -> TextTower state (names of the CLIPTextModel inside it), every key checked."""
    w, src, dst = cfg.width, TEXT_SRC, TEXT_TOWER + _clip_text_prefix()
    out: Dict[str, Tensor] = {}

    def put(dst_key: str, value: Optional[Tensor]) -> None:
        if value is not None:
            out[dst_key] = value

    put(f"{dst}embeddings.token_embedding.weight", keys.take(f"{src}token_embedding.weight", (vocab_size, w)))
    put(f"{dst}embeddings.position_embedding.weight", keys.take(f"{src}positional_embedding", (cfg.context_length, w)))
    for i in range(cfg.layers):
        block, layer = f"{src}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
        for name, new in _BLOCK_MAP.items():
            if name.startswith("mlp.c_fc"):
                shape: Tuple[int, ...] = (4 * w, w) if name.endswith("weight") else (4 * w,)
            elif name.startswith("mlp.c_proj"):
                shape = (w, 4 * w) if name.endswith("weight") else (w,)
            else:
                shape = (w, w) if name.endswith("proj.weight") else (w,)
            put(layer + new, keys.take(block + name, shape))
        for name in _IN_PROJ:  # open_clip's fused in_proj -> q_proj / k_proj / v_proj
            fused = keys.take(block + name, (3 * w, w) if name.endswith("weight") else (3 * w,))
            if fused is not None and fused.shape[0] == 3 * w:
                kind = "weight" if name.endswith("weight") else "bias"
                for part, chunk in zip(("q", "k", "v"), fused.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{part}_proj.{kind}"] = chunk.clone()
    put(f"{dst}final_layer_norm.weight", keys.take(f"{src}ln_final.weight", (w,)))
    put(f"{dst}final_layer_norm.bias", keys.take(f"{src}ln_final.bias", (w,)))
    proj = keys.take(f"{src}text_projection", (w, embed_dim))
    if proj is not None:
        out["text.proj.weight"] = proj.t().contiguous()  # x @ P == Linear(weight=P^T, no bias)
    return out


@lru_cache(maxsize=1)
def _clip_text_prefix() -> str:
    """Where ``CLIPTextModel`` keeps its layers in its state dict (``text_model.`` in transformers 4, none in 5)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    probe = CLIPTextConfig(vocab_size=2, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=1, max_position_embeddings=2, pad_token_id=0, bos_token_id=0,
                           eos_token_id=1)
    with torch.device("meta"):
        names = list(CLIPTextModel(probe).state_dict())
    key = next(k for k in names if k.endswith("embeddings.token_embedding.weight"))
    return key[: -len("embeddings.token_embedding.weight")]


def _vision_kwargs(vstate: Mapping[str, Tensor], name: str) -> Dict[str, Any]:
    """timm ``model_kwargs`` that make ``name`` match the checkpoint's shapes (empty for the released ViT-B/14)."""
    need = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"]
    missing = [VISION_SRC + k for k in need if k not in vstate]
    if missing:
        raise OfficialCheckpointError(f"vision tower keys missing: {_names(missing)}")
    dim = int(vstate["cls_token"].shape[-1])
    patch = int(vstate["patch_embed.proj.weight"].shape[-1])
    regs = int(vstate["reg_token"].shape[1]) if "reg_token" in vstate else 0
    depth = 1 + max(int(m.group(1)) for k in vstate if (m := re.match(r"blocks\.(\d+)\.", k)))
    mlp_ratio = vstate["blocks.0.mlp.fc1.weight"].shape[0] / dim
    n_pos = int(vstate["pos_embed"].shape[1])
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:  # position embedding with a CLS slot (no_embed_class=False)
        grid = math.isqrt(n_pos - 1)
    with torch.device("meta"):
        try:
            base = timm.create_model(name, pretrained=False, num_classes=0)
        except (RuntimeError, AssertionError, TypeError) as e:
            raise OfficialCheckpointError(f"cannot create timm vision model {name!r}: {_one_line(e)}") from None
    base_patch = base.patch_embed.patch_size
    base_patch = int(base_patch[0] if isinstance(base_patch, (tuple, list)) else base_patch)
    base_img = base.patch_embed.img_size
    base_img = int(base_img[0] if isinstance(base_img, (tuple, list)) else base_img)
    found = {
        "embed_dim": (dim, int(base.embed_dim)),
        "depth": (depth, len(base.blocks)),
        "num_heads": (max(1, dim // 64), int(base.blocks[0].attn.num_heads)),  # DINOv2: 64-wide heads
        "mlp_ratio": (mlp_ratio, base.blocks[0].mlp.fc1.out_features / int(base.embed_dim)),
        "patch_size": (patch, base_patch),
        "reg_tokens": (regs, int(getattr(base, "num_reg_tokens", 0))),
        "img_size": (grid * patch, base_img),
    }
    return {k: v for k, (v, default) in found.items() if v != default}


def _convert_vision(keys: _Keys, name: str, kwargs: Dict[str, Any]) -> Dict[str, Tensor]:
    """``visual.vit.model.*`` -> the tower's ``vision.model.*``, checked against the timm model's own keys."""
    try:
        shapes = vision_state_shapes(name, kwargs)
    except ValueError as e:
        raise OfficialCheckpointError(f"{e} (vision model_kwargs {kwargs})") from None
    return {f"vision.model.{k}": v for k, v in _take_module(keys, VISION_SRC, shapes).items()}


def _take_module(keys: _Keys, prefix: str, shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Tensor]:
    out = {}
    for k, shape in shapes.items():
        value = keys.take(prefix + k, shape)
        if value is not None:
            out[k] = value
    return out


def convert_official(
    state: Mapping[str, Tensor],
    *,
    vision_name: str = RELEASE_VISION,
    vision_kwargs: Optional[Dict[str, Any]] = None,
    text_heads: Optional[int] = None,
    quick_gelu: bool = False,
    ignore_unknown: bool = False,
    vocab_size: int = CLIP_VOCAB_SIZE,
) -> ConvertedCheckpoint:
    """Map a release state dict onto simzss's model; every checkpoint key is used, training-only, or an error.

    The vision architecture is ``vision_name`` with ``model_kwargs`` inferred from the checkpoint's shapes
    (depth, width, patch, registers, position grid; 64-wide heads), updated by ``vision_kwargs``. The text tower's
    heads default to width / 64 (open_clip's convention: 8 for the released 512-wide tower).
    """
    keys = _Keys(state)
    vstate = {k[len(VISION_SRC):]: v for k, v in state.items() if k.startswith(VISION_SRC)}
    if not vstate:
        raise OfficialCheckpointError(f"not a SimZSS release checkpoint: no vision tower keys ({VISION_SRC}*)")
    kwargs = {**_vision_kwargs(vstate, vision_name), **(vision_kwargs or {})}
    converted = _convert_vision(keys, vision_name, kwargs)
    embed_dim = int(vstate["cls_token"].shape[-1])

    denoiser = "dvt" if any(k.startswith(DENOISER_SRC) for k in state) else "none"
    if denoiser == "dvt":
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in DVTDenoiser(embed_dim, grid=DVT_GRID).state_dict().items()}
        # DVT's own names are kept: visual.denoiser.* -> denoiser.denoiser.*, visual.pos_embed -> denoiser.pos_embed
        den = _take_module(keys, "visual.", expected)
        converted.update({f"vision.denoiser.{k}": v for k, v in den.items()})

    text_cfg = _text_config(state, text_heads, "quick_gelu" if quick_gelu else "gelu")
    converted.update(_convert_text(keys, text_cfg, embed_dim, vocab_size))
    scale = keys.take("logit_scale", ())
    if scale is not None:
        converted["logit_scale"] = scale.reshape(())

    unused = sorted(k for k in state if k in TRAINING_ONLY)
    if denoiser == "none" and DENOISER_POS_SRC in state:
        unused.append(DENOISER_POS_SRC)  # the release keeps it even without a denoiser block; it is then unused
    unknown = sorted(k for k in state if k not in keys.used and k not in unused)
    problems = []
    if keys.missing:
        problems.append(f"missing keys: {_names(keys.missing)}")
    if unknown and not ignore_unknown:
        problems.append(f"unknown keys: {_names(unknown)}")
    if keys.shapes:
        problems.append(f"unexpected shapes: {_names(keys.shapes)}")
    if problems:
        raise OfficialCheckpointError("; ".join(problems))
    if unknown:
        logger.warning("leaving out %d unknown keys: %s", len(unknown), _names(unknown))
    cfg = ModelConfig(
        # The release normalised DINOv2's inputs with CLIP's statistics (open_clip's default); its text tower
        # was aligned to those features, so the import keeps them.
        vision=VisionConfig(name=vision_name, pretrained=False, weights=None, model_kwargs=kwargs, denoiser=denoiser,
                            normalization="clip"),
        text=text_cfg,
        tokenizer=OPENCLIP_TOKENIZER,
        query="prototype",  # the release's training recipe (only matters when training further)
        concept_target="argmax",
    )
    state_out = {k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in converted.items()}
    return ConvertedCheckpoint(cfg, state_out, unused, unknown if ignore_unknown else [])


# --------------------------------------------------------------------------------------------------
# Importing
# --------------------------------------------------------------------------------------------------


def import_official(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    vision_name: str = RELEASE_VISION,
    vision_kwargs: Optional[Dict[str, Any]] = None,
    text_heads: Optional[int] = None,
    quick_gelu: bool = False,
    ignore_unknown: bool = False,
    bpe_path: Optional[str | Path] = None,
) -> Tuple[Path, ConvertedCheckpoint]:
    """Write a simzss export of a release checkpoint (vision and denoiser weights included; no download).

    The converted weights are loaded strictly into a model built from the derived config before anything is
    written, so the export loads with ``SimZSS.from_pretrained`` as any other.
    """
    if Path(out_dir).exists() and not overwrite:  # before the (slow) conversion
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    state = read_official_checkpoint(checkpoint)
    try:
        conv = convert_official(state, vision_name=vision_name, vision_kwargs=vision_kwargs, text_heads=text_heads,
                                quick_gelu=quick_gelu, ignore_unknown=ignore_unknown)
    except OfficialCheckpointError as e:  # the conversion does not know the file: name it
        raise OfficialCheckpointError(f"{checkpoint}: {e}") from None
    tokenizer = build_openclip_tokenizer(bpe_path)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise OfficialCheckpointError(f"the BPE file gives {len(tokenizer)} tokens, not CLIP's {CLIP_VOCAB_SIZE}")
    model = SimZSS.from_config(conv.config, tokenizer)
    result = model.load_state_dict(conv.state, strict=False)
    # Non-persistent buffers never appear in a state dict; everything else must come from the checkpoint.
    if result.missing_keys or result.unexpected_keys:
        raise OfficialCheckpointError(
            f"converted weights do not fit the model: missing {_names(result.missing_keys)}; "
            f"unexpected {_names(result.unexpected_keys)}"
        )
    assert model.vision is not None
    out = write_export(
        out_dir,
        config=conv.config,
        tokenizer=tokenizer,
        trainable_state=model.trainable_state_dict(),
        vision_state=model.vision.state_dict(),
        overwrite=overwrite,
    )
    return out, conv
