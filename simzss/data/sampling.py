"""Which samples each rank and data worker reads: epoch sizes, the split of shards and samples across ranks and
worker roles, and the state shared with persistent workers (epoch, seed, resume offsets, role rotation)."""

from __future__ import annotations

import itertools
import multiprocessing
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import webdataset as wds
from webdataset.utils import make_seed

from simzss.data.shards import SIZES_FILE, local_shard_path, read_sizes



def count_samples(urls: Sequence[str]) -> int:
    """Number of samples in ``urls`` according to the ``sizes.json`` next to each shard."""
    tables: Dict[Path, Dict[str, int]] = {}  # folder -> its sizes.json
    total = 0
    unknown: List[str] = []
    for url in urls:
        path = local_shard_path(url)
        if path is None:
            raise ValueError(f"cannot size remote shard {url!r}: set data.num_samples")
        if path.parent not in tables:
            tables[path.parent] = read_sizes(path.parent)
        n = tables[path.parent].get(path.name)
        if n is None:
            unknown.append(url)
        else:
            total += n
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        folders = sorted({str(p.parent) for p in map(local_shard_path, unknown) if p is not None})
        raise ValueError(
            f"{len(unknown)} of {len(urls)} shard(s) have no entry in {SIZES_FILE} ({shown}); re-run the same "
            f"`simzss prepare ... --out {folders[0]}` command (finished shards are only counted, not redone) "
            "or set data.num_samples"
        )
    return total


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches every rank yields per epoch: ``num_samples // (batch_size * world_size)``."""
    return num_samples // (batch_size * world_size)


def worker_share(num_batches: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` of ``num_workers`` produces per epoch; the shares sum to ``num_batches``."""
    return num_batches // num_workers + int(worker < num_batches % num_workers)


def split_by_node(src: Iterable[Dict[str, Any]], rank: int, world_size: int) -> Iterator[Dict[str, Any]]:
    """Every ``world_size``-th shard from ``rank`` on (rank passed explicitly, never read from the env)."""
    return itertools.islice(src, rank, None, world_size)


def repeated_shards(urls: Sequence[str], seed: int) -> Iterator[Dict[str, Any]]:
    """The shard list repeated forever, each pass shuffled with its own seed (identical on every rank)."""
    for n in itertools.count():
        yield from wds.SimpleShardList(list(urls), seed=make_seed(seed, n))


def role_seed(rank: int, role: int) -> int:
    """Resampling seed of worker role ``role`` of ``rank`` (a role, not the DataLoader's worker id; see Resume)."""
    return rank * 1000 + role


def shard_sizes_of(urls: Sequence[str]) -> Optional[Dict[str, int]]:
    """``{url: samples}`` from the ``sizes.json`` next to each shard; None unless every shard is local and listed."""
    tables: Dict[Path, Dict[str, int]] = {}
    out: Dict[str, int] = {}
    for url in urls:
        path = local_shard_path(url)
        if path is None:
            return None
        if path.parent not in tables:
            try:
                tables[path.parent] = read_sizes(path.parent)
            except (OSError, ValueError):
                return None
        n = tables[path.parent].get(path.name)
        if n is None:
            return None
        out[url] = n
    return out


def skip_shards_before(
    src: Iterable[Dict[str, Any]], sizes: Dict[str, int], start: int, head: List[int]
) -> Iterator[Dict[str, Any]]:
    """Drop, unread, the shards that end before sample ``start`` of the stream; ``head[0]`` is set to the samples
    of the first kept shard that still lie before ``start`` (dropped by :func:`drop_head`)."""
    pos = 0
    it = iter(src)
    for shard in it:
        n = sizes.get(shard.get("url", ""))
        if n is not None and pos + n <= start:
            pos += n
            continue
        head[0] = start - pos
        yield shard
        break
    yield from it


def drop_head(src: Iterable[Dict[str, Any]], head: List[int]) -> Iterator[Dict[str, Any]]:
    """Drop the first ``head[0]`` samples (known once the first shard has been opened, i.e. after one sample)."""
    it = iter(src)
    first = next(it, None)
    if first is None:
        return
    if head[0] == 0:
        yield first
    else:
        for _ in itertools.islice(it, head[0] - 1):
            pass
    yield from it


def split_by_role(src: Iterable[Dict[str, Any]], role: int, num_workers: int) -> Iterator[Dict[str, Any]]:
    """Every ``num_workers``-th shard from ``role`` on (``wds.split_by_worker`` by role instead of worker id)."""
    return itertools.islice(src, role, None, num_workers)


def select_role_blocks(
    src: Iterable[Dict[str, Any]], role: int, num_workers: int, block: int
) -> Iterator[Dict[str, Any]]:
    """Raw samples of blocks ``role, role + num_workers, ...`` of ``block`` consecutive samples: the workers of a
    rank share its sample stream batch by batch, so that together they see every sample once."""
    period = block * num_workers
    for index, sample in enumerate(src):
        if (index % period) // block == role:
            yield sample


class SharedState:
    """Epoch, seed, per-role resume offsets and the role rotation in shared memory, so that persistent
    workers see updates.

    One per :class:`TrainLoader`; the loader writes it before each pass, every worker reads its role
    (:meth:`role`) and that role's row when its stream starts (:meth:`TrainStream.__iter__`).
    """

    _HEADER = 3  # epoch, seed, role offset

    def __init__(self, num_workers: int, epoch: int = 0, seed: int = 0) -> None:
        self.num_workers = max(1, num_workers)
        self._arr = multiprocessing.Array("q", self._HEADER + self.num_workers)
        self.set(epoch, seed, [0] * self.num_workers)

    def set(self, epoch: int, seed: int, skips: Sequence[int], offset: int = 0) -> None:
        """Publish the epoch, the stream seed, how many batches each role must skip (resume) and the
        rotation: DataLoader worker ``w`` plays role ``(w + offset) % num_workers``."""
        with self._arr.get_lock():
            self._arr[0], self._arr[1], self._arr[2] = int(epoch), int(seed), int(offset) % self.num_workers
            for i, s in enumerate(skips):
                self._arr[self._HEADER + i] = int(s)

    def role(self, worker: int) -> int:
        """The role (original worker index) DataLoader worker ``worker`` plays in this pass."""
        with self._arr.get_lock():
            return (worker + int(self._arr[2])) % self.num_workers

    def get(self, role: int) -> Tuple[int, int, int]:
        """(epoch, seed, batches to skip for worker role ``role``)."""
        with self._arr.get_lock():
            return int(self._arr[0]), int(self._arr[1]), int(self._arr[self._HEADER + role])
