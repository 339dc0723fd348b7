"""The webdataset training stream: tar shards -> decoded, augmented, tokenised :class:`Batch` es.

One rank's stream, epoch after epoch, without a pause at the boundaries:

    shard list (repeated forever, reshuffled every pass with seed/epoch/pass, the same order on every rank;
    or resampled with replacement) -> this rank's samples of the epoch (below), a finite sequence
    -> tar reading (errors logged + counted) -> seeded shuffle buffer (never reads past the rank's samples)
    -> output positions dealt to the data workers in chunks of a few samples, round robin
    -> per sample, in the worker that owns it: explicit decode (images / UTF-8 text / JSON only, nothing is ever
       unpickled) + random resized crop to uint8 -> per chunk: concepts + tokenisation -> a piece
    -> main process (:class:`~simzss.data.loader.TrainLoader`): pieces in order -> batches of exactly
       ``batch_size`` (:meth:`Batch.cat`)

Every sample once per epoch: ranks split the *sample* sequence, not the shards. With shard sizes known
(``sizes.json`` of local shards, the normal case) rank ``r`` takes the contiguous range
``[r * n, (r + 1) * n)`` of the epoch's sample sequence, ``n = num_batches * batch_size``: it skips whole shards
before its range unread and reads exactly ``n`` samples, which the shuffle buffer reorders without ever reading
past them. Without sizes, ranks take every ``world_size``-th shard and read the first ``n`` samples of them (an
epoch then covers the samples only approximately once). Every rank yields ``num_batches`` batches per epoch whatever
the shard sizes (no DDP hang); the last ``num_samples % (batch_size * world_size)`` samples (the partial global
batch) are left out of the epoch.

Workers: each of a rank's data workers reads the rank's whole sequence and runs the same seeded shuffle, so all agree
on the output order. That reading is paid once per worker, so it is kept cheap: a plain local shard is walked from
its index (:mod:`simzss.data.shard_index`, ``NAME.tar.idx``) or else from its tar headers
(:mod:`simzss.data.tar_members`), and a worker reads the bytes of its own samples only (its shuffle buffer holds
where the bytes are, not the bytes); other sources go through webdataset's reader with the bytes. Output positions
are cut into chunks of :func:`~simzss.data.sampling.chunk_size` samples, and chunk ``j`` of a pass belongs to
worker ``j % workers``, which alone decodes, crops and tokenises its samples. The DataLoader returns the workers'
pieces strictly round robin, so the main process receives the rank's sequence in order, whatever the number of
workers. Workers run on into the next epoch while the main process finishes the current one (no restart, no refill
stall at the boundary).

Skipped samples (counted and logged) are replaced by the ones that follow, which may come from the start of the
next epoch's sequence (that epoch then begins a little further on). A stream that only skips stops with an error
after ``max(1000, n)`` consecutive skipped samples instead of spinning.

Resume: the loader's position is the output position of the rank's next sample; a resumed loader starts its
workers there (they re-read, without decoding, the samples of the epoch before it to rebuild the shuffle buffer).
Random crops: each sample is decoded under its own torch RNG seed derived from (seed, epoch, rank, index of the
sample in the epoch's read order), inside ``torch.random.fork_rng``, so crops neither read nor disturb the
process-wide RNG. Resumed with the same shards, ``seed`` and ``world_size``, the stream continues bit for bit (keys,
tokens and image tensors) as if it had not stopped, with any number of workers.

Images leave the workers as uint8 crops (``data.decode=cpu``: torchvision JPEG decoding with DCT scaling when the
crop allows it, crop on the tensor; ``pil``: the former PIL decode and crop) or as encoded JPEGs with their crop
boxes (``gpu``: decoded on the device); :func:`simzss.data.device.to_device` normalises them on the device.

Extending: :class:`TrainStream` is public so that other sample formats reuse all of the above; a subclass
overrides :meth:`TrainStream.decode_sample` and :meth:`TrainStream.collate` (see its docstring and
docs/CONTRACTS.md) and is wrapped in a :class:`TrainLoader` with its own :class:`SharedState`
(``simzss.data.features`` does this for cached vision features).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.utils import make_seed

from simzss.concepts import Concept, ConceptBank, ConceptExtractor
from simzss.config import DataConfig
from simzss.data.shards import (
    IMAGE_EXTENSIONS,
    MAX_CAPTION_CHARS,
    expand_shards,
    local_shard_path,
)
from simzss.data.batch import Batch, EncodedImages
from simzss.data.loader import Piece, TrainingDataError, TrainLoader, resolve_workers
from simzss.data.decode import decode_crop, plan_crop
from simzss.data.shard_index import indexed_samples, log_index_coverage
from simzss.data.tar_members import read_members
from simzss.data.sampling import (
    SharedState,
    batches_per_epoch,
    buffered_shuffle,
    chunk_size,
    count_samples,
    drop_head,
    rank_seed,
    repeated_shards,
    shard_sizes_of,
    skip_shards_before,
    split_by_node,
)
from simzss.data.tokenize import tokenize_batch
from simzss.data.transforms import ImageTooLargeError, decode_image, decode_min_size, train_crop

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CAPTION_EXTENSION = "txt"
CONCEPTS_EXTENSION = "concepts.json"
DECODERS = ("cpu", "gpu", "pil")  # data.decode

# Per worker, epoch and reason, the first few skips are logged at WARNING, the rest at DEBUG (counts stay exact).
_LOG_FIRST_SKIPS = 10

ConceptSpans = List[Tuple[int, List[Tuple[int, int]]]]  # [(class_id, char spans), ...] of one caption



# --------------------------------------------------------------------------------------------------
# Worker-side stages
# --------------------------------------------------------------------------------------------------


class SkipStats:
    """Per-worker bookkeeping: skipped samples by reason (drained into each Batch) and raw sample count.

    Extension point: a :class:`TrainStream` subclass reports an unusable sample with
    ``stats.skip(reason, detail)`` in its ``decode_sample`` and puts ``stats.drain()`` into the
    ``Batch.skipped`` of each batch it collates.
    """

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.pending: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        self.raw_samples = 0

    def skip(self, reason: str, detail: str) -> None:
        """Count one skipped sample under ``reason`` (a short snake_case tag) and log it (first ones at WARNING)."""
        self.pending[reason] += 1
        self.totals[reason] += 1
        level = logging.WARNING if self.totals[reason] <= _LOG_FIRST_SKIPS else logging.DEBUG
        logger.log(
            level, "skipping sample (%s): %s [worker %d, %d so far]", reason, detail, self.worker, self.totals[reason]
        )

    def tar_error(self, exc: Exception) -> bool:
        """webdataset handler: count and log a tar read error, then continue with the stream."""
        self.skip("read_error", f"{type(exc).__name__}: {exc}"[:500])
        return True

    def drain(self) -> Dict[str, int]:
        """Skips counted since the previous call (what goes into the next ``Batch.skipped``)."""
        out = dict(self.pending)
        self.pending.clear()
        return out


def _ignore_tar_error(exc: Exception) -> bool:
    """webdataset handler of the workers other than the first: they read the same bytes, the first counts errors."""
    logger.debug("tar read error (counted by data worker 0): %s", exc)
    return True


def _count_raw(src: Iterable[Dict[str, Any]], stats: SkipStats) -> Iterator[Dict[str, Any]]:
    for sample in src:
        stats.raw_samples += 1
        yield sample


def _fail_if_unproductive(src: Iterable[Dict[str, Any]], stats: SkipStats, limit: int) -> Iterator[Dict[str, Any]]:
    """Raise instead of spinning forever when ``limit`` shards in a row yield no sample at all."""
    idle, last = 0, stats.raw_samples
    for shard in src:
        idle = idle + 1 if stats.raw_samples == last else 0
        last = stats.raw_samples
        if idle > limit:
            raise TrainingDataError(
                f"{limit} consecutive training shards yielded no sample (last: {shard.get('url')!r}); "
                "check data.shards and the warnings above"
            )
        yield shard


class TrainStream(IterableDataset):
    """One rank's endless stream of :class:`Piece` s; each DataLoader worker reads the rank's sequence.

    Extension contract (``simzss.data.features`` trains from cached vision features this way): a subclass
    keeps the shard handling (rank split, shuffling, dealing to workers, equal epochs, resume, skip accounting) and
    overrides only

    - :meth:`decode_sample` ``(raw, stats) -> dict | None``: one raw tar sample (``{"__key__", "__url__",
      EXT: bytes, ...}``; members arrive as undecoded bytes) to a decoded sample dict holding at least
      ``"key"``, ``"caption"`` and ``"concepts"`` (as :meth:`decode_text` returns them), or ``None`` after
      ``stats.skip(reason, detail)``. It must never unpickle anything and must not raise on bad data.
    - :meth:`collate` ``(samples, stats) -> Batch``: decoded samples (a chunk of a batch, at least one) to a
      :class:`Batch`; :meth:`text_fields` gives the tokenised caption fields (concepts extracted on the
      fly for samples without them) and ``stats.drain()`` the skip counts. The loader joins chunks with
      :meth:`Batch.cat`, so tensors other than the token fields must be stacked along the first dimension.

    Both run inside the DataLoader workers, so subclasses must be picklable (plain attributes set in
    ``__init__``). During iteration ``self.epoch`` and ``self.stream_seed`` hold the epoch and seed of
    the samples being produced (e.g. to pick a per-epoch view deterministically).
    """

    def __init__(
        self,
        urls: List[str],
        cfg: DataConfig,
        tokenizer: "PreTrainedTokenizerBase",
        bank: "ConceptBank",
        *,
        batch_size: int,
        context_length: int,
        rank: int,
        world_size: int,
        num_batches: int,
        state: SharedState,
        shard_sizes: Optional[Dict[str, int]] = None,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.bank = bank
        self.batch_size = batch_size
        self.context_length = context_length
        self.rank = rank
        self.world_size = world_size
        self.num_batches = num_batches
        self.samples_per_epoch = num_batches * batch_size  # output positions of one epoch on this rank
        self.chunk = chunk_size(batch_size, state.num_workers)
        self.state = state
        # samples per shard URL (sizes.json) lets each rank skip to its range unread; None: looked up here
        self.shard_sizes = shard_sizes if shard_sizes is not None else shard_sizes_of(urls)
        self.epoch = 0  # of the samples being produced; set by __iter__ in each worker
        self.stream_seed = 0
        self.decode = getattr(cfg, "decode", "cpu")
        self.crop = train_crop(cfg.image_size, cfg.crop_scale, cfg.interpolation)  # the pil decoder's crop
        self.min_decode_size = decode_min_size(cfg.image_size, cfg.crop_scale)
        self._extractor: Optional["ConceptExtractor"] = None  # created lazily, per worker
        self._warned_on_the_fly = False

    # -- pipeline -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Piece]:
        in_worker = get_worker_info() is not None
        try:
            for piece in self._pieces():
                yield piece.packed() if in_worker else piece
        except TrainingDataError as exc:  # handed over as data: a worker's exception would arrive as a traceback
            yield Piece(0, 0, [], None, error=str(exc))

    def _pieces(self) -> Iterator[Piece]:
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        _, seed, position = self.state.get()
        per_epoch = self.samples_per_epoch
        epoch = position // per_epoch
        first = position - epoch * per_epoch
        stats = SkipStats(slot)
        chunk = 0  # chunks dealt since the pass started: chunk j belongs to worker j % workers
        while True:
            self.epoch, self.stream_seed = epoch, seed
            base = epoch * per_epoch
            order = self._epoch_order(epoch, seed, stats, count_errors=slot == 0)
            todo = itertools.islice(order, first, None)  # read (to rebuild the buffer), not decoded
            for t in range(first, per_epoch, self.chunk):
                items = list(itertools.islice(todo, self.chunk))
                if not items:
                    break  # fewer samples than per_epoch (only with data.num_samples above the data): next epoch
                mine = chunk % workers == slot
                chunk += 1
                if mine:
                    yield self._piece(base, t, items, stats)
            first = 0
            epoch += 1

    def _epoch_order(self, epoch: int, seed: int, stats: SkipStats, count_errors: bool) -> Iterator[Tuple[int, Any]]:
        """``(read index, raw sample)`` of this rank's samples of ``epoch``, in shuffled (output) order: a finite
        sequence of at most ``samples_per_epoch`` items (exactly that many unless the data ran short)."""
        if self.cfg.resampled:
            # Shards drawn with replacement from a deterministic (seed, epoch, rank) generator; no split needed.
            shards: List[Any] = [
                wds.ResampledShards(
                    self.urls,
                    seed=make_seed(seed, epoch),
                    worker_seed=partial(rank_seed, self.rank),
                    deterministic=True,
                )
            ]
        else:
            # An endless, per-pass reshuffled shard list (the same order on every rank). With known shard sizes
            # each rank reads its own contiguous range of that sample sequence, so an epoch covers each sample
            # once whatever the shard sizes; without them the list is split by rank, shard by shard.
            shards = [partial(repeated_shards, self.urls, make_seed(seed, epoch))]
            if self.shard_sizes is None:
                shards.append(partial(split_by_node, rank=self.rank, world_size=self.world_size))
        head = [0]
        ranged = not self.cfg.resampled and self.shard_sizes is not None
        if ranged:
            start = self.rank * self.samples_per_epoch
            shards.append(partial(skip_shards_before, sizes=self.shard_sizes, start=start, head=head))
        stages: List[Any] = [
            *shards,
            partial(_fail_if_unproductive, stats=stats, limit=4 * len(self.urls) + 32),
            partial(indexed_samples, handler=stats.tar_error if count_errors else _ignore_tar_error, warn=count_errors),
            partial(_count_raw, stats=stats),
        ]
        if ranged:
            stages.append(partial(drop_head, head=head))
        raw = itertools.islice(iter(wds.DataPipeline(*stages)), self.samples_per_epoch)
        return buffered_shuffle(enumerate(raw), self.cfg.shuffle_buffer, make_seed(seed, epoch, self.rank))

    def _piece(self, base: int, start: int, items: List[Tuple[int, Any]], stats: SkipStats) -> Piece:
        """Decode one chunk, each sample under its own torch seed (stream seed, epoch, rank, read index).

        torchvision's random crops draw from the global torch RNG; forking it per sample makes every crop a
        function of the sample's place in the epoch only (replayed exactly on resume, with any number of workers,
        whatever the process RNG holds) and leaves the caller's RNG untouched (the in-process ``workers=0`` path
        shares it with training). Only the CPU generator is forked and seeded; CUDA generators are never touched.
        """
        samples, positions = [], []
        crop_seed = make_seed(self.stream_seed, self.epoch, self.rank)
        for offset, (read_index, raw) in enumerate(items):
            try:
                raw = read_members(raw)  # the bytes of this worker's own samples only (tar_members)
            except OSError as exc:
                stats.skip("read_error", f"{sample_location(raw)}: {exc}"[:500])
                continue
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(make_seed(crop_seed, read_index))
                sample = self.decode_sample(raw, stats)
            if sample is not None:
                samples.append(sample)
                positions.append(base + start + offset)
        stop = base + start + len(items)
        if not samples:
            return Piece(base + start, stop, [], None, stats.drain())
        return Piece(base + start, stop, positions, self.collate(samples, stats))

    # -- decoding (extension point) ---------------------------------------------------------------

    def decode_sample(self, raw: Dict[str, Any], stats: SkipStats) -> Optional[Dict[str, Any]]:
        """Decode the image, caption and concepts of one raw tar sample; None (counted) if unusable.

        Returns ``{"key", "caption", "concepts", "image"}`` (``image``: the uint8 random crop; with
        ``data.decode=gpu`` the encoded JPEG, plus ``"box"``, see :func:`simzss.data.decode.plan_crop`). Only these
        members are read; anything else (``.json`` metadata, ``.pyd``/``.pickle``/``.pth``...) is dropped as
        raw bytes and never deserialised. Images over ``data.max_image_pixels`` (after reduced-size JPEG
        decoding) are skipped as ``image_too_large``, undecodable ones as ``corrupt_image``.
        """
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_ext is None:
            stats.skip("missing_image", sample_location(raw))
            return None
        sample = self.decode_text(raw, stats)
        if sample is None:
            return None
        cfg, data = self.cfg, raw[image_ext]
        try:
            if self.decode == "pil":
                sample["image"] = self.crop(decode_image(data, self.min_decode_size, cfg.max_image_pixels))
            elif self.decode == "gpu":
                sample["image"], sample["box"] = plan_crop(data, cfg.image_size, cfg.crop_scale, cfg.interpolation,
                                                           cfg.max_image_pixels, sample_location(raw))
            else:
                sample["image"] = decode_crop(data, cfg.image_size, cfg.crop_scale, cfg.interpolation,
                                              cfg.max_image_pixels, sample_location(raw))
        except ImageTooLargeError as exc:
            stats.skip("image_too_large", f"{sample_location(raw)}: {exc}"[:500])
            return None
        except Exception as exc:  # untrusted bytes: decoders raise many types (OSError, ValueError, RuntimeError...)
            stats.skip("corrupt_image", f"{sample_location(raw)}: {type(exc).__name__}: {exc}"[:500])
            return None
        return sample

    def decode_text(self, raw: Dict[str, Any], stats: SkipStats) -> Optional[Dict[str, Any]]:
        """The caption side of a raw sample: ``{"key", "caption", "concepts"}``, or None (counted) if unusable.

        ``concepts`` are the in-bank ``(class id, char spans)`` of ``KEY.concepts.json``, or None when the
        sample has none (:meth:`text_fields` then extracts them with spaCy). Skip reasons:
        ``missing_caption``, ``caption_not_utf8``, ``empty_caption``, ``caption_too_long`` (over
        :data:`~simzss.data.shards.MAX_CAPTION_CHARS` characters), ``bad_concepts``.
        """
        where = sample_location(raw)
        caption_bytes = raw.get(CAPTION_EXTENSION)
        if caption_bytes is None:
            stats.skip("missing_caption", where)
            return None
        try:
            caption = caption_bytes.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("caption_not_utf8", where)
            return None
        if not caption.strip():  # kept unstripped: concept char spans index the caption as stored
            stats.skip("empty_caption", where)
            return None
        if len(caption) > MAX_CAPTION_CHARS:  # spaCy refuses (E088) or crawls; the tokenizer would truncate it
            stats.skip("caption_too_long", f"{where}: {len(caption)} characters")
            return None
        concepts: Optional[ConceptSpans] = None
        if CONCEPTS_EXTENSION in raw:
            try:
                concepts = self.parse_concepts(raw[CONCEPTS_EXTENSION])
            except ValueError as exc:
                stats.skip("bad_concepts", f"{where}: {exc}"[:500])
                return None
        return {"key": str(raw.get("__key__")), "caption": caption, "concepts": concepts}

    def parse_concepts(self, data: bytes) -> ConceptSpans:
        """In-bank concepts of a ``KEY.concepts.json`` member as (class id, char spans); ValueError if invalid."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"invalid concepts.json: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("concepts"), list):
            raise ValueError("concepts.json must be {'version': 1, 'concepts': [...]}")
        return self._in_bank(Concept.from_json(d) for d in doc["concepts"])

    def _in_bank(self, concepts: Iterable[Any]) -> ConceptSpans:
        out: ConceptSpans = []
        for c in concepts:
            class_id = self.bank.lookup(c.concept)
            if class_id is not None:
                out.append((class_id, [tuple(s) for s in c.spans]))
        return out

    # -- batching (extension point) ---------------------------------------------------------------

    def annotate(self, captions: List[str]) -> List[ConceptSpans]:
        """Concepts of captions whose shard has no concepts.json, extracted with spaCy in this worker."""
        if self._extractor is None:
            self._extractor = ConceptExtractor(self.cfg.spacy_model, lowercase=self.cfg.lowercase_concepts)
        if not self._warned_on_the_fly:
            self._warned_on_the_fly = True
            logger.warning(
                "shards without concepts.json: extracting concepts with spaCy (%s) in the data workers, "
                "which is much slower; run `simzss prepare` on the shards once instead",
                self.cfg.spacy_model,
            )
        return [self._in_bank(cs) for cs in self._extractor(captions)]

    def text_fields(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The caption-side ``Batch`` fields of decoded samples (``input_ids``, ``attention_mask``,
        ``concept_mask``, ``concept_labels``, ``captions``, ``keys``); missing concepts are extracted first."""
        captions = [s["caption"] for s in samples]
        concepts = [s["concepts"] for s in samples]
        missing = [i for i, c in enumerate(concepts) if c is None]
        if missing:
            for i, found in zip(missing, self.annotate([captions[i] for i in missing])):
                concepts[i] = found
        tokens = tokenize_batch(
            self.tokenizer, captions, concepts, self.context_length, max_concepts=self.cfg.max_concepts
        )
        return {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "concept_mask": tokens["concept_mask"],
            "concept_labels": tokens["concept_labels"],
            "captions": captions,
            "keys": [s["key"] for s in samples],
        }

    def collate(self, samples: List[Dict[str, Any]], stats: SkipStats) -> Batch:
        """A :class:`Batch` of decoded samples: stacked uint8 crops (or the encoded JPEGs and their crop boxes)
        + :meth:`text_fields`; images are normalised on the device (:func:`simzss.data.device.to_device`)."""
        text = self.text_fields(samples)
        if self.decode == "gpu":
            encoded = EncodedImages([s["image"] for s in samples], torch.stack([s["box"] for s in samples]),
                                    self.cfg.image_size, self.cfg.interpolation)
            return Batch(images=None, encoded=encoded, skipped=stats.drain(), **text)
        return Batch(images=torch.stack([s["image"] for s in samples]), skipped=stats.drain(), **text)


def sample_location(raw: Dict[str, Any]) -> str:
    """``KEY in URL`` of a raw tar sample, for skip messages."""
    return f"{raw.get('__key__')} in {raw.get('__url__')}"


def check_loader_args(*, batch_size: int, context_length: int, rank: int, world_size: int, workers: int) -> None:
    """ValueError naming the bad argument of a loader builder (shared by the image and feature-cache loaders)."""
    if batch_size < 1 or context_length < 2:
        raise ValueError(f"batch_size must be >= 1 and context_length >= 2, got {batch_size}, {context_length}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if workers < 0:
        raise ValueError(f"data.workers must be >= 0, got {workers}")


def check_decoder(decode: str) -> None:
    """ValueError unless ``data.decode`` is one of :data:`DECODERS` and, for ``gpu``, a CUDA device is visible."""
    if decode not in DECODERS:
        raise ValueError(f"data.decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    if decode == "gpu" and not torch.cuda.is_available():
        raise ValueError("data.decode=gpu needs a CUDA GPU and none is visible; use data.decode=cpu")


# --------------------------------------------------------------------------------------------------
# The loader of one rank (the class lives in simzss.data.loader)
# --------------------------------------------------------------------------------------------------


def build_train_loader(
    cfg: DataConfig,
    tokenizer: "PreTrainedTokenizerBase",
    bank: "ConceptBank",
    *,
    batch_size: int,
    context_length: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> TrainLoader:
    """The training loader of one rank: ``len()`` = ``num_samples // (batch_size * world_size)`` batches.

    ``num_samples`` is ``cfg.num_samples`` or the sum of ``sizes.json`` over the matched shards.
    """
    cfg = dataclasses.replace(cfg, workers=resolve_workers(cfg.workers))
    check_loader_args(
        batch_size=batch_size, context_length=context_length, rank=rank, world_size=world_size, workers=cfg.workers
    )
    if not cfg.shards:
        raise ValueError("no training shards: set data.shards (paths, brace patterns, pipe: commands or URLs)")
    check_decoder(cfg.decode)
    urls = expand_shards(cfg.shards, what="training shard", allow_pipe_in_lists=cfg.allow_pipe_in_shard_lists)
    num_samples = cfg.num_samples if cfg.num_samples is not None else count_samples(urls)
    num_batches = batches_per_epoch(num_samples, batch_size, world_size)
    if num_batches < 1:
        raise ValueError(
            f"{num_samples} samples per epoch are fewer than one global batch "
            f"({batch_size} x {world_size} ranks); lower batch_size or set data.num_samples"
        )
    if cfg.workers > 0:
        # Tokenising in forked workers after the parent used the Rust thread pool would deadlock-warn.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_index_coverage(urls)
    state = SharedState(cfg.workers, seed=seed)
    dataset = TrainStream(
        urls,
        cfg,
        tokenizer,
        bank,
        batch_size=batch_size,
        context_length=context_length,
        rank=rank,
        world_size=world_size,
        num_batches=num_batches,
        state=state,
    )
    logger.info(
        "training stream: %d shards, %d samples/epoch, %d batches/epoch/rank (rank %d of %d, %d workers%s)",
        len(urls),
        num_samples,
        num_batches,
        rank,
        world_size,
        cfg.workers,
        ", resampled" if cfg.resampled else "",
    )
    return TrainLoader(dataset, num_samples=num_samples, num_workers=cfg.workers, seed=seed)


__all__ = [
    "Batch",
    "TrainLoader",
    "TrainStream",
    "SharedState",
    "SkipStats",
    "ConceptSpans",
    "build_train_loader",
    "TrainingDataError",
    "check_loader_args",
    "sample_location",
    "expand_shards",
    "count_samples",
    "local_shard_path",
    "batches_per_epoch",
    "shard_sizes_of",
    "check_decoder",
    "DECODERS",
    "Piece",
]
