"""Issue 18 item 12: a resume with another batch size continues the epoch at the checkpoint's *sample*, not at its
batch number (which re-read or skipped part of the epoch), and still ends after the configured epochs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch

from conftest import MemoryStream, tiny_cfg
from simzss.engine import trainer as trainer_mod

torch.set_num_threads(1)

EPOCH = 48  # samples per epoch


class Tok:
    pad_token_id = 0

    def __len__(self) -> int:
        return 64


class SampleStream(MemoryStream):
    """An epoch of ``EPOCH`` numbered samples in order, batched by the configured batch size; records the keys
    it hands out."""

    def __init__(self, batch_size: int, seen: List[str]) -> None:
        super().__init__(EPOCH // batch_size, batch_size)
        self.seen = seen

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self.seen.extend(batch.keys)
            yield batch

    def _make(self, epoch: int, i: int) -> Any:
        import dataclasses

        batch = super()._make(epoch, i)
        return dataclasses.replace(batch, keys=[f"{epoch}:{i * self.batch_size + j}" for j in range(self.batch_size)])


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    keys: List[str] = []
    monkeypatch.setattr(trainer_mod, "build_tokenizer", lambda cfg: Tok())
    monkeypatch.setattr(trainer_mod, "build_loader",
                        lambda cfg, tok, *, rank, world_size: SampleStream(cfg.batch_size, keys))
    return keys


def _keys(epoch: int, start: int, stop: int) -> List[str]:
    return [f"{epoch}:{i}" for i in range(start, stop)]


@pytest.mark.parametrize("first_batch, first_steps, new_batch, resume_at", [
    (8, 4, 16, 32),   # 32 samples = 2 batches of 16: continues exactly at sample 32
    (16, 2, 8, 32),   # 32 samples = 4 batches of 8
    (8, 3, 16, 16),   # 24 samples: rounded down to a whole batch of 16 (8 samples read again, none skipped)
])
def test_resume_with_other_batch_size_continues_at_the_sample(
    tmp_path: Path, seen: List[str], caplog: pytest.LogCaptureFixture,
    first_batch: int, first_steps: int, new_batch: int, resume_at: int,
) -> None:
    common = ("run_name=rb", "epochs=2", "checkpoint_every=1", "keep_checkpoints=0", "optim.warmup=0")
    trainer_mod.train(tiny_cfg(tmp_path, *common, f"batch_size={first_batch}", f"max_steps={first_steps}"))
    ckpt = tmp_path / "runs" / "rb" / "checkpoints" / f"step-{first_steps:09d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["samples_in_epoch"] == first_steps * first_batch and state["global_batch"] == first_batch
    seen.clear()
    with caplog.at_level("WARNING", logger="simzss.engine.trainer"):
        result = trainer_mod.train(tiny_cfg(tmp_path, *common, f"batch_size={new_batch}", f"resume={ckpt}"))
    assert any(f"continues at sample {resume_at}" in r.getMessage() for r in caplog.records)
    # the rest of epoch 0 from the sample reached, then the whole of epoch 1, and nothing more
    assert seen == _keys(0, resume_at, EPOCH) + _keys(1, 0, EPOCH)
    per_epoch = EPOCH // new_batch
    assert result["step"] == first_steps + (EPOCH - resume_at) // new_batch + per_epoch
    assert result["epoch"] == pytest.approx(result["step"] / per_epoch)


def test_same_batch_size_resumes_by_batch_as_before(tmp_path: Path, seen: List[str]) -> None:
    common = ("run_name=same", "epochs=2", "checkpoint_every=1", "keep_checkpoints=0", "batch_size=8")
    trainer_mod.train(tiny_cfg(tmp_path, *common, "max_steps=4"))
    seen.clear()
    result = trainer_mod.train(tiny_cfg(tmp_path, *common, "resume=latest"))
    assert seen == _keys(0, 32, EPOCH) + _keys(1, 0, EPOCH) and result["step"] == 12


def test_sample_position_arithmetic() -> None:
    """The position rules on their own: 36 samples of the epoch consumed in batches of 12 continue at batch 4 of a
    batch of 8 (32 samples: 4 read again, none skipped); an older checkpoint without ``global_batch`` gives it as
    batch_size x world size; the planned steps finish the epochs from there."""
    from simzss.engine.epoch_position import loader_state_at, resume_position, steps_to_finish

    state = {"step": 7, "epoch": 1, "global_batch": 12, "samples_in_epoch": 36, "loader": {"batches_consumed": 3}}
    assert resume_position({}, 8, 15) is None  # not resuming
    assert resume_position(state, 12, 10) is None  # same global batch: the loader state as it is
    assert resume_position(state, 8, 15) == (12, 4)
    assert resume_position(state, 5, 4) == (12, 4)  # 36 // 5 = 7, capped at the epoch's 4 batches
    older = {"step": 7, "epoch": 1, "config": {"batch_size": 6}, "world_size": 2, "loader": {"batches_consumed": 3}}
    assert resume_position(older, 8, 15) == (12, 4)
    assert steps_to_finish(state, (12, 4), steps_per_epoch=15, epochs=3) == 7 + (15 - 4) + 15
    assert steps_to_finish(state, (12, 4), steps_per_epoch=15, epochs=1) == 7  # already past the last epoch
    moved = loader_state_at({"epoch": 1, "batches_consumed": 3, "skip_shift": 2, "num_batches": 10}, (12, 4), 15)
    assert moved == {"epoch": 1, "batches_consumed": 4, "skip_shift": 2, "num_batches": 15}
