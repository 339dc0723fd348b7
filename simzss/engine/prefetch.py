"""Host batches to the device, one step ahead and without host syncs: the trainer's feed.

The trainer asks for batch ``n + 1`` right after it has *issued* step ``n`` (nothing in the step waits for the
GPU), so the copy below runs while the GPU still computes step ``n``:

- the host batch comes from the loader (pinned memory when CUDA is available); the time spent waiting for it is
  the loop's data wait (:attr:`DeviceFeed.wait_seconds`);
- an optional CPU transform runs on it (dynamic text padding);
- :func:`simzss.data.device.to_device` copies it non-blocking and normalises uint8 images on the device with the
  vision tower's mean/std. On CUDA this is issued on a side stream, and the compute stream waits for that stream
  before it uses the batch: the copy overlaps step ``n``'s kernels instead of queueing behind them. The batch's
  tensors are marked as used by the compute stream so the caching allocator does not hand their memory back to
  the side stream early.

On the CPU there is no stream: the batch is moved (a no-op) and normalised in place of the old in-worker float
conversion, the same numbers up to float rounding.

The loader is advanced only when the trainer asks for the next batch, after its checkpoint decision for the step
before, so a checkpoint's loader position never includes a batch that was fetched but not trained on.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from simzss.data.batch import Batch
from simzss.data.device import to_device


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    """The tensor fields of a :class:`Batch` (or of any dataclass of tensors)."""
    if dataclasses.is_dataclass(batch):
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            if isinstance(value, torch.Tensor):
                yield value


class DeviceFeed:
    """Iterates device batches made from a host loader's batches; measures the time spent waiting for them.

    ``mean``/``std``: the vision tower's input statistics (uint8 images are normalised with them on the device).
    ``transform``: an optional function applied to each host batch before the copy (e.g. dynamic padding).
    ``side_stream``: copy on a separate CUDA stream (ignored off CUDA).
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        transform: Optional[Callable[[Batch], Batch]] = None,
        side_stream: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        self.transform = transform
        use_stream = side_stream and self.device.type == "cuda" and torch.cuda.is_available()
        self.stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(self.device) if use_stream else None
        self.wait_seconds = 0.0  # total time blocked on the host loader
        self.batches = 0

    def to_device(self, host: Batch) -> Batch:
        """``host`` on the device (non-blocking; on CUDA via the side stream), ready for the compute stream."""
        if self.transform is not None:
            host = self.transform(host)
        if self.stream is None:
            return to_device(host, self.device, mean=self.mean, std=self.std, non_blocking=True)
        with torch.cuda.stream(self.stream):
            moved = to_device(host, self.device, mean=self.mean, std=self.std, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        for t in _tensors(moved):
            if t.device.type == "cuda":
                t.record_stream(compute)
        return moved

    def __call__(self, loader: Iterable[Batch]) -> Iterator[Batch]:
        """The device batches of one pass over ``loader``; the wait for each host batch is added to
        :attr:`wait_seconds`."""
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                host = next(it)
            except StopIteration:
                self.wait_seconds += time.perf_counter() - t0
                return
            self.wait_seconds += time.perf_counter() - t0
            self.batches += 1
            yield self.to_device(host)


__all__ = ["DeviceFeed"]
