"""Shared helpers of the fault-injection suite: generated shards, a deterministic in-memory stream and
tiny trainer configs (random-init models, no download)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, List, Sequence

from PIL import Image

from conftest import VOCAB, MemoryStream
from conftest import tiny_overrides as conftest_tiny_overrides
from simzss.config import TrainConfig, load_config
from simzss.data.shards import write_shard, write_sizes

NO_CONCEPTS = json.dumps({"version": 1, "concepts": []}).encode()


def jpeg_bytes(size: int = 16, colour: tuple[int, int, int] = (120, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "JPEG")
    return buf.getvalue()


def write_uneven_shards(folder: Path, sizes: Sequence[int], *, concepts: bool = True) -> List[str]:
    """Shards ``folder/shard-N.tar`` with ``sizes[N]`` samples (keys ``sN-iii``: tiny JPEG, caption, and an
    empty concepts.json unless ``concepts`` is false) plus ``sizes.json``; returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    img = jpeg_bytes()
    paths = []
    for n, count in enumerate(sizes):
        samples = []
        for i in range(count):
            s = {"__key__": f"s{n}-{i:03d}", "jpg": img, "txt": f"a photo of a cat number {i}"}
            if concepts:
                s["concepts.json"] = NO_CONCEPTS
            samples.append(s)
        path = folder / f"shard-{n}.tar"
        write_shard(path, samples)
        paths.append(str(path))
    write_sizes(folder, {Path(p).name: c for p, c in zip(paths, sizes)})
    return paths


class TinyTokenizer:
    """What SimZSS.from_config needs from a tokenizer: a vocabulary size and a pad id."""

    pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB


def tiny_overrides(tmp_path: Path, *extra: str) -> List[str]:
    """:func:`conftest.tiny_overrides` keeping 5 checkpoints (the fault tests damage some of them)."""
    return conftest_tiny_overrides(tmp_path, "keep_checkpoints=5", *extra)


def tiny_cfg(tmp_path: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, tiny_overrides(tmp_path, *extra))


def use_memory_data(monkeypatch: Any, trainer_mod: Any, num_batches: int = 4) -> None:
    """Route the trainer to the tiny tokenizer and the in-memory stream."""
    monkeypatch.setattr(trainer_mod, "build_tokenizer", lambda cfg: TinyTokenizer())
    monkeypatch.setattr(
        trainer_mod, "build_loader",
        lambda cfg, tok, *, rank, world_size: MemoryStream(num_batches, cfg.batch_size, seed=cfg.seed),
    )
