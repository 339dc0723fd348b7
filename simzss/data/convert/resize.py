"""Pre-resized shards: images stored with their short side at most N pixels (img2dataset's ``keep_ratio``).

Training decodes every image and crops it; when a JPEG is much larger than the crop needs, most of that CPU goes
into pixels that are thrown away (a 224 px crop at crop scale 0.9 needs a short side of 273: 288 keeps every
detail). :func:`resize_image` applies the convention: the short side becomes N, the aspect ratio is kept, an image
is never upscaled (one whose short side is already <= N keeps its bytes unchanged), and a resized image is
re-encoded as JPEG at a stated quality with its EXIF orientation applied (the training and evaluation decoders
apply it too, so the picture looks the same). :func:`resize_shards` does this to existing shards, keeping every
other member (caption, ``.json``, ``concepts.json``) as it is; resumable and atomic like ``prepare``, with
fingerprints (``fingerprints.json``) so an output is redone when its input or the settings change.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

from simzss.data.outputs import drop_stale_outputs, plan_outputs, problems_summary, writable_folder
from simzss.data.pool import PoolInterrupted, exit_with_parent, run_jobs, sigterm_raises
from simzss.data.shard_index import index_kept_shard, index_new_shard
from simzss.data.shards import (
    IMAGE_EXTENSIONS,
    ShardReadError,
    clean_stale_temps,
    iter_samples,
    read_fingerprints,
    reuse_problem,
    source_fingerprint,
    update_sizes,
    write_one_of_many,
)
from simzss.data.transforms import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, decode_image
from simzss.logs import progress, setup_logging

log = logging.getLogger(__name__)

#: JPEG quality of re-encoded images (img2dataset's default ``encode_quality``).
DEFAULT_JPEG_QUALITY = 95
#: Short side that keeps every detail of a 224 px training crop at crop scale 0.9 (which needs >= 273).
DEFAULT_SHORT_SIDE = 288


@dataclass(frozen=True)
class ResizeOptions:
    """How images are resized: short side ``short_side`` (never upscaled), JPEG ``quality``, decode pixel cap."""

    short_side: int = DEFAULT_SHORT_SIDE
    quality: int = DEFAULT_JPEG_QUALITY
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.short_side < 1:
            raise ValueError(f"--resize-short must be >= 1, got {self.short_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--jpeg-quality must be in [1, 100], got {self.quality}")

    def made_with(self) -> Dict[str, int]:
        """The settings recorded in ``fingerprints.json`` / the shards manifest (a change redoes the output)."""
        return {"resize_short": self.short_side, "jpeg_quality": self.quality}


def resized_size(width: int, height: int, short_side: int) -> Tuple[int, int]:
    """``(w, h)`` with the short side ``short_side`` and the aspect ratio kept; unchanged if already no larger."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    scale = short_side / short
    if width <= height:
        return short_side, max(short_side, round(height * scale))
    return max(short_side, round(width * scale)), short_side


def resize_image(data: bytes, options: ResizeOptions) -> Optional[bytes]:
    """The JPEG bytes of the image ``data`` with its short side at ``options.short_side``, or None when it is
    already small enough (keep ``data`` as it is). Raises ``ImageTooLargeError`` over the pixel cap and
    Pillow's ``UnidentifiedImageError`` / ``OSError`` / ``ValueError`` for unreadable data."""
    with Image.open(io.BytesIO(data)) as probe:
        width, height = probe.size
    if min(width, height) <= options.short_side:
        return None
    img = decode_image(data, min_size=options.short_side, max_pixels=options.max_pixels)  # RGB, EXIF applied
    size = resized_size(*img.size, options.short_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=options.quality)
    return buf.getvalue()


def resize_sample_images(sample: Dict[str, Any], options: ResizeOptions, counts: Counter) -> Optional[Dict[str, Any]]:
    """``sample`` with its image member resized (a PNG/WebP that is resized becomes ``jpg``); other members kept.
    None when the image cannot be decoded (counted in ``counts`` by reason)."""
    out = dict(sample)
    for ext in IMAGE_EXTENSIONS:
        if ext not in sample:
            continue
        try:
            resized = resize_image(sample[ext], options)
        except ImageTooLargeError:
            counts["image_too_large"] += 1
            return None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            counts["unreadable_image"] += 1
            return None
        if resized is None:
            counts["kept_as_is"] += 1
            continue
        counts["resized"] += 1
        del out[ext]
        out["jpg"] = resized
    return out


# ------------------------------------------------------------------------------------------------
# resizing existing shards


@dataclass
class ResizeResult:
    """What happened to one input shard."""

    shard: str
    output: str
    status: str  # done | skipped | failed
    samples: int = 0
    counts: Counter = field(default_factory=Counter)  # resized / kept_as_is / unreadable_image / image_too_large
    bytes_in: int = 0  # image bytes read
    bytes_out: int = 0  # image bytes written
    truncated: Optional[str] = None
    error: Optional[str] = None


