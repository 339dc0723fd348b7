"""The frozen DINOv2 vision tower (a timm ViT): CLS token and patch-token grid, never in autograd."""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import Tensor, nn

from simzss.config import VisionConfig
from simzss.models.denoiser import DENOISERS, DVTDenoiser, read_denoiser_state
from simzss.weights_files import weights_file_kind

log = logging.getLogger(__name__)

__all__ = ["FrozenVisionTower", "build_vision_tower", "vision_embed_dim", "vision_state_shapes", "weights_file_kind"]


#: The weights file looked for when ``weights`` names a folder (timm's hub repositories hold model.safetensors).
WEIGHTS_FILES_IN_FOLDER = ("model.safetensors", "pytorch_model.bin")


# Input statistics by name: (mean, std).
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),  # type: ignore[dict-item]
    "clip": (tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)),  # type: ignore[dict-item]
}


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


def vision_state_shapes(name: str, model_kwargs: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the timm model's state dict as the tower builds it, without allocating it (meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in _create(name, False, None, model_kwargs).state_dict().items()}


def vision_embed_dim(name: str, model_kwargs: dict[str, Any] | None = None) -> int:
    """Width of a vision tower without allocating it (built on the meta device, no weights)."""
    with torch.device("meta"):
        return int(_create(name, False, None, model_kwargs).embed_dim)


class FrozenVisionTower(nn.Module):
    """A frozen timm DINOv2 ViT returning the CLS token [B, D] and the patch grid [B, h, w, D].

    Weights come from the hub name (``pretrained=True``; cached by huggingface_hub, so ``HF_HUB_OFFLINE=1``
    works once fetched), or from a local ``weights`` file or a folder holding ``model.safetensors`` (a hub
    snapshot) (safetensors or a torch file, loaded with ``weights_only=True``; original DINOv2 checkpoints are
    converted by timm's filter). ``img_size`` sets the stored position-embedding grid; ``None`` keeps
    the pretrained grid (518 px for DINOv2), which is best since ``dynamic_img_size`` interpolates
    it to every input size that is a multiple of the patch size. Features are taken after the final
    norm, with the register tokens dropped. The tower never requires grad, runs under
    ``torch.no_grad`` and stays in eval mode whatever ``train()`` is called with. Inputs must be
    normalised with ``mean``/``std``: ImageNet's, or CLIP's with ``normalization="clip"`` (only to evaluate
    imported release checkpoints, which were trained on CLIP-normalised inputs).

    ``denoiser="dvt"`` adds DVT's denoiser block (:class:`~simzss.models.denoiser.DVTDenoiser`, as the
    SimZSS release uses it): applied to the final-norm patch tokens; the CLS token is taken before it. Its
    weights come from ``denoiser_weights`` (a local DVT file); they may be absent only when the tower is
    random-init (``pretrained=False`` and no ``weights``), i.e. when the weights are loaded right after.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        weights: str | None = None,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        *,
        denoiser: str = "none",
        denoiser_weights: str | None = None,
        normalization: str = "imagenet",
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"model.vision.normalization must be one of {tuple(NORMALIZATIONS)}, got {normalization!r}")
        if denoiser not in DENOISERS:
            raise ValueError(f"model.vision.denoiser must be one of {DENOISERS}, got {denoiser!r}")
        if denoiser == "none" and denoiser_weights is not None:
            raise ValueError("model.vision.denoiser_weights is set but model.vision.denoiser is 'none'; set denoiser: dvt")
        if denoiser == "dvt" and denoiser_weights is None and (pretrained or weights is not None):
            raise ValueError(
                "model.vision.denoiser=dvt needs model.vision.denoiser_weights, a local DVT weights file "
                "(e.g. vit_base_patch14_reg4_dinov2.lvd142m.pth of jjiaweiyang/DVT)"
            )
        self.name = name
        self.model = _create(name, pretrained and weights is None, img_size, model_kwargs)
        if weights is not None:
            self._load_weights(weights)
        self.denoiser: DVTDenoiser | None = None
        if denoiser == "dvt":
            self.denoiser = DVTDenoiser(int(self.model.embed_dim))
            if denoiser_weights is not None:
                self.denoiser.load_state(read_denoiser_state(denoiser_weights), denoiser_weights)
                log.info("loaded DVT denoiser weights from %s", denoiser_weights)
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
        if not (_close(mean, IMAGENET_DEFAULT_MEAN) and _close(std, IMAGENET_DEFAULT_STD)):
            raise ValueError(
                f"{name}: pretrained_cfg mean/std {mean}/{std} are not ImageNet's; SimZSS expects a DINOv2 "
                "model normalised with ImageNet mean/std (not CLIP's)"
            )
        self.normalization = normalization
        self.mean: tuple[float, float, float] = NORMALIZATIONS[normalization][0]
        self.std: tuple[float, float, float] = NORMALIZATIONS[normalization][1]
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

        if Path(path).is_dir():  # a downloaded hub snapshot (e.g. huggingface-cli download timm/NAME --local-dir D)
            found = next((Path(path) / f for f in WEIGHTS_FILES_IN_FOLDER if (Path(path) / f).is_file()), None)
            if found is None:
                raise FileNotFoundError(f"vision weights folder {path} has none of {', '.join(WEIGHTS_FILES_IN_FOLDER)}")
            path = str(found)
        if not Path(path).is_file():
            raise FileNotFoundError(f"vision weights file not found: {path}")
        kind = weights_file_kind(path)
        if kind == "unknown":
            raise ValueError(f"cannot load vision weights {path}: not a torch or safetensors weights file (its bytes "
                             "are neither); give a state dict saved as .safetensors or with torch.save")
        try:
            load_checkpoint(self.model, path, strict=True, filter_fn=checkpoint_filter_fn, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, KeyError, ValueError, AttributeError, TypeError, EOFError,
                IndexError, OSError, SafetensorError) as e:
            # RuntimeError: missing/unexpected keys or shapes, or (timm wraps it) a blocked pickle;
            # AttributeError/TypeError: not a state dict; EOFError/IndexError/SafetensorError: a cut or damaged file
            if kind != "safetensors" and (isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e)):
                raise ValueError(f"cannot load vision weights {path}: the pickle holds objects other than plain "
                                 "tensors (refused: unpickling can run code); save its state dict as .safetensors"
                                 ) from None
            if isinstance(e, (EOFError, IndexError, OSError, SafetensorError, pickle.UnpicklingError)):
                raise ValueError(f"cannot load vision weights {path}: the {kind} file is damaged or cut short "
                                 f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); download or save it again"
                                 ) from None
            raise ValueError(f"cannot load vision weights {path} into {self.name}: {str(e)[:2000]}") from e
        log.info("loaded vision weights from %s", path)

    def train(self, mode: bool = True) -> "FrozenVisionTower":
        """Always eval mode: the tower is frozen (dropout / drop-path must never be active)."""
        return super().train(False)

    def forward(self, images: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``images`` [B, 3, H, W] (H, W multiples of the patch size) -> (cls [B, D], patches [B, h, w, D]).

        Runs under ``torch.inference_mode`` and, on CUDA, in bf16 autocast. The outputs are ordinary tensors
        (usable by autograd ops of the trainable side) in ``dtype``, by default the compute dtype: the one copy
        out of inference mode is the conversion the caller needs anyway.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        if h * self.patch_size != images.shape[-2] or w * self.patch_size != images.shape[-1]:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            tokens = self.model.forward_features(images)  # [B, prefix + h*w, D], final norm applied
            cls = tokens[:, 0]
            patches = tokens[:, self.num_prefix_tokens :].reshape(tokens.shape[0], h, w, -1)
            if self.denoiser is not None:
                patches = self.denoiser(patches)
        # out of inference mode: inference tensors cannot be saved for backward, so hand out normal copies
        if torch.is_inference_mode_enabled():
            return (cls, patches) if dtype is None else (cls.to(dtype), patches.to(dtype))
        return _ordinary(cls, dtype), _ordinary(patches, dtype)


def _ordinary(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """A non-inference copy of an inference tensor, converted to ``dtype`` on the way."""
    return t.to(dtype or t.dtype, copy=True)


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-3) for x, y in zip(a, b))


def build_vision_tower(cfg: VisionConfig) -> FrozenVisionTower:
    """The frozen tower a ``VisionConfig`` describes: the one place a config becomes a tower (training, feature
    cache, export), so cached features and exported weights always equal the model's own."""
    return FrozenVisionTower(cfg.name, pretrained=cfg.pretrained, weights=cfg.weights,
                             model_kwargs=dict(cfg.model_kwargs or {}), denoiser=cfg.denoiser,
                             denoiser_weights=cfg.denoiser_weights, normalization=cfg.normalization)
