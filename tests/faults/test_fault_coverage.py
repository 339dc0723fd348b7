"""Every sample is seen: uneven shards (3 + 200 samples), 2 or 3 data workers, no shuffle buffer."""

from __future__ import annotations

from collections import Counter

import pytest

from fault_helpers import write_uneven_shards
from simzss.concepts import ConceptBank
from simzss.config import DataConfig
from simzss.data.stream import build_train_loader


@pytest.fixture(scope="module", params=["sizes.json", "no sizes"])
def uneven(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """3 + 200 samples; with sizes.json (workers take contiguous ranges) or without (workers take blocks)."""
    from conftest import tiny_tokenizer

    root = tmp_path_factory.mktemp("uneven")
    shards = write_uneven_shards(root / "shards", [3, 200])
    extra = {}
    if request.param == "no sizes":
        (root / "shards" / "sizes.json").unlink()
        extra = {"num_samples": 203}
    return shards, tiny_tokenizer(root / "tok"), extra


@pytest.mark.parametrize("workers", [2, 3])
def test_each_epoch_covers_each_sample_once(uneven, workers: int) -> None:
    shards, tokenizer, extra = uneven
    batch = 8
    cfg = DataConfig(shards=shards, image_size=16, workers=workers, shuffle_buffer=0, **extra)
    loader = build_train_loader(cfg, tokenizer, ConceptBank.from_names(["cat"]), batch_size=batch, context_length=16)
    assert len(loader) == 203 // batch  # 25 batches: the partial last batch (3 samples) is dropped
    everything = {f"s0-{i:03d}" for i in range(3)} | {f"s1-{i:03d}" for i in range(200)}
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = Counter(key for b in loader for key in b.keys)
        assert max(seen.values()) == 1, [k for k, c in seen.items() if c > 1][:5]  # nothing twice
        assert set(seen) <= everything
        assert len(seen) == 25 * batch == len(everything) - 203 % batch  # only the partial last batch is missing


def test_resumed_epoch_still_covers_each_sample_once(uneven) -> None:
    """Stop mid-epoch (3 workers), resume in a new loader from the state: together, each sample once."""
    shards, tokenizer, extra = uneven
    cfg = DataConfig(shards=shards, image_size=16, workers=3, shuffle_buffer=0, **extra)

    def make():
        return build_train_loader(cfg, tokenizer, ConceptBank.from_names(["cat"]), batch_size=8, context_length=16)

    first = make()
    it = iter(first)
    keys = [k for _ in range(10) for k in next(it).keys]
    state = first.state_dict()
    del it, first
    second = make()
    second.load_state_dict(state)
    keys += [k for b in second for k in b.keys]
    assert len(keys) == len(set(keys)) == 200


def test_range_split_skips_whole_shards_unread() -> None:
    from simzss.data.sampling import drop_head, skip_shards_before

    shards = [{"url": u} for u in ("a", "b", "c", "a", "b", "c")]
    sizes = {"a": 3, "b": 200, "c": 10}
    head = [0]
    kept = list(skip_shards_before(iter(shards), sizes, start=205, head=head))
    assert [s["url"] for s in kept] == ["c", "a", "b", "c"] and head == [2]  # a and b never opened
    samples = iter(range(100))
    assert list(drop_head(samples, head))[:3] == [2, 3, 4]
    head = [0]
    assert [s["url"] for s in skip_shards_before(iter(shards), sizes, start=0, head=head)][0] == "a" and head == [0]


@pytest.mark.parametrize("world_size,workers", [(2, 1), (2, 2), (3, 2)])
def test_ranks_together_cover_each_sample_once(tmp_path, world_size: int, workers: int) -> None:
    """Several ranks over uneven shards (3 + 200) with sizes.json: each rank reads its own contiguous range of the
    epoch's sample sequence, so all ranks together see every sample once (less the dropped partial global batch),
    and every rank yields the same number of batches."""
    from conftest import tiny_tokenizer

    shards = write_uneven_shards(tmp_path / "shards", [3, 200])
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    batch = 8
    cfg = DataConfig(shards=shards, image_size=16, workers=workers, shuffle_buffer=0)
    everything = {f"s0-{i:03d}" for i in range(3)} | {f"s1-{i:03d}" for i in range(200)}
    for epoch in range(2):
        seen: Counter = Counter()
        for rank in range(world_size):
            loader = build_train_loader(cfg, tokenizer, ConceptBank.from_names(["cat"]), batch_size=batch,
                                        context_length=16, rank=rank, world_size=world_size)
            assert len(loader) == 203 // (batch * world_size)
            loader.set_epoch(epoch)
            keys = [key for b in loader for key in b.keys]
            assert len(keys) == len(loader) * batch
            seen.update(keys)
        assert max(seen.values()) == 1, [k for k, c in seen.items() if c > 1][:5]
        assert set(seen) <= everything and len(seen) == (203 // (batch * world_size)) * batch * world_size