def resize_shard(src: str, dst: str, options: ResizeOptions) -> ResizeResult:
    """Resize the images of one shard into ``dst`` (atomic). A truncated input keeps its complete samples; one
    with none gives a failed result and no output. Samples whose image cannot be decoded are dropped, counted."""
    res = ResizeResult(shard=src, output=dst, status="done")

    def samples() -> Iterator[Dict[str, Any]]:
        try:
            for sample in iter_samples(src):
                res.bytes_in += sum(len(sample[e]) for e in IMAGE_EXTENSIONS if e in sample)
                out = resize_sample_images(sample, options, res.counts)
                if out is None:
                    continue
                res.bytes_out += sum(len(out[e]) for e in IMAGE_EXTENSIONS if e in out)
                yield out
        except ShardReadError as e:
            if e.samples_read == 0:
                raise
            res.truncated = e.reason
            log.warning("%s: %s; keeping the %d complete sample(s) before the damage", src, e.reason, e.samples_read)

    res.samples, res.error = write_one_of_many(dst, samples(), src)
    if res.error is not None:
        res.status = "failed"
        log.error("%s: shard failed, no output written: %s", src, res.error)
    else:
        index_new_shard(dst)
    return res


class ResizeInterrupted(PoolInterrupted):
    """SIGTERM reached ``resize_shards``; the pool was stopped, finished shards are kept."""


def _init_worker() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        exit_with_parent(parent.pid)
    if parent is not None and not logging.getLogger().handlers:
        setup_logging(logging.WARNING)


#: The (input shard, output path) pairs of a run, checked before anything is written (see :func:`plan_outputs`).
plan_resize = plan_outputs


def resize_shards(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    options: ResizeOptions,
    *,
    processes: int = 1,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Dict[str, Any]:
    """Write every input shard ``NAME.tar`` as ``out_dir/NAME.tar`` with resized images; return the run summary.

    Existing outputs are kept when ``fingerprints.json`` says they were made from their input as it is now with
    the same options, else redone (``overwrite``: all redone). ``sizes.json`` is kept up to date. The output
    folder must be writable (``PermissionError``), and outputs made from an input of the same folder that is gone or
    changed are refused with a ``ValueError`` naming ``--overwrite`` (removed with ``overwrite``).
    """
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    t0 = time.perf_counter()
    plan = plan_resize(inputs, out_dir)
    out = Path(out_dir)
    writable_folder(out)
    clean_stale_temps(out)
    stale_removed = drop_stale_outputs(out, plan, overwrite)
    sizes = update_sizes(out, keep=lambda name: (out / name).is_file())
    records = read_fingerprints(out)
    made_with = options.made_with()
    results: List[ResizeResult] = []
    todo: List[Tuple[str, str, ResizeOptions]] = []
    for src, dst in plan:
        if dst.exists() and not overwrite:
            if reuse_problem(src, dst, records.get(dst.name), made_with, sizes) is None:
                results.append(ResizeResult(src, str(dst), "skipped", samples=sizes[dst.name],
                                            truncated=records[dst.name].get("truncated")))
                index_kept_shard(dst)
                continue
        todo.append((src, str(dst), options))
    log.info("%d shard(s): %d to resize, %d already done", len(plan), len(todo), len(plan) - len(todo))
    bar = progress(total=len(todo), desc="resize", unit="shard", enabled=show_progress and bool(todo))

    def finished(res: ResizeResult) -> None:
        results.append(res)
        if res.status == "done":
            extra: Dict[str, Any] = {"source": source_fingerprint(res.shard), "made_with": made_with}
            if res.truncated:
                extra["truncated"] = res.truncated
            name = Path(res.output).name
            update_sizes(out, {name: res.samples}, extra={name: extra})
        bar.update(1)

    try:
        with sigterm_raises(ResizeInterrupted):
            run_jobs(resize_shard, todo, finished, processes=processes, initializer=_init_worker,
                     cleanup=lambda: clean_stale_temps(out))  # the stopped workers' unfinished shards
    finally:
        bar.close()
    order = {src: i for i, (src, _) in enumerate(plan)}
    results.sort(key=lambda r: order[r.shard])
    counts: Counter = Counter()
    for r in results:
        counts.update(r.counts)
    by = Counter(r.status for r in results)
    done = [r for r in results if r.status == "done"]
    bytes_in, bytes_out = sum(r.bytes_in for r in done), sum(r.bytes_out for r in done)
    return {
        "out_dir": str(out),
        "shards": len(plan),
        "shards_written": by["done"],
        "shards_skipped": by["skipped"],
        **problems_summary(results),
        "samples": sum(r.samples for r in results if r.status != "failed"),
        "stale_shards_removed": stale_removed,
        "images": dict(sorted(counts.items())),
        "image_bytes_ratio": round(bytes_out / bytes_in, 4) if bytes_in else None,
        **made_with,
        "seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = ["DEFAULT_JPEG_QUALITY", "DEFAULT_SHORT_SIDE", "ResizeInterrupted", "ResizeOptions", "ResizeResult",
           "plan_resize", "resize_image", "resize_sample_images", "resize_shard", "resize_shards", "resized_size"]
