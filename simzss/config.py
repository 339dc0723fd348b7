"""Typed configuration for training and models.

Configs are plain dataclasses. YAML files and ``key.sub=value`` command-line overrides are merged
onto them with OmegaConf, which rejects unknown keys by name; a list override whose items hold brace
patterns (``data.shards=[/data/{00000..00059}.tar]``, not valid YAML) is read item by item, and any other
unparseable value is a one-line :class:`ConfigError` saying how to quote it. Library code receives these
dataclasses (or explicit arguments taken from them), never an argparse namespace.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import json
import re

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


@dataclass
class VisionConfig:
    """Frozen DINOv2 vision tower (a timm model)."""

    name: str = "vit_base_patch14_reg4_dinov2.lvd142m"
    # true: the hub weights of `name` (or their cached copy); false: random init; a local file or folder: the
    # same as setting `weights` to it
    pretrained: Any = True
    weights: Optional[str] = None  # local weights file (.safetensors/.pth/.bin) or folder; implies no hub download
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (e.g. depth)
    compile: bool = False
    denoiser: str = "none"  # none | dvt (DVT transformer block on the final-norm patch tokens; CLS untouched)
    denoiser_weights: Optional[str] = None  # local DVT weights file (key "denoiser"); needed for dvt unless included
    # Input statistics: imagenet (what DINOv2 was trained with; always for training) | clip (what the official
    # release fed its frozen DINOv2 by mistake; set on imported release checkpoints, whose text towers were
    # aligned to features of CLIP-normalised images)
    normalization: str = "imagenet"

    def __post_init__(self) -> None:
        if isinstance(self.pretrained, str) and self.pretrained.strip().lower() in ("true", "false"):
            self.pretrained = self.pretrained.strip().lower() == "true"
        elif isinstance(self.pretrained, str):  # a local file or folder of weights
            if self.weights not in (None, self.pretrained):
                raise ConfigError(f"model.vision.pretrained={self.pretrained!r} and model.vision.weights="
                                  f"{self.weights!r} name two weights files; keep one")
            self.pretrained, self.weights = True, self.pretrained
        elif not isinstance(self.pretrained, bool):
            raise ConfigError(f"model.vision.pretrained must be true, false or a local weights file / folder, "
                              f"got {self.pretrained!r}")


@dataclass
class TextConfig:
    """Trainable text tower: a CLIP-style causal transformer from scratch, or a pretrained AutoModel."""

    kind: str = "scratch"  # scratch | pretrained
    name_or_path: Optional[str] = None  # for kind=pretrained
    layers: int = 12
    width: int = 512
    heads: int = 8
    context_length: int = 77
    pooling: str = "eos"  # eos (last non-pad token) | cls (first token) | mean | argmax (highest token id: open_clip)
    proj_bias: bool = True  # bias of the projection g (open_clip's text_projection has none)
    activation: str = "gelu"  # MLP activation of the scratch tower: gelu | quick_gelu
    compile: bool = False


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tokenizer: str = "openai/clip-vit-base-patch32"  # HF fast tokenizer, hub name or local path
    tau: float = 0.1  # temperature of the patch-query softmax
    # Where the paper and the official release disagree, the defaults are the release's: its code produced the
    # published numbers (docs/recipe.md lists every knob; the paper's choices are one override away).
    query: str = "prototype"  # prototype (the official release) | concept (the paper)
    concept_weight: float = 0.05  # lambda; 0 turns SimZSS into LiT
    concept_target: str = "argmax"  # argmax (the official release) | label (true labels, the paper)
    concept_scale: Optional[float] = 1 / 0.07  # fixed logit scale of the concept loss; null = learned scale
    # Text concept c_t of a caption span: "mean" (the paper: mean of the span's tokens, then g) or
    # "sum_normalized" (the official release: sum over the span of L2-normalised g(token)).
    concept_pooling: str = "sum_normalized"
    # Class prototype = normalize(sum of its concepts); true L2-normalises each concept first (the paper),
    # false sums them as pooled (the official release: multi-token concepts weigh more).
    prototype_member_norm: bool = False
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)


@dataclass
class DataConfig:
    shards: List[str] = field(default_factory=list)  # brace patterns, paths, folders, list files, pipe: or URLs
    allow_pipe_in_shard_lists: bool = False  # pipe: lines inside shard list files (shards.txt) run shell commands
    max_image_pixels: int = 40_000_000  # decode cap per image (JPEGs shrink to fit, others are skipped); 0 = none
    num_samples: Optional[int] = None  # samples per epoch; default: sum of sizes.json
    image_size: int = 224
    crop_scale: Tuple[float, float] = (0.9, 1.0)
    interpolation: str = "bicubic"  # resampling of the random resized crop: bicubic (the official release) | bilinear
    # where training images are decoded and cropped: cpu (data workers; torchvision, reduced-size JPEG decoding) |
    # gpu (nvJPEG on the training device; needs CUDA) | pil (the former PIL decode + crop, for comparisons)
    decode: str = "cpu"
    # data workers per training process: a number (0 = decode in the training process) or auto (the cores this
    # process may use, shared by the training processes of the node, less two for the training loop; at least one
    # on two cores); the batches are the same for any number (simzss.data.loader.resolve_workers)
    workers: Union[int, str] = "auto"
    shuffle_buffer: int = 1000
    resampled: bool = False
    max_concepts: int = 32
    concept_bank: Optional[str] = None  # text file; default: the built-in evaluation vocabulary
    synonyms: Optional[str] = None
    spacy_model: str = "en_core_web_sm"  # used only when shards lack concepts.json
    lowercase_concepts: bool = False  # on-the-fly parsing of the lower-cased caption (the release; `prepare --lowercase`)
    feature_cache: Optional[str] = None  # cache-features output: training steps skip the vision tower (still built for eval/export)
    feature_cache_device: str = "disk"  # where cached features are served from: disk (memory-mapped) | ram (pinned) | gpu
    # pad each batch's text to its longest caption rounded up to a multiple of 8 (simzss.data.padding; same numbers)
    dynamic_padding: bool = False

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ConfigError(f"data.image_size must be a positive number of pixels, got {self.image_size}")
        if self.decode not in ("cpu", "gpu", "pil"):
            raise ConfigError(f"data.decode must be cpu, gpu or pil, got {self.decode!r}")
        if self.workers != "auto" and (isinstance(self.workers, (str, bool)) or self.workers < 0):
            raise ConfigError(f"data.workers must be auto or a number >= 0 (0 = load in the training process), "
                              f"got {self.workers!r}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0 (0: no shuffling), got {self.shuffle_buffer}")


@dataclass
class OptimConfig:
    lr: float = 3e-5
    scale_lr: bool = True  # lr *= global_batch / 256
    weight_decay: float = 0.2
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: float = 0.1  # fraction of total steps
    grad_clip: Optional[float] = None


@dataclass
class EvalHookConfig:
    """Zero-shot segmentation run by the trainer at the end (and every ``every`` steps if > 0)."""

    datasets: List[str] = field(default_factory=list)  # e.g. ["folder:/data/toy/val"]
    every: int = 0
    templates: str = "single"
    image_size: int = 448  # short side
    crop: int = 448
    stride: int = 224


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalHookConfig = field(default_factory=EvalHookConfig)
    output_dir: str = "runs"
    run_name: str = "simzss"
    seed: int = 0
    batch_size: int = 1024  # per device
    epochs: int = 10
    max_steps: Optional[int] = None  # overrides epochs when set
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | bf16 | fp16 | no
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # sha256 of every checkpoint file in its manifest.json; resume and export verify it (detects flipped bits)
    checkpoint_checksum: bool = False
    log_every: int = 10
    report_to: str = "none"  # wandb | tensorboard | none
    resume: Optional[str] = None  # latest | PATH
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    cpu: bool = False  # train on the CPU even when a GPU is visible
    find_unused_parameters: Optional[bool] = None  # DDP; null = auto (true for a pretrained text model)


T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def load_config(
    schema: type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()
) -> T:
    """Build ``schema`` from defaults, then a YAML file, then ``key.sub=value`` overrides.

    A text field (``str`` or ``Optional[str]``: ``mixed_precision``, ``report_to``, ``run_name``, ...) takes its
    value literally, in the file and on the command line: ``mixed_precision=no`` is the word ``no``, not YAML's
    boolean false, and ``run_name=1e3`` stays ``1e3``. Other fields are read as YAML.
    """
    base = OmegaConf.structured(schema)
    try:
        if path is not None:
            base = OmegaConf.merge(base, _load_yaml_file(schema, Path(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
            for override in overrides:
                key, value = override.split("=", 1)
                hint = _field_type(schema, key.strip())
                if hint is not None and _is_text(hint):
                    base = OmegaConf.merge(base, _nested(key.strip(), _literal_text(value, optional=hint is not str)))
                else:
                    base = OmegaConf.merge(base, OmegaConf.from_dotlist([_parseable_override(override)]))
    except ConfigKeyError as e:
        raise ConfigError(f"unknown config key: {e.full_key!s} ({e.msg.splitlines()[0]})") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(str(e).splitlines()[0] + (f" (key: {key})" if key else "")) from None
    return OmegaConf.to_object(base)  # type: ignore[return-value]


def _field_type(schema: Any, dotted: str) -> Any:
    """The type hint of the field ``dotted`` (``data.decode``) of a config dataclass, or None when the path leaves
    the dataclasses (an unknown key, or a key inside a dict or list field)."""
    hint: Any = schema
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hints = typing.get_type_hints(hint)
        if part not in hints:
            return None
        hint = hints[part]
    return hint


def _is_text(hint: Any) -> bool:
    """True for ``str`` and ``Optional[str]``: fields whose values (enum words included) are taken literally."""
    if hint is str:
        return True
    args = typing.get_args(hint)
    return typing.get_origin(hint) is typing.Union and set(args) == {str, type(None)}


def _literal_text(value: str, *, optional: bool) -> Optional[str]:
    """An override's text as the field's value: surrounding quotes dropped; ``null``, ``~`` or nothing is None
    when the field allows it."""
    v = value.strip()
    if optional and v in ("null", "~", "None", ""):
        return None
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return v


def _nested(dotted: str, value: Any) -> Dict[str, Any]:
    """``{"a": {"b": value}}`` for ``a.b``."""
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _load_yaml_file(schema: Any, path: Path) -> Any:
    """A YAML config file as OmegaConf reads it, except that a text field keeps the words written in the file
    (``mixed_precision: no`` is ``"no"``, where YAML 1.1 would read false)."""
    loaded = OmegaConf.load(str(path))
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # OmegaConf read it: nothing to correct
        return loaded
    fixes: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    walk(v, f"{prefix}.{k.value}" if prefix else str(k.value))
        elif isinstance(node, yaml.ScalarNode) and node.style is None:
            fixes[prefix] = node.value  # plain (unquoted): YAML may have read it as a bool, number or null

    walk(root, "")
    for key, raw in fixes.items():
        hint = _field_type(schema, key)
        if hint is not None and _is_text(hint) and not (hint is not str and raw in ("null", "~", "")):
            OmegaConf.update(loaded, key, raw, merge=False)
    return loaded


def _split_list_items(inner: str) -> List[str]:
    """Split the inside of ``[a, b{1..3}, c]`` at commas outside braces and quotes."""
    items, depth, quote, cur = [], 0, "", ""
    for ch in inner:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        cur += ch
    items.append(cur)
    return [i.strip().strip("'\"") for i in items if i.strip()]


def _parseable_override(override: str) -> str:
    """``key=value`` as OmegaConf will parse it: a list whose items hold brace patterns
    (``data.shards=[/data/{00000..00059}.tar]``, which YAML reads as a broken mapping) gets its items quoted;
    any other value YAML cannot read is a :class:`ConfigError` saying how to quote it."""
    key, value = override.split("=", 1)
    try:
        yaml.safe_load(value)
        return override
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
    stripped = value.strip()
    if stripped.startswith("[") and stripped.endswith("]") and re.search(r"[{}]", stripped):
        return f"{key}={json.dumps(_split_list_items(stripped[1:-1]))}"
    raise ConfigError(
        f"override {override!r}: the value is not valid YAML ({problem}); quote it, e.g. "
        f"{key}=\"'...'\" for a string or {key}=\"['a', 'b']\" for a list"
    )


def config_from_dict(schema: type[T], data: Dict[str, Any]) -> T:
    """Rebuild a config dataclass from its ``to_dict`` form (checkpoints, exports)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def to_dict(cfg: Any) -> Dict[str, Any]:
    """JSON-serialisable dict of a config dataclass (tuples become lists)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = [
    "VisionConfig",
    "TextConfig",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "EvalHookConfig",
    "TrainConfig",
    "ConfigError",
    "load_config",
    "config_from_dict",
    "to_dict",
    "to_yaml",
]
