"""Which samples each rank reads and in which order: epoch sizes, the split of an epoch's sample sequence across
ranks, the seeded shuffle buffer, how a rank's output positions are dealt to its data workers in small chunks, and
the start position shared with the workers."""

from __future__ import annotations

import itertools
import math
import multiprocessing
import random
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import webdataset as wds
from webdataset.utils import make_seed

from simzss.data.shards import SIZES_FILE, StaleSizesError, local_shard_path, read_sizes



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


def chunk_size(batch_size: int, workers: int) -> int:
    """Output positions per piece of work dealt to one data worker: a quarter of a batch or less (so the first batch
    comes from several workers at once, and shares stay even), at most 64 samples (so a worker hands back work
    often), and no smaller than needed (every piece costs the main process an exchange with a worker)."""
    return max(1, min(64, batch_size // max(1, min(workers, 4))))


def prefetch_pieces(batch_size: int, workers: int, chunk: int) -> int:
    """DataLoader ``prefetch_factor``: pieces queued per worker so that about two batches are always in flight."""
    return max(2, math.ceil(2 * batch_size / (max(1, workers) * chunk)))


T = TypeVar("T")


def buffered_shuffle(src: Iterable[T], size: int, seed: int) -> Iterator[T]:
    """The items of ``src`` reordered by a seeded shuffle buffer of ``size`` items (each item once).

    The buffer fills with the first ``size`` items; from then on each new item takes the place of a random one,
    which is emitted; at the end of ``src`` the rest is emitted in random order. Finite ``src``, finite output:
    nothing past the end of ``src`` is ever read. Deterministic in ``seed`` (``random.Random``, no torch RNG).
    """
    if size <= 1:
        yield from src
        return
    rng = random.Random(seed)
    buf: List[T] = []
    for item in src:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        out, buf[k] = buf[k], item
        yield out
    rng.shuffle(buf)
    yield from buf


def split_by_node(src: Iterable[Dict[str, Any]], rank: int, world_size: int) -> Iterator[Dict[str, Any]]:
    """Every ``world_size``-th shard from ``rank`` on (rank passed explicitly, never read from the env)."""
    return itertools.islice(src, rank, None, world_size)


def repeated_shards(urls: Sequence[str], seed: int) -> Iterator[Dict[str, Any]]:
    """The shard list repeated forever, each pass shuffled with its own seed (identical on every rank)."""
    for n in itertools.count():
        yield from wds.SimpleShardList(list(urls), seed=make_seed(seed, n))


def rank_seed(rank: int) -> int:
    """Resampling seed of rank ``rank`` (all of a rank's data workers read the same resampled stream)."""
    return rank * 1000


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
            except StaleSizesError:
                raise  # shards changed after sizes.json counted them: refuse, also with data.num_samples
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


class SharedState:
    """Epoch, seed and the start position of the next worker pass, in shared memory.

    One per :class:`~simzss.data.stream.TrainLoader`; the loader writes it before it starts its workers, each worker
    reads it when its stream starts (:meth:`~simzss.data.stream.TrainStream.__iter__`). The position counts output
    positions of the rank's endless sample sequence (``epoch * samples_per_epoch + position in the epoch``).
    """

    def __init__(self, num_workers: int, epoch: int = 0, seed: int = 0) -> None:
        self.num_workers = max(1, num_workers)
        self._arr = multiprocessing.Array("q", 3)
        self.set(epoch, seed, 0)

    def set(self, epoch: int, seed: int, position: int) -> None:
        """Publish the epoch, the stream seed and the first output position the workers must produce."""
        with self._arr.get_lock():
            self._arr[0], self._arr[1], self._arr[2] = int(epoch), int(seed), int(position)

    def get(self) -> Tuple[int, int, int]:
        """(epoch, seed, first output position)."""
        with self._arr.get_lock():
            return int(self._arr[0]), int(self._arr[1]), int(self._arr[2])
