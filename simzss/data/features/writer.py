"""Feature-cache writer: runs a frozen vision encoder once per image of prepared shards and writes the cache.

The encoder is passed in (:class:`FeatureExtractor` wraps any tower returning ``(cls, patches)``), so this data-stage
module never builds a model; ``simzss cache-features`` (:mod:`simzss.cli.cache_features`) builds the DINOv2 tower.

Two passes over the source shards: the first reads captions and image identities (``image_id`` of ``KEY.json``,
else the image bytes' hash; :func:`~simzss.data.features.format.image_identity`) and numbers the distinct images
in order of first appearance; the second decodes each distinct image once (DataLoader workers, whole shards
each), draws its ``V`` views under a per-image seed, and writes their features to rows of ``cls.npy`` /
``patches.npy``. The arrays and caption shards are written under temporary names and renamed when complete;
``meta.json`` says ``complete: true`` only after that, so an interrupted build is never used (a rerun redoes it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import logging
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms import v2

from simzss.config import DataConfig, VisionConfig
from simzss.data.features.format import (
    CACHE_FORMAT, CACHE_VERSION, CLS_FILE, DTYPES, IMAGE_ROW_MEMBER, META_FILE, PATCHES_FILE, CacheError,
    cache_nbytes, image_identity, input_fingerprint, load_meta_file, meta_settings, weights_fingerprint,
)
from simzss.data.shard_index import index_new_shard
from simzss.data.shards import (
    IMAGE_EXTENSIONS, SIZES_FILE, ShardReadError, atomic_path, atomic_write_bytes, clean_stale_temps,
    expand_shards, iter_samples, write_shard, write_sizes,
)
from simzss.data.decode import decode_crop
from simzss.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, decode_image, decode_min_size, interpolation_mode, train_crop,
)
from simzss.logs import progress as progress_bar

log = logging.getLogger(__name__)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _iter_shard(path: str, skipped: Counter) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard (``simzss.data.shards``: no pickle); a damaged shard is logged and counted,
    keeping the samples read before the damage."""
    try:
        yield from iter_samples(path, dropped=skipped)
    except ShardReadError as e:
        skipped["damaged_shard"] += 1
        log.error("%s", e)


def view_transform(image_size: int, augment: bool, crop_scale: Sequence[float], interpolation: str = "bicubic",
                   decode: str = "cpu", max_pixels: int = DataConfig.max_image_pixels) -> Callable[[bytes], torch.Tensor]:
    """Encoded image -> one cached view, a uint8 ``[3,S,S]`` tensor (normalised later, on the device).

    ``augment``: the training stream's own decode + random resized crop for ``data.decode`` (``cpu`` and ``gpu``:
    :func:`simzss.data.decode.decode_crop`, whose box and pixels the device decoder reproduces; ``pil``:
    PIL decode + :func:`simzss.data.transforms.train_crop`), same scale, aspect ratios and interpolation, drawing
    from the torch RNG as the stream does; so a cached view is exactly a crop the on-the-fly path can take.
    Else the fixed resize + center crop of evaluation.
    """
    if not augment:
        fixed = v2.Compose([v2.Resize(image_size, interpolation=interpolation_mode("bicubic"), antialias=True),
                            v2.CenterCrop(image_size), v2.ToImage()])
        return lambda data: fixed(decode_image(data, image_size, max_pixels))
    if decode == "pil":
        crop, min_size = train_crop(image_size, crop_scale, interpolation), decode_min_size(image_size, crop_scale)
        return lambda data: crop(decode_image(data, min_size, max_pixels))
    return lambda data: decode_crop(data, image_size, crop_scale, interpolation, max_pixels)


