"""Concept annotation of image-caption shards (``simzss prepare``): the caption concepts of every sample.

For every input shard ``.../NAME.tar`` this writes ``OUT/NAME.tar`` with the same samples plus
``KEY.concepts.json`` (``{"version": 1, "concepts": [Concept.to_json(), ...]}``, every noun-chunk
concept, in-bank or not) and keeps ``OUT/sizes.json`` up to date. Shards are processed in parallel,
one spaCy pipeline per process. The run is resumable and crash-safe: output shards appear only
complete (temp file + rename), an existing output shard is kept only if ``OUT/fingerprints.json`` says
it was made from its input as that is now (size and mtime) with the same settings (else it is redone),
and stale temp files of killed runs are removed. A truncated input keeps the samples completed before
the cut (reported as truncated); sample keys repeated across shards are counted and reported. Bad
samples are dropped and counted by reason (one bad sample never costs more than itself); output samples
hold only the members this package understands (caption, image, ``.json`` metadata, concepts) under safe
names; unreadable and truncated shards are reported and make the command exit non-zero. ``sizes.json``
is updated under a file lock, so several runs may write one folder. Worker processes exit by themselves
when the driver dies (SIGKILL), and SIGTERM / Ctrl-C stop the pool and leave no temporary files. The
command (``simzss prepare``) is :mod:`simzss.cli.prepare`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from simzss.concepts import ConceptBank, ConceptExtractor
from simzss.data.outputs import (
    drop_stale_outputs, plan_outputs, problems_summary, stale_outputs, writable_folder,
)
from simzss.data.pool import PoolInterrupted, exit_with_parent, sigterm_raises, stop_pool, worker_environment
from simzss.data.shard_index import index_kept_shard, index_new_shard
from simzss.data.shards import (
    IMAGE_EXTENSIONS,
    MAX_CAPTION_CHARS,
    ShardReadError,
    clean_stale_temps,
    iter_samples,
    read_fingerprints,
    reuse_problem,
    shard_keys,
    source_fingerprint,
    update_sizes,
    write_one_of_many,
)
from simzss.logs import progress as progress_bar, setup_logging

log = logging.getLogger(__name__)

CONCEPTS_EXT = "concepts.json"
CONCEPTS_VERSION = 1
#: Reasons a sample is dropped, in the order they are checked.
SKIP_REASONS = ("duplicate_key", "missing_caption", "non_utf8_caption", "empty_caption", "caption_too_long",
                "missing_image", "annotation_error")
#: Members copied to the output (besides the regenerated ``concepts.json``); anything else is dropped and counted.
KEPT_EXTENSIONS = ("txt", "json", *IMAGE_EXTENSIONS)


class PrepareInterrupted(PoolInterrupted):
    """SIGTERM reached ``prepare_shards``; the pool was stopped, finished shards are kept."""


@dataclass
class ShardResult:
    """What happened to one input shard."""

    shard: str  # input path
    output: str
    status: str  # done | skipped | failed
    samples: int = 0  # samples in the output shard
    truncated: str | None = None  # the input ended mid-way (this reason); its complete samples were written
    skipped: Counter[str] = field(default_factory=Counter)  # dropped samples by reason
    dropped_members: Counter[str] = field(default_factory=Counter)  # members iter_samples left out
    captions: int = 0  # captions annotated in this run
    concepts: int = 0
    with_in_bank: int = 0  # captions with at least one in-bank concept
    seconds: float = 0.0  # processing time in the worker (spaCy loading excluded)
    cpu_seconds: float = 0.0  # CPU time of the same (robust to other load on the machine)
    error: str | None = None
    key_hashes: bytes = b""  # 64-bit hashes of the written keys (uint64), to count keys repeated across shards


# ------------------------------------------------------------------------------------------------
# worker side (top-level functions and module state, so that 'spawn' workers can run them)

_STATE: dict[str, Any] = {}


def _init_worker(spacy_model: str, batch_size: int, bank: "ConceptBank", fast_spacy: bool = True,
                 lowercase: bool = False) -> None:
    """Load the spaCy pipeline once per process (a warm-up call forces it) and keep the bank."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        exit_with_parent(parent.pid)
    if parent is not None and not logging.getLogger().handlers:
        setup_logging(logging.WARNING)
    extractor = ConceptExtractor(spacy_model, batch_size=batch_size, numpy_gemm=fast_spacy, lowercase=lowercase)
    extractor(["a warm-up caption"])
    _STATE.update(extractor=extractor, bank=bank, batch_size=batch_size)


