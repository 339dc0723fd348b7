"""``simzss prepare``: annotate image-caption shards with their caption concepts.

For every input shard ``.../NAME.tar`` this writes ``OUT/NAME.tar`` with the same samples plus
``KEY.concepts.json`` (``{"version": 1, "concepts": [Concept.to_json(), ...]}``, every noun-chunk
concept, in-bank or not) and keeps ``OUT/sizes.json`` up to date. Shards are processed in parallel,
one spaCy pipeline per process. The run is resumable and crash-safe: output shards appear only
complete (temp file + rename), an existing output shard counts as done, and stale temp files of
killed runs are removed. Bad samples are dropped and counted by reason (one bad sample never costs
more than itself); output samples hold only the members this package understands (caption, image,
``.json`` metadata, concepts) under safe names; unreadable shards are reported, get no output, and make
the command exit non-zero. ``sizes.json`` is updated under a file lock, so several runs may write one
folder. Worker processes exit by themselves when the driver dies (SIGKILL), and SIGTERM / Ctrl-C stop
the pool and leave no temporary files.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence


from simzss.concepts import ConceptBank, ConceptExtractor
from simzss.data.pool import PoolInterrupted, exit_with_parent, sigterm_raises, stop_pool, worker_environment
from simzss.data.shards import (
    IMAGE_EXTENSIONS,
    MAX_CAPTION_CHARS,
    ShardReadError,
    clean_stale_temps,
    expand_urls,
    iter_samples,
    update_sizes,
    write_shard,
)
from simzss.helpformat import HelpFormatter
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
    skipped: Counter[str] = field(default_factory=Counter)  # dropped samples by reason
    dropped_members: Counter[str] = field(default_factory=Counter)  # members iter_samples left out
    captions: int = 0  # captions annotated in this run
    concepts: int = 0
    with_in_bank: int = 0  # captions with at least one in-bank concept
    seconds: float = 0.0  # processing time in the worker (spaCy loading excluded)
    cpu_seconds: float = 0.0  # CPU time of the same (robust to other load on the machine)
    error: str | None = None


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

    Images are passed through undecoded. A shard that cannot be read to its end gives a failed
    result and no ``dst``. The caption bytes are kept as they are, so concept spans index the
    ``KEY.txt`` text exactly.
    """
    res = ShardResult(shard=src, output=dst, status="done")
    seen: set[str] = set()
    t0, c0 = time.perf_counter(), time.process_time()

    def valid() -> Iterator[tuple[dict[str, Any], str]]:
        for sample in iter_samples(src, dropped=res.dropped_members):
            reason, caption = _check_sample(sample, seen)
            if reason is not None:
                res.skipped[reason] += 1
                log.debug("%s: dropping sample %r: %s", src, sample["__key__"], reason)
                continue
            yield sample, caption  # type: ignore[misc]

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
                yield out

    try:
        res.samples = write_shard(dst, annotated())
    except ShardReadError as e:
        res.status, res.error = "failed", str(e)
    except Exception as e:  # one broken shard must not stop the others; reported as failed
        log.exception("%s: unexpected error", src)
        res.status, res.error = "failed", f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - t0
    res.cpu_seconds = time.process_time() - c0
    if res.skipped:
        log.warning("%s: dropped %d sample(s): %s", src, sum(res.skipped.values()), dict(res.skipped))
    if res.status == "failed":
        log.error("%s: shard failed, no output written: %s", src, res.error)
    return res


# ------------------------------------------------------------------------------------------------
# driver


def _plan(inputs: Sequence[str], out: Path) -> list[tuple[str, Path]]:
    urls = expand_urls(list(inputs))
    names: dict[str, str] = {}
    plan = []
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            raise ValueError(f"prepare reads local shard files only, got {url!r}")
        src = Path(url)
        if src.resolve().parent == out.resolve():
            raise ValueError(f"input {url} is inside the output folder {out}; choose another --out")
        if src.name in names:
            raise ValueError(f"two inputs would write the same output {src.name}: {names[src.name]} and {url}")
        names[src.name] = url
        plan.append((url, out / src.name))
    return plan


