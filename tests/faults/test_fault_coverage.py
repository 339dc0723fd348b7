"""Every sample is seen once per epoch: uneven and even shards, 1-3 ranks, 1-3 data workers, no shuffle buffer or
the shipped configs' (50-10,000); exact resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

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


SHIPPED = [(1, 1, 10000), (1, 3, 50), (2, 2, 1000), (3, 1, 5000), (3, 3, 500), (2, 3, 10000)]


@pytest.mark.parametrize("sizes", [[3, 200], [40, 40, 40, 40, 43]], ids=["uneven", "even"])
def test_shuffle_buffers_of_the_shipped_configs_see_every_sample_once(tmp_path, sizes) -> None:
    """Issue 18 item 1: with the shuffle buffers of the shipped configs (50-10,000, larger than the data here),
    1-3 ranks and 1-3 workers, each epoch covers every sample at most once and all but the dropped partial global
    batch exactly once: the buffer never reads past a rank's range."""
    from conftest import tiny_tokenizer

    shards = write_uneven_shards(tmp_path / "shards", sizes)
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    total, batch = sum(sizes), 8
    everything = {f"s{n}-{i:03d}" for n, c in enumerate(sizes) for i in range(c)}
    for world_size, workers, buffer in SHIPPED:
        cfg = DataConfig(shards=shards, image_size=16, workers=workers, shuffle_buffer=buffer)
        loaders = [build_train_loader(cfg, tokenizer, ConceptBank.from_names(["cat"]), batch_size=batch,
                                      context_length=16, rank=rank, world_size=world_size)
                   for rank in range(world_size)]
        orders = []
        for epoch in range(2):  # the second epoch comes from the same workers, already running ahead
            seen: Counter = Counter()
            order = []
            for loader in loaders:
                keys = [key for b in loader for key in b.keys]
                assert len(keys) == len(loader) * batch
                seen.update(keys)
                order += keys
            where = (world_size, workers, buffer, epoch)
            assert max(seen.values()) == 1, (where, [k for k, c in seen.items() if c > 1][:5])
            assert set(seen) <= everything
            assert len(seen) == (total // (batch * world_size)) * batch * world_size, where
            orders.append(order)
        assert orders[0] != orders[1] and orders[0][:20] != sorted(orders[0])[:20]  # shuffled, differently per epoch


def test_resume_continues_with_exactly_the_same_batches(tmp_path) -> None:
    """Exact resume with a shuffle buffer: a loader resumed mid-epoch (epoch 1, odd batch) yields exactly the
    remaining batches of the uninterrupted stream (keys, tokens and uint8 crops), with the same or another number of
    workers."""
    from conftest import tiny_tokenizer

    shards = write_uneven_shards(tmp_path / "shards", [3, 200])
    tokenizer = tiny_tokenizer(tmp_path / "tok")

    def make(workers: int):
        cfg = DataConfig(shards=shards, image_size=16, workers=workers, shuffle_buffer=1000, crop_scale=(0.3, 1.0))
        return build_train_loader(cfg, tokenizer, ConceptBank.from_names(["cat"]), batch_size=8, context_length=16,
                                  rank=1, world_size=2, seed=5)

    def contents(batches):
        return [(b.keys, b.input_ids, b.attention_mask, b.concept_labels, b.images) for b in batches]

    straight = make(2)
    list(straight)
    expected = contents(straight)  # epoch 1, 12 batches
    first = make(2)
    list(first)
    head = contents(b for _, b in zip(range(5), first))
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 5
    for workers in (2, 3, 0):
        resumed = make(workers)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)
        got = head + contents(resumed)
        assert len(got) == len(expected) == 12
        for a, b in zip(got, expected):
            assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