def _run_shard(src: str, dst: str) -> ShardResult:
    return process_shard(src, dst, _STATE["extractor"], _STATE["bank"], _STATE["batch_size"])


def _unreachable_names() -> list[str]:
    """Bank names no extracted concept can equal, parsed with this worker's already loaded pipeline."""
    return _STATE["bank"].multiword_unreachable(_STATE["extractor"])


def key_hash(key: str) -> int:
    """A 64-bit hash of a sample key (stable across processes and runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _written_key_hashes(shard: Path) -> bytes:
    """:func:`key_hash` of every sample key of an output shard (from its tar headers: :func:`shard_keys`), so that
    a rerun that keeps the shard still counts keys repeated across shards."""
    try:
        keys = dict.fromkeys(shard_keys(shard))
    except ShardReadError as e:  # its fingerprint matched, so this is unexpected: counted without it
        log.warning("%s: cannot list its keys (%s); not counted for duplicate keys", shard, e)
        keys = {}
    return np.asarray([key_hash(k) for k in keys], dtype=np.uint64).tobytes()


def _check_sample(sample: dict[str, Any], seen: set[str]) -> tuple[str | None, str | None]:
    """(reason to drop the sample or None, decoded caption)."""
    key = sample["__key__"]
    if key in seen:
        return "duplicate_key", None
    seen.add(key)
    raw = sample.get("txt")
    if raw is None:
        return "missing_caption", None
    try:
        caption = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "non_utf8_caption", None
    if not caption.strip():
        return "empty_caption", None
    if len(caption) > MAX_CAPTION_CHARS:
        return "caption_too_long", None
    if not any(ext in sample for ext in IMAGE_EXTENSIONS):
        return "missing_image", None
    return None, caption


def _kept_members(sample: dict[str, Any], dropped: Counter[str]) -> dict[str, Any]:
    """The members of ``sample`` the output keeps (:data:`KEPT_EXTENSIONS`; ``json`` only when valid UTF-8
    JSON); the others are counted in ``dropped`` (``unknown_member`` / ``bad_json``)."""
    out: dict[str, Any] = {"__key__": sample["__key__"]}
    for ext, value in sample.items():
        if ext.startswith("__") or ext == CONCEPTS_EXT:
            continue
        if ext not in KEPT_EXTENSIONS:
            dropped["unknown_member"] += 1
            continue
        if ext == "json":
            try:
                json.loads(value.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                dropped["bad_json"] += 1
                continue
        out[ext] = value
    return out


def _annotate(extractor: "ConceptExtractor", captions: list[str]) -> list[Any]:
    """Concepts of each caption; a caption spaCy fails on gives None (the batch is retried one by one)."""
    try:
        return list(extractor(captions))
    except Exception:  # noqa: BLE001 - one caption must not cost the batch; each failure is logged below
        found: list[Any] = []
        for caption in captions:
            try:
                found.extend(extractor([caption]))
            except Exception as e:  # noqa: BLE001
                log.warning("concept extraction failed on a caption (%s: %s); sample skipped",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                found.append(None)
        return found


def process_shard(src: str, dst: str, extractor: "ConceptExtractor", bank: "ConceptBank", batch_size: int = 256) -> ShardResult:
    """Annotate one shard: read ``src``, drop bad samples (counted), write ``dst`` atomically.

    Images are passed through undecoded. A shard cut short (truncated, damaged mid-way) keeps the samples
    completed before the damage: they are written and the result says ``truncated``; a shard with no complete
    sample at all gives a failed result and no ``dst``. The caption bytes are kept as they are, so concept spans
    index the ``KEY.txt`` text exactly.
    """
    res = ShardResult(shard=src, output=dst, status="done")
    seen: set[str] = set()
    hashes: list[int] = []
    t0, c0 = time.perf_counter(), time.process_time()

    def valid() -> Iterator[tuple[dict[str, Any], str]]:
        try:
            for sample in iter_samples(src, dropped=res.dropped_members):
                reason, caption = _check_sample(sample, seen)
                if reason is not None:
                    res.skipped[reason] += 1
                    log.debug("%s: dropping sample %r: %s", src, sample["__key__"], reason)
                    continue
                yield sample, caption  # type: ignore[misc]
        except ShardReadError as e:
            if e.samples_read == 0:
                raise  # nothing usable: no output
            res.truncated = e.reason
            log.warning("%s: %s; keeping the %d complete sample(s) before the damage", src, e.reason, e.samples_read)

    def annotated() -> Iterator[dict[str, Any]]:
        it = valid()
        while chunk := list(islice(it, batch_size)):
            for (sample, _), concepts in zip(chunk, _annotate(extractor, [c for _, c in chunk])):
                if concepts is None:
                    res.skipped["annotation_error"] += 1
                    continue
                res.captions += 1
                res.concepts += len(concepts)
                res.with_in_bank += any(bank.lookup(c.concept) is not None for c in concepts)
                payload = {"version": CONCEPTS_VERSION, "concepts": [c.to_json() for c in concepts]}
                out = _kept_members(sample, res.dropped_members)
                out[CONCEPTS_EXT] = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                hashes.append(key_hash(sample["__key__"]))
                yield out

    res.samples, res.error = write_one_of_many(dst, annotated(), src)
    if res.error is not None:
        res.status = "failed"
    else:
        index_new_shard(dst)
    res.seconds = time.perf_counter() - t0
    res.cpu_seconds = time.process_time() - c0
    res.key_hashes = np.asarray(hashes, dtype=np.uint64).tobytes() if res.status == "done" else b""
    if res.skipped:
        log.warning("%s: dropped %d sample(s): %s", src, sum(res.skipped.values()), dict(res.skipped))
    if res.status == "failed":
        log.error("%s: shard failed, no output written: %s", src, res.error)
    return res


# ------------------------------------------------------------------------------------------------
# driver


#: The (input shard, output path) pairs of a run, checked before anything is loaded (see :func:`plan_outputs`).
plan_shards = plan_outputs


def prepare_shards(
    inputs: str | Sequence[str],
    out_dir: str | os.PathLike[str],
    processes: int = 1,
    spacy_model: str = "en_core_web_sm",
    batch_size: int = 256,
    bank: "ConceptBank | None" = None,
    overwrite: bool = False,
    progress: bool = True,
    fast_spacy: bool = True,
    lowercase: bool = False,
) -> dict[str, Any]:
    """Annotate shards with concepts into ``out_dir``; return the run summary (see ``simzss prepare``).

    ``inputs``: paths, brace patterns, globs or folders (``::``-separated lists allowed); all are checked before
    anything is loaded or written. ``bank`` (default: the built-in evaluation vocabulary) only feeds the in-bank
    statistics; all concepts are stored. An existing output shard is kept only when ``fingerprints.json`` says it
    was made from its input as that is now (size and mtime), with the same spaCy model and casing, and the
    output itself is unchanged; otherwise it is redone (logged). Output shards outside ``inputs`` made from an
    input of the same folder that is gone or changed (:func:`simzss.data.outputs.stale_outputs`) are refused with a
    ``ValueError`` naming ``--overwrite``; ``overwrite`` removes them and redoes every shard.
    ``fast_spacy`` runs spaCy's matrix products through numpy's BLAS (:func:`simzss.concepts.load_spacy`,
    ``numpy_gemm``; ``False``: spaCy's BLIS). Worker processes get one BLAS thread each (unless
    ``OPENBLAS_NUM_THREADS`` etc. are set); with ``processes=1`` the work runs in this process, with its BLAS
    settings. Raises ``ValueError`` on bad arguments, ``FileNotFoundError`` for missing inputs and
    ``PermissionError`` for an output folder that cannot be written.
    """
    if processes < 1 or batch_size < 1:
        raise ValueError(f"processes and batch_size must be >= 1, got {processes}, {batch_size}")
    out = Path(out_dir)
    plan = plan_shards(inputs, out)  # before the output folder is made: a typo leaves nothing behind
    writable_folder(out)
    if bank is None:
        bank = ConceptBank.default(report_unreachable=False)  # reported once, parsed with spaCy, at the end
    clean_stale_temps(out)
    stale_removed = drop_stale_outputs(out, plan, overwrite)
    sizes = update_sizes(out, keep=lambda name: (out / name).is_file())  # forget shards deleted since
    records = read_fingerprints(out)
    made_with = {"spacy_model": spacy_model, "lowercase": lowercase}

    t0 = time.perf_counter()
    results: list[ShardResult] = []
    todo: list[tuple[str, Path]] = []
    redo: Counter[str] = Counter()
    for src, dst in plan:
        if dst.exists() and not overwrite:
            why = reuse_problem(src, dst, records.get(dst.name), made_with, sizes)
            if why is None:
                record = records[dst.name]
                results.append(ShardResult(shard=src, output=str(dst), status="skipped", samples=sizes[dst.name],
                                           truncated=record.get("truncated"), key_hashes=_written_key_hashes(dst)))
                index_kept_shard(dst)
                continue
            redo[why] += 1
            log.debug("%s: redoing %s: %s", src, dst, why)
        todo.append((src, dst))
    if redo:
        log.warning("%d existing output shard(s) are redone: %s", sum(redo.values()),
                    ", ".join(f"{n} because {why}" for why, n in redo.items()))
    log.info("%d shard(s): %d to do, %d already done", len(plan), len(todo), len(plan) - len(todo))

    def finished(res: ShardResult, bar: Any) -> None:
        results.append(res)
        if res.status == "done":
            extra = {"source": source_fingerprint(res.shard), "made_with": made_with}
            if res.truncated:
                extra["truncated"] = res.truncated
            update_sizes(out, {Path(res.output).name: res.samples}, extra={Path(res.output).name: extra})
        bar.update(1)
        bar.set_postfix(captions=sum(r.captions for r in results), failed=sum(r.status == "failed" for r in results))

    unreachable: list[str] | None = None
    t_work = time.perf_counter()
    with progress_bar(total=len(todo), unit="shard", desc="prepare", enabled=progress and bool(todo)) as bar, \
            sigterm_raises(PrepareInterrupted):
        if todo and processes == 1:
            _init_worker(spacy_model, batch_size, bank, fast_spacy, lowercase)
            for src, dst in todo:
                finished(_run_shard(src, str(dst)), bar)
            unreachable = _unreachable_names()
        elif todo:
            ctx = multiprocessing.get_context("spawn")
            workers = min(processes, len(todo))
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(spacy_model, batch_size, bank, fast_spacy, lowercase))
            try:
                with worker_environment():  # workers start during submit() and copy the environment
                    pending: dict[Future[Any], tuple[str, Path]] = {
                        pool.submit(_run_shard, src, str(dst)): (src, dst) for src, dst in todo
                    }
                    # parsed by a worker whose pipeline is loaded anyway: the driver never loads spaCy
                    names_future = pool.submit(_unreachable_names)
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        pending.pop(fut)
                        try:
                            res = fut.result()
                        except BrokenProcessPool as e:
                            raise RuntimeError(
                                "prepare worker processes died (see the errors above; is the spaCy model "
                                f"{spacy_model!r} installed?)"
                            ) from e
                        finished(res, bar)
                unreachable = names_future.result()
            except BaseException:
                stop_pool(pool)
                clean_stale_temps(out)  # the stopped workers' unfinished shards
                raise
            pool.shutdown(wait=True)
    work_seconds = time.perf_counter() - t_work
    summary = _summary(results, plan, out, processes, time.perf_counter() - t0, work_seconds)
    summary["shards_redone"] = sum(redo.values())
    summary["stale_shards_removed"] = stale_removed
    summary["fast_spacy"] = fast_spacy
    summary["lowercase"] = lowercase
    summary["unreachable_bank_names"] = unreachable
    if unreachable:
        log.warning("%d of %d concept-bank names can never match an extracted concept (never trained): %s",
                    len(unreachable), len(bank), ", ".join(unreachable))
    _report_duplicates(summary, results)
    return summary


def _report_duplicates(summary: dict[str, Any], results: list[ShardResult]) -> None:
    """Count the keys of the output shards (written in this run or kept from an earlier one) that an earlier shard
    (in input order) also holds; both copies are kept (a key is only a name: two datasets may number their samples
    alike), the count is reported and logged."""
    arrays = [np.frombuffer(r.key_hashes, dtype=np.uint64) for r in results]
    summary["duplicate_keys_across_shards"] = 0
    summary["shards_with_duplicate_keys"] = []
    if sum(a.size for a in arrays) == 0:
        return
    hashes = np.concatenate(arrays)
    owner = np.repeat(np.arange(len(arrays)), [a.size for a in arrays])
    _, first = np.unique(hashes, return_index=True)
    repeated = np.ones(hashes.size, dtype=bool)
    repeated[first] = False
    if not repeated.any():
        return
    shards = sorted({results[i].shard for i in np.unique(owner[repeated])})
    summary["duplicate_keys_across_shards"] = int(repeated.sum())
    summary["shards_with_duplicate_keys"] = shards
    log.warning("%d sample key(s) repeat a key of an earlier shard (both copies kept; keys are only names) in: %s",
                int(repeated.sum()),
                ", ".join(shards[:5]) + (f" and {len(shards) - 5} more" if len(shards) > 5 else ""))


def _summary(results: list[ShardResult], plan: list[tuple[str, Path]], out: Path, processes: int,
             seconds: float, work_seconds: float) -> dict[str, Any]:
    order = {src: i for i, (src, _) in enumerate(plan)}
    results.sort(key=lambda r: order[r.shard])
    by = Counter(r.status for r in results)
    skipped: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for r in results:
        skipped.update(r.skipped)
        dropped.update(r.dropped_members)
    captions = sum(r.captions for r in results)
    worker_seconds = sum(r.seconds for r in results if r.captions)
    cpu_seconds = sum(r.cpu_seconds for r in results if r.captions)
    return {
        "out_dir": str(out),
        "shards": len(plan),
        "shards_done": by["done"],
        "shards_skipped": by["skipped"],
        **problems_summary(results),
        "samples": sum(r.samples for r in results if r.status == "done"),
        "total_samples": sum(r.samples for r in results if r.status != "failed"),
        "skipped": {k: skipped[k] for k in SKIP_REASONS if skipped[k]},
        "skipped_total": sum(skipped.values()),
        "dropped_members": dict(sorted(dropped.items())),
        "captions": captions,
        "concepts_per_caption": round(sum(r.concepts for r in results) / captions, 4) if captions else None,
        "in_bank_share": round(sum(r.with_in_bank for r in results) / captions, 4) if captions else None,
        "captions_per_s": round(captions / work_seconds, 1) if captions and work_seconds > 0 else None,
        "captions_per_s_per_process": round(captions / worker_seconds, 1) if worker_seconds > 0 else None,
        "captions_per_cpu_s": round(captions / cpu_seconds, 1) if cpu_seconds > 0 else None,
        "processes": processes,
        "seconds": round(seconds, 3),
    }


__all__ = ["CONCEPTS_EXT", "KEPT_EXTENSIONS", "SKIP_REASONS", "PrepareInterrupted", "ShardResult", "key_hash",
           "plan_shards", "prepare_shards", "process_shard", "stale_outputs"]
