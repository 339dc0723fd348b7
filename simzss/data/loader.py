"""The training loader of one rank: the data workers' :class:`Piece` s, in order, cut into :class:`Batch` es.

:class:`TrainLoader` runs a :class:`~simzss.data.stream.TrainStream` (or a subclass) in torch DataLoader workers,
keeps their pieces strictly in order, cuts exactly ``batch_size`` samples per batch (:meth:`Batch.cat`), carries
the skip counts, gives up on a stream that only skips, and holds the resume position (the output position of the
rank's next sample). Its workers outlive epoch boundaries; they ignore the stop signals, which the trainer handles.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import signal
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import make_seed

from simzss.data.batch import Batch
from simzss.data.sampling import prefetch_pieces

logger = logging.getLogger(__name__)


class TrainingDataError(RuntimeError):
    """The training data cannot feed the run (every shard empty or unreadable, every sample skipped); one line."""


@dataclass
class Piece:
    """A chunk of a rank's output positions as one worker produced it (positions count across epochs:
    ``epoch * samples_per_epoch + position in the epoch``)."""

    start: int  # first output position covered
    stop: int  # one past the last
    positions: List[int]  # output position of each row of ``batch`` (skipped positions are absent)
    batch: Optional[Batch]  # None when every sample of the chunk was skipped
    skipped: Dict[str, int] = field(default_factory=dict)  # when batch is None (else in batch.skipped)
    error: Optional[str] = None  # the worker's stream failed (TrainingDataError): raised again in the main process

    def packed(self) -> "Piece":
        """For the trip from a worker: the small token tensors as numpy arrays, pickled inline (a tensor would
        cost a shared-memory file descriptor each, several times the main process's time for these few bytes)."""
        if self.batch is None:
            return self
        small = {name: getattr(self.batch, name).numpy() for name in _INLINE_FIELDS}
        return dataclasses.replace(self, batch=dataclasses.replace(self.batch, **small))

    def unpacked(self) -> "Piece":
        """The inverse of :meth:`packed` (zero-copy); a piece made in-process passes unchanged."""
        if self.batch is None or isinstance(self.batch.input_ids, torch.Tensor):
            return self
        small = {name: torch.from_numpy(getattr(self.batch, name)) for name in _INLINE_FIELDS}
        return dataclasses.replace(self, batch=dataclasses.replace(self.batch, **small))


_INLINE_FIELDS = ("input_ids", "attention_mask", "concept_mask", "concept_labels")




def _identity(x: Piece) -> Piece:
    return x


def _close_at_exit(ref: "weakref.ReferenceType[TrainLoader]") -> None:
    loader = ref()
    if loader is not None:
        loader.close()


#: Every worker pass started here: (weak reference to torch's iterator, its worker processes).
_PASSES: List[Tuple["weakref.ReferenceType[Any]", List[Any]]] = []


def _end_abandoned_workers(*, at_exit: bool = False) -> None:
    """Kill the workers of passes whose iterator is gone (``at_exit``: of every pass) and that are still alive.

    torch ends a pass's workers from the iterator's ``__del__``: it sends each one a stop message, waits 5 s and
    then falls back on SIGTERM, which these workers ignore. When a loader dies inside a reference cycle (say, held
    by a caught exception's traceback), the garbage collector has already closed the iterator's queues by then,
    the stop message never arrives, and the workers would wait for it forever; at interpreter exit
    ``multiprocessing`` would then wait for them forever too. SIGKILL is safe for them: they only read.
    """
    keep = []
    for ref, workers in _PASSES:
        if ref() is not None and not at_exit:
            keep.append((ref, workers))
            continue
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)
    _PASSES[:] = keep