def image_seed(seed: int, identity: str) -> int:
    """The torch seed of one image's views: a function of the build seed and the image only."""
    return zlib.crc32(f"{seed}/{identity}".encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------------------
# pass 1: captions and image identities
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Caption:
    key: str
    text: bytes
    concepts: Optional[bytes]
    identity: str
    row: int = -1


def _scan_shard(path: str) -> Tuple[List[_Caption], Counter]:
    """Captions of one source shard with their image identities (images are hashed, not decoded)."""
    skipped: Counter[str] = Counter()
    out: List[_Caption] = []
    for sample in _iter_shard(path, skipped):
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            skipped["no_image"] += 1
            continue
        text = sample.get("txt")
        if not text or not text.decode("utf-8", "replace").strip():
            skipped["no_caption"] += 1
            continue
        kind, ident = image_identity(sample, sample[ext])
        out.append(_Caption(sample["__key__"], text, sample.get("concepts.json"), f"{kind}:{ident}"))
    return out, skipped


# --------------------------------------------------------------------------------------------------------------
# pass 2: one decode + V views per distinct image
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Up to ``chunk`` distinct images of one source shard, as their views; ``failed`` rows could not be
    decoded."""

    shard: str
    rows: List[int] = field(default_factory=list)
    images: Optional[torch.Tensor] = None  # [n, V, 3, S, S] uint8
    failed: List[int] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)

    def pin_memory(self) -> "_Chunk":
        """Called by the DataLoader's pin-memory thread: page-locked images make the device copy asynchronous."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class _SourceImages(torch.utils.data.IterableDataset):
    """Decodes the distinct images of whole source shards (``todo[path]``: key -> (row, identity)) and draws
    their views; DataLoader workers split the shard list."""

    def __init__(self, todo: Dict[str, Dict[str, Tuple[int, str]]], *, image_size: int, views: int, augment: bool,
                 crop_scale: Tuple[float, float], interpolation: str, decode: str, seed: int, chunk: int,
                 max_pixels: int) -> None:
        super().__init__()
        self.todo, self.image_size, self.views, self.augment = todo, image_size, views, augment
        self.crop_scale, self.interpolation, self.seed, self.chunk = tuple(crop_scale), interpolation, seed, chunk
        self.decode, self.max_pixels = decode, max_pixels

    def __iter__(self) -> Iterator[_Chunk]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        view = view_transform(self.image_size, self.augment, self.crop_scale, self.interpolation, self.decode,
                              self.max_pixels)
        for path in list(self.todo)[wid::nw]:
            wanted = self.todo[path]
            cur = _Chunk(os.path.basename(path))
            imgs: List[torch.Tensor] = []
            skipped: Counter[str] = Counter()
            for sample in _iter_shard(path, Counter()):  # pass 1 counted the shard's dropped members
                entry = wanted.get(sample["__key__"])
                if entry is None:
                    continue
                row, identity = entry
                ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
                try:
                    # one seed per image: its views do not depend on workers, batching or shard order
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(image_seed(self.seed, identity))
                        views = torch.stack([view(sample[ext]) for _ in range(self.views)])
                except Exception as e:  # untrusted bytes: PIL raises many types
                    skipped["bad_image"] += 1
                    cur.failed.append(row)
                    log.warning("skipping %s/%s: unusable image (%s: %s)", cur.shard, sample["__key__"],
                                type(e).__name__, e)
                    continue
                cur.rows.append(row)
                imgs.append(views)
                if len(cur.rows) == self.chunk:
                    cur.images, cur.skipped = torch.stack(imgs), dict(skipped)
                    yield cur
                    cur, imgs, skipped = _Chunk(cur.shard), [], Counter()
            cur.images = torch.stack(imgs) if imgs else None
            cur.skipped = dict(skipped)
            yield cur


class FeatureExtractor:
    """The frozen vision tower set up for throughput: inference mode (the tower itself autocasts to bf16 on
    CUDA), pinned non-blocking host-to-device copies, optional ``torch.compile``."""

    def __init__(self, tower: torch.nn.Module, *, device: str | torch.device | None = None,
                 compile: bool = False) -> None:
        """``tower``: a frozen module mapping normalised images ``[N,3,S,S]`` to ``(cls [N,D], patches [N,h,w,D])``,
        with ``embed_dim`` and ``patch_size`` attributes (:class:`simzss.models.vision.FrozenVisionTower`)."""
        self.device = torch.device(device) if device is not None else _default_device()
        self.tower = tower.to(self.device)
        self.fingerprint = weights_fingerprint(self.tower)
        self.embed_dim, self.patch_size = int(self.tower.embed_dim), int(self.tower.patch_size)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._forward: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]] = self.tower
        if compile:
            self._forward = torch.compile(self.tower)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``images [N,3,S,S]`` (uint8, or float already normalised) -> ``cls [N,D]``, ``patches [N,h,w,D]``
        (float32, on the device)."""
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # the same arithmetic as simzss.data.transforms.normalize_batch
            x = x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        cls, patches = self._forward(x)
        return cls.float(), patches.float()


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_storage(features: torch.Tensor, dtype: str) -> np.ndarray:
    """Features (any float dtype, any device) -> the host numpy array stored for ``dtype`` (bf16 as its bits)."""
    t = features.to(DTYPES[dtype][1])
    if dtype == "bf16":
        t = t.view(torch.int16)
    return t.cpu().numpy().view(DTYPES[dtype][0])


def _previous_meta(out: Path) -> Optional[Dict[str, Any]]:
    """``meta.json`` of a cache already in ``out`` (None if there is none), to compare with the one to write."""
    return load_meta_file(out, "pass --overwrite to start over, or use another --out")


def _differences(previous: Dict[str, Any], meta: Dict[str, Any]) -> List[str]:
    """What makes an existing cache in ``--out`` another input's or another setting's output."""
    diff: List[str] = []
    if previous.get("version") != meta["version"]:
        diff.append(f"cache version {previous.get('version')} != {meta['version']}")
    old, new = meta_settings(previous), meta_settings(meta)
    diff += [f"{k} {old[k]!r} != {new[k]!r}" for k in new if old.get(k) != new[k]]
    if (previous.get("vision") or {}).get("fingerprint") != meta["vision"]["fingerprint"]:
        diff.append("vision weights fingerprint differs")
    old_fp, new_fp = previous.get("source_fingerprint") or {}, meta["source_fingerprint"]
    changed = sorted(n for n in set(old_fp) | set(new_fp) if old_fp.get(n) != new_fp.get(n))
    if changed:
        diff.append(f"source shards changed since (size/mtime, or added/removed): {changed[:3]}")
    return diff


def write_feature_cache(
    shards: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    extractor: FeatureExtractor,
    vision: VisionConfig,
    image_size: int,
    views: int = 1,
    augment: Optional[bool] = None,
    crop_scale: Tuple[float, float] = (0.9, 1.0),
    interpolation: str = "bicubic",
    decode: str = "cpu",
    batch_size: int = 256,
    dtype: str = "fp16",
    workers: int = 4,
    seed: int = 0,
    max_pixels: int = DataConfig.max_image_pixels,
    overwrite: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run ``extractor`` (the tower ``vision`` describes) once per distinct image of prepared ``shards`` and write
    the feature cache to ``out_dir``; returns its meta.

    ``views == 1`` without ``augment`` stores the fixed resize + center-crop view; ``augment`` (the default when
    ``views > 1``) stores ``views`` draws of the training stream's decode + random resized crop per image
    (``crop_scale``, ``interpolation``, ``decode`` as ``data.decode``), seeded per image; the cached loader serves
    one per epoch. An existing complete cache
    of the same input (source shards' size and mtime), tower and settings is kept as it is; one of another
    input or setting is refused (:class:`CacheError` naming ``--overwrite``) unless ``overwrite``; an
    interrupted one is rebuilt.
    """
    if views < 1:
        raise ValueError(f"--views must be >= 1, got {views}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if decode not in ("cpu", "gpu", "pil"):
        raise ValueError(f"decode must be cpu, gpu or pil (data.decode), got {decode!r}")
    augment = views > 1 if augment is None else augment
    decode = "pil" if decode == "pil" else "cpu"  # gpu: the same boxes and pixels as cpu, decoded elsewhere
    paths = expand_shards(shards, local_only=True)
    names = [os.path.basename(p) for p in paths]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ValueError(f"source shards share file names {dupes[:5]}: the cache keeps shard names, rename them")
    out = Path(out_dir)
    if any(Path(p).resolve().parent == out.resolve() for p in paths):
        raise ValueError(f"--out {out} holds the source shards; write the cache to another folder")
    grid = image_size // extractor.patch_size
    meta: Dict[str, Any] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "vision": {
            "name": vision.name, "pretrained": bool(vision.pretrained), "weights": vision.weights,
            "model_kwargs": dict(vision.model_kwargs or {}), "fingerprint": extractor.fingerprint,
            "denoiser": vision.denoiser, "denoiser_weights": vision.denoiser_weights,
        },
        "image_size": int(image_size),
        "patch_size": extractor.patch_size,
        "grid": [grid, grid],
        "dim": extractor.embed_dim,
        "dtype": dtype,
        "views": int(views),
        "augment": bool(augment),
        "crop_scale": [float(crop_scale[0]), float(crop_scale[1])] if augment else None,
        "interpolation": interpolation if augment else "bicubic",
        "decode": decode if augment else "pil",
        "seed": int(seed),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "transform": "random_resized_crop" if augment else "resize_center_crop",
        "source_shards": [os.path.abspath(p) for p in paths],
        "source_fingerprint": input_fingerprint(paths),
        "shards": names,
        "complete": False,
    }

    previous = None if overwrite else _previous_meta(out)
    if previous is not None:
        diff = _differences(previous, meta)
        if diff:
            raise CacheError(f"{out} holds a feature cache of other input or settings ({'; '.join(diff)}); "
                             "pass --overwrite to replace it, or use another --out")
        if previous.get("complete"):
            log.info("%s is up to date (same source shards, tower and settings): nothing to do", out)
            return previous
        log.info("%s holds an interrupted build of the same cache: building it again", out)
    elif not overwrite and out.is_dir() and any(out.iterdir()):
        raise CacheError(f"--out {out} is not empty and holds no feature cache; pass --overwrite or use another --out")
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    # from here on the folder is marked incomplete until every file is in place
    _atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    for n in [*names, SIZES_FILE, CLS_FILE, PATCHES_FILE]:
        (out / n).unlink(missing_ok=True)

    t0 = time.perf_counter()
    # pass 1: captions and image identities, shards in parallel (reading and hashing release the GIL)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        scanned = list(pool.map(_scan_shard, paths))
    skipped: Counter[str] = Counter()
    rows: Dict[str, int] = {}
    todo: Dict[str, Dict[str, Tuple[int, str]]] = {}
    kinds: Counter[str] = Counter()
    for path, (captions, sk) in zip(paths, scanned):
        skipped.update(sk)
        for c in captions:
            if c.identity not in rows:
                rows[c.identity] = len(rows)
                kinds[c.identity.split(":", 1)[0]] += 1
                todo.setdefault(path, {})[c.key] = (rows[c.identity], c.identity)
            c.row = rows[c.identity]
    num_images, num_captions = len(rows), sum(len(c) for c, _ in scanned)
    if num_images == 0:
        raise CacheError(f"no usable sample (image + caption) in the {len(paths)} source shard(s); "
                         f"skipped: {dict(skipped)}")
    meta["num_images"] = num_images
    nbytes = cache_nbytes(num_images, views, (grid, grid), extractor.embed_dim, dtype)
    log.info("%d captions of %d distinct images (%s); features: %.2f GB", num_captions, num_images,
             ", ".join(f"{v} by {k}" for k, v in sorted(kinds.items())), nbytes / 1e9)

    # pass 2: one decode and `views` crops per distinct image, features written to their rows
    store_np = DTYPES[dtype][0]
    dataset = _SourceImages({p: todo[p] for p in paths if p in todo}, image_size=image_size, views=views,
                            augment=augment, crop_scale=crop_scale, interpolation=interpolation, decode=decode, seed=seed,
                            chunk=max(1, batch_size // views), max_pixels=max_pixels)
    n_workers = min(workers, len(dataset.todo))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=n_workers, pin_memory=extractor.device.type == "cuda",
        prefetch_factor=4 if n_workers > 0 else None,
    )
    failed: set[int] = set()
    bar = progress_bar(total=num_images, unit="img", enabled=progress, desc="cache-features")
    with contextlib.ExitStack() as stack:
        tmp_cls = stack.enter_context(atomic_path(out / CLS_FILE))
        tmp_patches = stack.enter_context(atomic_path(out / PATCHES_FILE))
        cls_mm = np.lib.format.open_memmap(tmp_cls, mode="w+", dtype=store_np,
                                           shape=(num_images, views, extractor.embed_dim))
        patches_mm = np.lib.format.open_memmap(tmp_patches, mode="w+", dtype=store_np,
                                               shape=(num_images, views, grid, grid, extractor.embed_dim))
        # one thread copies features to the host and into the arrays while the next forward runs
        io_pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cache-writer"))
        pending: List[concurrent.futures.Future] = []

        def store(rows_: np.ndarray, cls: torch.Tensor, patches: torch.Tensor) -> None:
            cls_mm[rows_] = to_storage(cls, dtype).reshape(len(rows_), views, -1)
            patches_mm[rows_] = to_storage(patches, dtype).reshape(len(rows_), views, *patches.shape[1:])

        for c in loader:
            skipped.update(c.skipped)
            failed.update(c.failed)
            bar.update(len(c.failed))
            if c.images is None:
                continue
            n = c.images.shape[0]
            cls, patches = extractor(c.images.flatten(0, 1))
            if not (torch.isfinite(cls).all() and torch.isfinite(patches).all()):
                raise FloatingPointError(f"non-finite features in shard {c.shard} (rows {c.rows[:3]}...)")
            # cast on the device (fp16/bf16 halve the device-to-host copy)
            cls_s, patches_s = cls.to(DTYPES[dtype][1]), patches.to(DTYPES[dtype][1])
            pending.append(io_pool.submit(store, np.asarray(c.rows), cls_s, patches_s))
            while len(pending) > 2:
                pending.pop(0).result()
            bar.update(n)
        for f in pending:
            f.result()
        cls_mm.flush()
        patches_mm.flush()
        del cls_mm, patches_mm
        bar.close()

        # caption shards: every caption of a usable image, pointing at its row
        sizes: Dict[str, int] = {}
        dropped = 0
        for name, (captions, _) in zip(names, scanned):
            samples = []
            for c in captions:
                if c.row in failed:
                    dropped += 1
                    continue
                s = {"__key__": c.key, "txt": c.text, IMAGE_ROW_MEMBER: str(c.row).encode()}
                if c.concepts is not None:
                    s["concepts.json"] = c.concepts
                samples.append(s)
            sizes[name] = write_shard(out / name, samples)
            index_new_shard(out / name)
        if dropped:
            skipped["caption_of_bad_image"] += dropped
        write_sizes(out, sizes)
    # the arrays were renamed into place when the ExitStack closed

    elapsed = time.perf_counter() - t0
    meta.update(
        complete=True,
        num_samples=int(sum(sizes.values())),
        image_identity=dict(kinds),
        feature_bytes=nbytes,
        skipped=dict(skipped),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    _atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    if skipped:
        log.warning("cache-features skipped: %s", dict(skipped))
    log.info("cached %d images (%d views) in %.1fs (%.1f img/s); %d captions in %s", num_images - len(failed),
             views, elapsed, (num_images - len(failed)) / max(elapsed, 1e-9), meta["num_samples"], out)
    return meta
