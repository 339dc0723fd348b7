"""Shared test helpers: a tiny tokenizer, a tiny model config (random init, no download) and an in-memory stand-in
for the training loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import pytest
import torch

from simzss import logs
from simzss.config import ModelConfig, TextConfig, TrainConfig, VisionConfig, load_config
from simzss.data.batch import Batch

TINY_VISION = "vit_small_patch14_reg4_dinov2"
VOCAB = 64  # token ids of MemoryStream batches
CLASSES = 4  # concept classes of MemoryStream batches
TINY_CAPTIONS = ("a photo of a cat on the grass", "a dog under a blue sky", "a red car on a road", "two birds in a tree")


@pytest.fixture(autouse=True)
def _progress_setting_per_test() -> Iterator[None]:
    """A command run in-process with ``--no-progress`` turns progress off for the whole process (as it should for a
    command); each test starts from the default instead of from the last such command of an earlier test."""
    saved = logs._progress_enabled
    yield
    logs._progress_enabled = saved


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


class MemoryStream:
    """A deterministic stand-in for ``TrainLoader``: batch (epoch, i) is always the same tensors.

    Follows the TrainLoader contract: ``set_epoch`` restarts only a different epoch, the state is
    the epoch and the batches consumed.
    """

    def __init__(self, num_batches: int, batch_size: int, image_size: int = 28, seed: int = 0) -> None:
        self.num_batches, self.batch_size, self.image_size, self.seed = num_batches, batch_size, image_size, seed
        self.epoch, self.consumed = 0, 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batches_consumed": self.consumed}

    def load_state_dict(self, d: Dict[str, int]) -> None:
        self.epoch, self.consumed = int(d["epoch"]), int(d["batches_consumed"])

    def __iter__(self) -> Iterator[Any]:
        while self.consumed < self.num_batches:
            batch = self._make(self.epoch, self.consumed)
            self.consumed += 1
            yield batch

    def _make(self, epoch: int, i: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch * 1009 + i)
        b, length, k = self.batch_size, 8, 2
        labels = torch.randint(0, CLASSES, (b, k), generator=g)
        # Images carry their concepts (a class-dependent colour per half), so the concept loss can learn.
        images = 0.3 * torch.randn(b, 3, self.image_size, self.image_size, generator=g)
        colours = torch.linspace(-1.5, 1.5, CLASSES)
        half = self.image_size // 2
        images[:, 0, :half] += colours[labels[:, 0]].view(b, 1, 1)
        images[:, 1, half:] += colours[labels[:, 1]].view(b, 1, 1)
        ids = torch.randint(3, VOCAB, (b, length), generator=g)
        ids[:, 1] = 3 + labels[:, 0]  # the concept words are the class tokens
        ids[:, 3] = 3 + labels[:, 1]
        ids[:, -1] = 2  # "eos"
        concept_mask = torch.zeros(b, k, length, dtype=torch.bool)
        concept_mask[:, 0, 1] = True
        concept_mask[:, 1, 3] = True
        return Batch(
            images=images, input_ids=ids, attention_mask=torch.ones(b, length, dtype=torch.long),
            concept_mask=concept_mask, concept_labels=labels, captions=[""] * b,
            keys=[f"{epoch}-{i}-{j}" for j in range(b)], skipped={"corrupt_image": 1} if i == 0 else {},
        )


def tiny_overrides(tmp_path: Path, *extra: str) -> List[str]:
    """Train overrides of a ~1 s/step-or-less random-init SimZSS (ViT-S/14 cut to 2 blocks at 28 px, text 2 x 64);
    ``extra`` come last and win."""
    return [
        f"output_dir={tmp_path / 'runs'}", "run_name=t", "batch_size=8", "epochs=2", "log_every=1",
        "checkpoint_every=0", "keep_checkpoints=2", "data.shards=[unused.tar]",
        "model.vision.name=vit_small_patch14_reg4_dinov2", "model.vision.pretrained=false",
        "model.vision.model_kwargs={depth: 2, img_size: 28}",
        "model.text.layers=2", "model.text.width=64", "model.text.heads=2", "model.text.context_length=8",
        "model.tokenizer=unused", "optim.lr=1e-3", "optim.scale_lr=false", "optim.warmup=0.2",
        *extra,
    ]


def tiny_cfg(tmp_path: Path, *extra: str) -> TrainConfig:
    """The config of :func:`tiny_overrides`; every field stays overridable."""
    return load_config(TrainConfig, None, tiny_overrides(tmp_path, *extra))