# Registered at import, after multiprocessing's own exit hook, so it runs before that hook waits for the workers
# (and after the per-loader hooks, registered later, that close live loaders in order).
atexit.register(_end_abandoned_workers, at_exit=True)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a SLURM allocation or ``taskset``), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def auto_workers(cores: int, processes: int) -> int:
    """``data.workers: auto``: the cores of each of the node's ``processes`` training processes, less two for the
    training loop and its pinning thread (less one on three cores or fewer, so two cores still get a worker)."""
    per_process = max(1, cores // max(1, processes))
    return per_process - 2 if per_process > 3 else per_process - 1


def resolve_workers(setting: int | str) -> int:
    """The number of data workers of ``data.workers`` (a number, or ``auto``: :func:`auto_workers` of this
    process's usable cores and the ``LOCAL_WORLD_SIZE`` that torchrun and ``accelerate launch`` set)."""
    if setting != "auto":
        return int(setting)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        processes = max(1, int(local))
    except ValueError:
        logger.warning("LOCAL_WORLD_SIZE=%r is not a number: data.workers=auto counts one process per node", local)
        processes = 1
    cores = usable_cores()
    workers = auto_workers(cores, processes)
    logger.info("data.workers=auto: %d per process (%d usable cores, %d training process(es) on this node)",
                workers, cores, processes)
    return workers


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: data workers ignore SIGTERM and SIGUSR1.

    SLURM and ``kill -- -PGID`` signal the whole process group. The main process turns these signals into a
    graceful stop (finish the step, checkpoint, exit); a worker killed by one would instead make torch raise
    "DataLoader worker ... is killed by signal" in the main process at any point of a step, before any checkpoint.
    Workers still end with the main process: :meth:`TrainLoader.close` shuts them down (also at interpreter exit,
    before ``multiprocessing`` would wait for them), and torch's watchdog ends a worker whose parent is gone.
    """
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class TrainLoader:
    """Iterable of :class:`Batch`; ``len()`` batches per epoch, identical on every rank.

    Iterating runs (the rest of) the current epoch; when an epoch is exhausted the loader moves on to
    the next one by itself, with the same workers (they are already producing it). ``set_epoch(e)`` selects
    epoch ``e`` (from its start, unless ``e`` is the current epoch, so that a resumed mid-epoch position
    survives the trainer's usual ``set_epoch``). Batches hold uint8 images (or encoded JPEGs); move them with
    :func:`simzss.data.device.to_device`. With CUDA available they come in pinned memory.

    ``dataset``: a :class:`simzss.data.stream.TrainStream` (or a subclass), which holds its
    :class:`~simzss.data.sampling.SharedState`.
    """

    def __init__(self, dataset: IterableDataset, *, num_samples: int, num_workers: int, seed: int) -> None:
        self.dataset = dataset
        self.num_samples = num_samples
        self.num_batches = dataset.num_batches
        self.batch_size = dataset.batch_size
        self.per_epoch = dataset.samples_per_epoch
        self.num_workers = num_workers
        self.seed = seed
        self.epoch = 0
        self._consumed = 0  # batches of the current epoch handed out
        self._position = 0  # output position of the next sample (counts across epochs)
        self._skip_limit = max(1000, self.per_epoch)
        self._pieces: Optional[Iterator[Piece]] = None  # the live worker pass
        self._head: Optional[Piece] = None  # the piece being consumed
        self._row = 0  # next row of _head
        self._pin = torch.cuda.is_available()
        self._pad_id = int(getattr(dataset.tokenizer, "pad_token_id", 0) or 0)
        self._carry: Counter[str] = Counter()  # skip counts for the batch being assembled
        self._closes_at_exit = False
        generator = torch.Generator()
        generator.manual_seed(make_seed(seed, dataset.rank))  # worker base seeds (crops are seeded per sample)
        extra: Dict[str, Any] = {}
        if num_workers > 0:
            extra["prefetch_factor"] = prefetch_pieces(dataset.batch_size, num_workers, dataset.chunk)
            extra["worker_init_fn"] = _leave_stop_signals_to_the_main_process
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_identity,
            num_workers=num_workers,
            generator=generator,
            **extra,
        )

    @property
    def batches_consumed(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._consumed

    def __len__(self) -> int:
        return self.num_batches

    def close(self) -> None:
        """Stop the data workers now, in order (each finishes its piece and exits); the next batch starts new ones at
        the current position, so nothing is lost or repeated."""
        self._restart(self._position)

    def _restart(self, position: int) -> None:
        """End the current worker pass; the next batch starts a new one at output position ``position``."""
        pieces = self._pieces
        self._pieces, self._head, self._row = None, None, 0
        self._position = position
        shutdown = getattr(pieces, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``; restarts it from its first batch unless it is already the current epoch."""
        if epoch != self.epoch:
            self.epoch, self._consumed = int(epoch), 0
            self._restart(self.epoch * self.per_epoch)

    def __iter__(self) -> Iterator[Batch]:
        while self._consumed < self.num_batches:
            batch = self._next_batch()
            self._consumed += 1
            yield batch
        self.epoch += 1
        self._consumed = 0

    def _next_piece(self) -> Piece:
        if self._pieces is None:
            self.dataset.state.set(self.epoch, self.seed, self._position)
            _end_abandoned_workers()
            self._pieces = iter(self.loader)
            workers = list(getattr(self._pieces, "_workers", []))
            if workers:
                _PASSES.append((weakref.ref(self._pieces), workers))
            if self.num_workers > 0 and not self._closes_at_exit:
                # registered after multiprocessing's own exit hook, so it runs first: the workers ignore SIGTERM,
                # which is how multiprocessing would end them
                atexit.register(_close_at_exit, weakref.ref(self))
                self._closes_at_exit = True
        idle = 0
        while True:
            try:
                piece = next(self._pieces).unpacked()
            except StopIteration:
                raise TrainingDataError("the training stream ended unexpectedly") from None
            if piece.error is not None:
                raise TrainingDataError(piece.error)
            if piece.batch is not None:
                return piece
            # a chunk whose samples were all skipped: hand its counts on, and give up on a stream that only skips
            idle += piece.stop - piece.start
            self._carry.update(piece.skipped)
            if idle >= self._skip_limit:
                raise TrainingDataError(
                    f"{idle} training samples in a row were skipped (reasons: {dict(self._carry)}); check "
                    "data.shards, data.image_size and the warnings above"
                )

    def _next_batch(self) -> Batch:
        parts: List[Batch] = []
        self._carry: Counter[str] = Counter()
        need = self.batch_size
        while need:
            if self._head is None or self._row >= len(self._head.positions):
                self._head, self._row = self._next_piece(), 0
                assert self._head.batch is not None
                self._carry.update(self._head.batch.skipped)
            head, row = self._head, self._row
            rows = head.positions
            if rows[row] < self._position:  # already consumed before a restart at this position
                self._row += 1
                continue
            take = min(need, len(rows) - row)
            parts.append(head.batch.rows(row, row + take))  # type: ignore[union-attr]
            self._row += take
            need -= take
            self._position = head.stop if self._row == len(rows) else rows[self._row - 1] + 1
        batch = Batch.cat(parts, self._pad_id, pin_memory=self._pin)
        batch.skipped = dict(self._carry)
        return batch

    def state_dict(self) -> Dict[str, Any]:
        """Resume position: epoch, batches consumed in it, how far skipped samples moved the sample sequence
        (``skip_shift``) and the stream seed."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self._consumed,
            "skip_shift": self._position - self.epoch * self.per_epoch - self._consumed * self.batch_size,
            "num_batches": self.num_batches,
            "seed": self.seed,
            "resampled": bool(self.dataset.cfg.resampled),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: same epoch, same stream seed, consumed samples skipped."""
        try:
            epoch, consumed, seed = int(state["epoch"]), int(state["batches_consumed"]), int(state["seed"])
            shift = int(state.get("skip_shift", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid TrainLoader state {state!r}") from exc
        if state.get("num_batches", self.num_batches) != self.num_batches:
            logger.warning(
                "epoch size changed since the checkpoint (%s -> %d batches); resuming by batch count",
                state.get("num_batches"),
                self.num_batches,
            )
        if "worker_batches" in state and "skip_shift" not in state and consumed:
            logger.warning("the checkpoint was written by an older version of the training stream; the rest of "
                           "epoch %d is approximate (%d batches skipped)", epoch, consumed)
        consumed = max(0, min(consumed, self.num_batches))
        self.epoch, self.seed, self._consumed = epoch, seed, consumed
        self._restart(epoch * self.per_epoch + consumed * self.batch_size + max(0, shift))


__all__ = ["Piece", "TrainLoader", "TrainingDataError", "auto_workers", "resolve_workers", "usable_cores"]
