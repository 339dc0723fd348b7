"""Process pools for the data jobs (``prepare``, ``shards``): one BLAS thread per worker, workers that exit with
their parent (even a SIGKILLed one), and SIGTERM turned into a clean stop of the pool."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, Optional, Sequence

#: Set for worker processes unless already set: they parallelise by process, so each gets one BLAS thread
#: (numpy's OpenBLAS would otherwise start one thread per core in every worker and oversubscribe the CPUs).
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class PoolInterrupted(RuntimeError):
    """SIGTERM reached the driver of a pool; the pool was stopped, finished outputs are kept."""


@contextlib.contextmanager
def worker_environment() -> Iterator[None]:
    """Temporarily add :data:`WORKER_ENV` to ``os.environ`` (only variables not set already)."""
    added = [k for k in WORKER_ENV if k not in os.environ]
    os.environ.update({k: WORKER_ENV[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Start a daemon thread that ends this worker as soon as its parent is gone (e.g. SIGKILLed): the
    worker is then re-parented, so ``os.getppid()`` changes. Without it pool workers run on forever."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                os._exit(1)  # its temp file is removed by the next run (dead pid in the name)

    threading.Thread(target=watch, name="simzss-parent-watchdog", daemon=True).start()


@contextlib.contextmanager
def sigterm_raises(exc_type: type[PoolInterrupted] = PoolInterrupted) -> Iterator[None]:
    """Turn SIGTERM into ``exc_type`` (main thread only), so that the pool is stopped and temporary files are
    removed instead of the driver vanishing and leaving its workers behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise exc_type("interrupted by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_pool(pool: ProcessPoolExecutor, timeout: float = 10.0) -> None:
    """Stop every worker now (terminate, then kill after ``timeout``) and shut the pool down."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def run_jobs(
    fn: Callable[..., Any],
    jobs: Sequence[Sequence[Any]],
    on_result: Callable[[Any], None],
    *,
    processes: int,
    initializer: Optional[Callable[..., None]] = None,
    initargs: Sequence[Any] = (),
    cleanup: Optional[Callable[[], None]] = None,
) -> None:
    """Run ``fn(*job)`` for every job and hand each result to ``on_result`` in this (the driver) process as it comes.

    With ``processes == 1`` the jobs run here, in order, after ``initializer(*initargs)``; otherwise in a pool of
    ``spawn`` workers (one BLAS thread each, see :func:`worker_environment`) set up by the same initializer. Any
    exception, a worker's included (SIGTERM too, under :func:`sigterm_raises`), stops the pool at once and calls
    ``cleanup`` (e.g. removing the stopped workers' temporary files) before it propagates.
    """
    if not jobs:
        return
    if processes == 1:
        if initializer is not None:
            initializer(*initargs)
        for job in jobs:
            on_result(fn(*job))
        return
    pool = ProcessPoolExecutor(min(processes, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=tuple(initargs))
    try:
        with worker_environment():  # workers start during submit() and copy the environment
            pending = {pool.submit(fn, *job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                on_result(fut.result())
    except BaseException:
        stop_pool(pool)
        if cleanup is not None:
            cleanup()
        raise
    pool.shutdown(wait=True)