def _count_existing(path: Path) -> int:
    return sum(1 for _ in iter_samples(path))


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

    ``inputs``: paths or brace patterns (``::``-separated lists allowed). ``bank`` (default: the
    built-in evaluation vocabulary) only feeds the in-bank statistics; all concepts are stored.
    Existing output shards are skipped unless ``overwrite``. ``fast_spacy`` runs spaCy's matrix products
    through numpy's BLAS (:func:`simzss.concepts.load_spacy`, ``numpy_gemm``; ``False``: spaCy's BLIS). Worker processes get one
    BLAS thread each (unless ``OPENBLAS_NUM_THREADS`` etc. are set); with ``processes=1`` the work runs in
    this process, with its BLAS settings. Raises ``ValueError`` on bad arguments.
    """
    if processes < 1 or batch_size < 1:
        raise ValueError(f"processes and batch_size must be >= 1, got {processes}, {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan([inputs] if isinstance(inputs, str) else list(inputs), out)
    if bank is None:
        bank = ConceptBank.default()
    clean_stale_temps(out)
    sizes = update_sizes(out, keep=lambda name: (out / name).is_file())  # forget shards deleted since

    t0 = time.perf_counter()
    results: list[ShardResult] = []
    todo: list[tuple[str, Path]] = []
    counted: dict[str, int] = {}
    for src, dst in plan:
        if dst.exists() and not overwrite:
            res = ShardResult(shard=src, output=str(dst), status="skipped")
            try:
                res.samples = sizes[dst.name] if dst.name in sizes else _count_existing(dst)
                counted[dst.name] = res.samples
            except ShardReadError as e:  # cannot happen for our own outputs, unless edited by hand
                res.status, res.error = "failed", f"existing output is unreadable ({e}); delete it or use --overwrite"
            results.append(res)
        else:
            todo.append((src, dst))
    update_sizes(out, counted)
    log.info("%d shard(s): %d to do, %d already done", len(plan), len(todo), len(plan) - len(todo))

    def finished(res: ShardResult, bar: Any) -> None:
        results.append(res)
        if res.status == "done":
            update_sizes(out, {Path(res.output).name: res.samples})
        bar.update(1)
        bar.set_postfix(captions=sum(r.captions for r in results), failed=sum(r.status == "failed" for r in results))

    t_work = time.perf_counter()
    with progress_bar(total=len(todo), unit="shard", desc="prepare", enabled=progress and bool(todo)) as bar, \
            sigterm_raises(PrepareInterrupted):
        if todo and processes == 1:
            _init_worker(spacy_model, batch_size, bank, fast_spacy, lowercase)
            for src, dst in todo:
                finished(_run_shard(src, str(dst)), bar)
        elif todo:
            ctx = multiprocessing.get_context("spawn")
            workers = min(processes, len(todo))
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(spacy_model, batch_size, bank, fast_spacy, lowercase))
            try:
                with worker_environment():  # workers start during submit() and copy the environment
                    pending: dict[Future[ShardResult], tuple[str, Path]] = {
                        pool.submit(_run_shard, src, str(dst)): (src, dst) for src, dst in todo
                    }
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        src, dst = pending.pop(fut)
                        try:
                            res = fut.result()
                        except BrokenProcessPool as e:
                            raise RuntimeError(
                                "prepare worker processes died (see the errors above; is the spaCy model "
                                f"{spacy_model!r} installed?)"
                            ) from e
                        finished(res, bar)
            except BaseException:
                stop_pool(pool)
                clean_stale_temps(out)  # the stopped workers' unfinished shards
                raise
            pool.shutdown(wait=True)
    work_seconds = time.perf_counter() - t_work
    summary = _summary(results, plan, out, processes, time.perf_counter() - t0, work_seconds)
    summary["fast_spacy"] = fast_spacy
    summary["lowercase"] = lowercase
    summary["unreachable_bank_names"] = _report_unreachable(bank, spacy_model, fast_spacy)
    return summary


def _report_unreachable(bank: "ConceptBank", spacy_model: str, fast_spacy: bool) -> list[str]:
    """Bank names that no extracted concept can ever equal (parsed with this run's spaCy pipeline), logged."""
    names = bank.multiword_unreachable(ConceptExtractor(spacy_model, numpy_gemm=fast_spacy))
    if names:
        log.warning("%d of %d concept-bank names can never match an extracted concept (never trained): %s",
                    len(names), len(bank), ", ".join(names))
    return names


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
        "shards_failed": by["failed"],
        "failed": [{"shard": r.shard, "error": r.error} for r in results if r.status == "failed"],
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


def main(argv: list[str] | None = None) -> int:
    """``simzss prepare INPUT... --out DIR``: exit 0 when every shard is done or skipped, 1 if any failed."""
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="simzss prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="shard paths or brace patterns (shard-{000..009}.tar)")
    ap.add_argument("--out", required=True, help="output folder: annotated shards + sizes.json")
    ap.add_argument("--processes", type=int, default=1, help="parallel processes, one spaCy pipeline each")
    ap.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline name or path")
    ap.add_argument("--batch-size", type=int, default=256, help="captions per spaCy batch")
    ap.add_argument("--standard-spacy", action="store_true",
                    help="run spaCy's matrix products with its bundled BLIS instead of numpy's BLAS "
                         "(slower with one BLAS thread per process; same pipeline)")
    ap.add_argument("--lowercase", action="store_true",
                    help="parse the lower-cased caption, as the official release prepared its shards (spans still "
                         "refer to the caption as written)")
    ap.add_argument("--overwrite", action="store_true", help="redo shards whose output already exists")
    ap.add_argument("--concept-bank", help="text file, one class name per line (only for the in-bank statistics)")
    ap.add_argument("--synonyms", help="synonyms file for --concept-bank")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        bank = None
        if args.concept_bank:
            bank = ConceptBank.from_file(args.concept_bank, synonyms=args.synonyms)
        summary = prepare_shards(args.inputs, args.out, processes=args.processes, spacy_model=args.spacy_model,
                                 batch_size=args.batch_size, bank=bank, overwrite=args.overwrite,
                                 progress=not args.no_progress, fast_spacy=not args.standard_spacy,
                                 lowercase=args.lowercase)
    except PrepareInterrupted as e:
        print(f"simzss prepare: {e}; finished shards are kept, rerun the same command to continue", file=sys.stderr)
        return 128 + signal.SIGTERM
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"simzss prepare: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    if summary["shards_failed"]:
        print(f"simzss prepare: {summary['shards_failed']} shard(s) failed: "
              + ", ".join(f["shard"] for f in summary["failed"]), file=sys.stderr)
        return 1
    return 0


__all__ = ["CONCEPTS_EXT", "KEPT_EXTENSIONS", "SKIP_REASONS", "PrepareInterrupted", "ShardResult", "main", "prepare_shards", "process_shard"]
