"""Shared test helpers: a tiny tokenizer and a tiny model config (random init, no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from simzss.config import ModelConfig, TextConfig, VisionConfig

TINY_VISION = "vit_small_patch14_reg4_dinov2"
TINY_CAPTIONS = ("a photo of a cat on the grass", "a dog under a blue sky", "a red car on a road", "two birds in a tree")


def tiny_tokenizer(out_dir: Path, captions: Sequence[str] = TINY_CAPTIONS):
    """The project's own byte-level BPE, trained on a few captions and saved to ``out_dir``."""
    from simzss.data.tokenize import train_bpe_tokenizer

    return train_bpe_tokenizer(list(captions) * 4, out_dir, vocab_size=300, min_frequency=1)


def tiny_model_config(tokenizer_path: str, pretrained: bool = False) -> ModelConfig:
    """DINOv2-small layout cut to 2 blocks at 56 px, text 2 x 64: a SimZSS small enough for CPU tests."""
    return ModelConfig(
        vision=VisionConfig(name=TINY_VISION, pretrained=pretrained, model_kwargs={"img_size": 56, "depth": 2}),
        text=TextConfig(layers=2, width=64, heads=2, context_length=32),
        tokenizer=tokenizer_path,
    )
