"""The webdataset training stream: tar shards -> decoded, augmented, tokenised :class:`Batch` es.

Layout of one rank's stream (everything below the DataLoader runs inside each worker):

    shard list (repeated forever, reshuffled every pass with seed/epoch/pass, the same order on every rank;
    or resampled with replacement) -> this rank's and worker's share (below)
    -> tar reading (errors logged + counted) -> sample shuffle buffer
    -> explicit decode (images / UTF-8 text / JSON only, nothing else is ever decoded or unpickled)
    -> batching -> concepts (from ``KEY.concepts.json`` or spaCy on the fly) + tokenisation -> Batch

Equal epochs on every rank: each worker's stream is infinite, and worker ``w`` of ``W`` emits exactly
``num_batches // W + (w < num_batches % W)`` batches, so every rank's DataLoader yields exactly
``num_batches = num_samples // (batch_size * world_size)`` batches whatever the shard sizes (no DDP hang).

Every sample once per epoch: ranks and workers split the *sample* sequence, not the shards (with uneven shards,
e.g. 3 + 200 samples, a shard split makes some readers re-read the start of the big one):

- shard sizes known (``sizes.json`` of local shards, the normal case): worker role ``w`` of rank ``r`` takes the
  contiguous range of samples ``[B * (r * num_batches + s_0 + ... + s_{w-1}), ...)`` of the epoch's sequence,
  where ``s_v`` is role ``v``'s batch share and ``B`` the batch size. It skips whole shards before its range
  unread (sizes say how long they are) and reads at most one shard's head in vain, so every shard is read about
  once per epoch, by all ranks together.
- sizes unknown: ranks take every ``world_size``-th shard of the list; then, for local shards, role ``w`` keeps
  the blocks ``w, w + W, ...`` of ``B`` consecutive samples of the rank's shards (every worker reads, not decodes,
  them all; they advance together, so after the first read the bytes come from the page cache); for
  ``pipe:``/URL shards the workers split the rank's shards (each fetched once). With uneven shards an epoch then
  covers the samples only approximately once.

With known sizes and no skipped samples an epoch thus covers each sample exactly once over all ranks and workers,
except the last ``num_samples % (batch_size * world_size)`` (the dropped partial global batch); skipped samples are
replaced by the ones that follow.

Resume: the loader tracks how many batches each worker has delivered in the current epoch. The
DataLoader takes batches from workers strictly round-robin (skipping finished workers), so that count
is known exactly in the main process. On resume every worker replays its stream (same seeds) and
discards the batches it had already delivered before collation/tokenisation. Cost: those samples are
read, decoded and augmented again (about ``consumed / num_batches`` of an epoch's loading work, spread
over the workers), but nothing is tokenised or sent between processes. A resumed DataLoader starts its
round-robin at worker 0, so worker slots are rotated: slot ``w`` plays the *role* of original worker
``(w + offset) % W`` (``offset`` = the role that was next), and everything a worker does (shard split,
shuffle seed, crop seeds, share, skip count) depends on its role, not on its slot.

Random crops: each sample is decoded under its own torch RNG seed derived from (seed, epoch, rank,
role, sample index in the role's stream), inside ``torch.random.fork_rng``, so crops neither read nor
disturb the process-wide RNG and a replayed stream re-crops every sample identically. Resumed with the
same shards, ``seed``, ``world_size`` and number of workers, the stream continues bit for bit (keys and
image tensors) as if it had not stopped; with another number of workers it continues approximately.

Extending: :class:`TrainStream` is public so that other sample formats reuse all of the above; a subclass
overrides :meth:`TrainStream.decode_sample` and :meth:`TrainStream.collate` (see its docstring and
docs/CONTRACTS.md) and is wrapped in a :class:`TrainLoader` with its own :class:`SharedState`
(``simzss.data.features`` does this for cached vision features).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.utils import make_seed

from simzss.concepts import Concept, ConceptBank, ConceptExtractor
from simzss.config import DataConfig
from simzss.data.shards import (
    IMAGE_EXTENSIONS,
    MAX_CAPTION_CHARS,
    expand_shards,
    local_shard_path,
)
from simzss.data.batch import Batch
from simzss.data.sampling import (
    SharedState,
    batches_per_epoch,
    count_samples,
    drop_head,
    repeated_shards,
    role_seed,
    select_role_blocks,
    shard_sizes_of,
    skip_shards_before,
    split_by_node,
    split_by_role,
    worker_share,
)
from simzss.data.tokenize import tokenize_batch
from simzss.data.transforms import ImageTooLargeError, decode_image, decode_min_size, normalize_batch, train_crop

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CAPTION_EXTENSION = "txt"
CONCEPTS_EXTENSION = "concepts.json"

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
    """webdataset handler of the workers other than role 0: the same read error is counted once, by role 0."""
    logger.debug("tar read error (counted by worker role 0): %s", exc)
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
            raise RuntimeError(
                f"{limit} consecutive training shards yielded no sample (last: {shard.get('url')!r}); "
                "check data.shards and the warnings above"
            )
        yield shard


def _group(src: Iterable[Dict[str, Any]], size: int) -> Iterator[List[Dict[str, Any]]]:
    """Full lists of ``size`` samples (the stream is endless, so there is never a partial one).

    Unlike ``wds.batched``, a list is emitted as soon as it is full rather than when the next sample
    arrives, so the skips counted while filling it belong to it and nothing is read ahead.
    """
    it = iter(src)
    while len(group := list(itertools.islice(it, size))) == size:
        yield group


def _skip_batches(src: Iterable[List[Dict[str, Any]]], n: int, stats: SkipStats) -> Iterator[List[Dict[str, Any]]]:
    """Drop the first ``n`` (already consumed) sample lists; their skip counts were reported before."""
    it = iter(src)
    if n > 0:
        for _ in itertools.islice(it, n):
            pass
        stats.drain()
    yield from it


class TrainStream(IterableDataset):
    """One rank's stream of :class:`Batch` es; each DataLoader worker builds its own wds pipeline.

    Extension contract (``simzss.data.features`` trains from cached vision features this way): a subclass
    keeps the shard handling (rank/worker split, shuffling, equal epochs, resume, skip accounting) and
    overrides only

    - :meth:`decode_sample` ``(raw, stats) -> dict | None``: one raw tar sample (``{"__key__", "__url__",
      EXT: bytes, ...}``; members arrive as undecoded bytes) to a decoded sample dict holding at least
      ``"key"``, ``"caption"`` and ``"concepts"`` (as :meth:`decode_text` returns them), or ``None`` after
      ``stats.skip(reason, detail)``. It must never unpickle anything and must not raise on bad data.
    - :meth:`collate` ``(samples, stats) -> Batch``: exactly ``batch_size`` decoded samples to a
      :class:`Batch`; :meth:`text_fields` gives the tokenised caption fields (concepts extracted on the
      fly for samples without them) and ``stats.drain()`` the skip counts.

    Both run inside the DataLoader workers, so subclasses must be picklable (plain attributes set in
    ``__init__``). During iteration ``self.epoch`` and ``self.stream_seed`` hold the epoch and seed of
    the stream being produced (e.g. to pick a per-epoch view deterministically).
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
        self.state = state
        # samples per shard URL (sizes.json) lets each worker skip to its range unread; None: looked up here
        self.shard_sizes = shard_sizes if shard_sizes is not None else shard_sizes_of(urls)
        self.epoch = 0  # of the stream being produced; set by __iter__ in each worker
        self.stream_seed = 0
        self.crop = train_crop(cfg.image_size, cfg.crop_scale, cfg.interpolation)  # uint8 per image; normalised per batch
        self.min_decode_size = decode_min_size(cfg.image_size, cfg.crop_scale)
        self._extractor: Optional["ConceptExtractor"] = None  # created lazily, per worker
        self._warned_on_the_fly = False

    # -- pipeline -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        slot, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = self.state.role(slot) if num_workers > 1 else 0  # everything below depends on the role only
        epoch, seed, skip = self.state.get(worker)
        self.epoch, self.stream_seed = epoch, seed
        todo = worker_share(self.num_batches, worker, num_workers) - skip
        if todo <= 0:
            return iter(())
        stats = SkipStats(worker)
        if self.cfg.resampled:
            # Each worker draws shards with replacement from its own deterministic (seed, epoch, rank,
            # role) generator; no split is needed.
            shards: List[Any] = [
                wds.ResampledShards(
                    self.urls,
                    seed=make_seed(seed, epoch),
                    worker_seed=partial(role_seed, self.rank, worker),
                    deterministic=True,
                )
            ]
        else:
            # An endless, per-pass reshuffled shard list (the same order on every rank). With known shard sizes
            # every (rank, worker role) reads its own contiguous range of that sample sequence, so an epoch covers
            # each sample once whatever the shard sizes; without them the list is split by rank, shard by shard
            # (every rank always has shards, however few there are), and the rank's workers share its samples
            # block by block (module docstring).
            shards = [partial(repeated_shards, self.urls, make_seed(seed, epoch))]
            if self.shard_sizes is None:
                shards.append(partial(split_by_node, rank=self.rank, world_size=self.world_size))
        ranged = not self.cfg.resampled and self.shard_sizes is not None
        split = "none" if self.cfg.resampled or (num_workers == 1 and not ranged) else self._worker_split()
        head = [0]
        if split == "range":
            before = self.rank * self.num_batches + sum(worker_share(self.num_batches, v, num_workers)
                                                        for v in range(worker))
            start = self.batch_size * before
            shards.append(partial(skip_shards_before, sizes=self.shard_sizes, start=start, head=head))
        elif split == "shards":
            shards.append(partial(split_by_role, role=worker, num_workers=num_workers))
        stages: List[Any] = [
            *shards,
            partial(_fail_if_unproductive, stats=stats, limit=4 * len(self.urls) + 32),
            wds.tarfile_to_samples(handler=_ignore_tar_error if split == "blocks" and worker else stats.tar_error),
            partial(_count_raw, stats=stats),
        ]
        if split == "range":
            stages.append(partial(drop_head, head=head))
        elif split == "blocks":
            stages.append(partial(select_role_blocks, role=worker, num_workers=num_workers, block=self.batch_size))
        if self.cfg.shuffle_buffer > 1:
            buf = self.cfg.shuffle_buffer
            stages.append(wds.shuffle(buf, initial=min(buf, 100), seed=make_seed(seed, epoch, self.rank, worker)))
        stages += [
            partial(self._decode_samples, stats=stats, crop_seed=make_seed(seed, epoch, self.rank, worker)),
            partial(_group, size=self.batch_size),
            partial(_skip_batches, n=skip, stats=stats),
            wds.map(partial(self.collate, stats=stats)),
        ]
        return iter(wds.DataPipeline(*stages).with_epoch(todo))

    def _worker_split(self) -> str:
        """How this rank's workers share its stream (module docstring): range | blocks | shards."""
        if self.shard_sizes is not None:
            return "range"
        return "blocks" if all(local_shard_path(u) is not None for u in self.urls) else "shards"

    def _decode_samples(
        self, src: Iterable[Dict[str, Any]], stats: SkipStats, crop_seed: int
    ) -> Iterator[Dict[str, Any]]:
        """Decode raw samples, each under its own torch seed (``crop_seed``, index in this role's stream).

        torchvision's random crops draw from the global torch RNG; forking it per sample makes every crop a
        function of the sample's position only (replayed exactly on resume, whatever the process RNG holds)
        and leaves the caller's RNG untouched (the in-process ``workers=0`` path shares it with training).
        Only the CPU generator is forked and seeded; CUDA generators are never touched.
        """
        for index, raw in enumerate(src):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(make_seed(crop_seed, index))
                sample = self.decode_sample(raw, stats)
            if sample is not None:
                yield sample

    # -- decoding (extension point) ---------------------------------------------------------------

    def decode_sample(self, raw: Dict[str, Any], stats: SkipStats) -> Optional[Dict[str, Any]]:
        """Decode the image, caption and concepts of one raw tar sample; None (counted) if unusable.

        Returns ``{"key", "caption", "concepts", "image"}`` (``image``: the uint8 random crop). Only these
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
        try:
            sample["image"] = self.crop(decode_image(raw[image_ext], self.min_decode_size, self.cfg.max_image_pixels))
        except ImageTooLargeError as exc:
            stats.skip("image_too_large", f"{sample_location(raw)}: {exc}"[:500])
            return None
        except Exception as exc:  # untrusted bytes: PIL raises many types (OSError, ValueError, SyntaxError, ...)
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
        """A :class:`Batch` of decoded samples: stacked, ImageNet-normalised crops + :meth:`text_fields`."""
        text = self.text_fields(samples)
        return Batch(
            images=normalize_batch(torch.stack([s["image"] for s in samples])),
            skipped=stats.drain(),
            **text,
        )


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


# --------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------


def _identity(x: Batch) -> Batch:
    return x


class TrainLoader:
    """Iterable of :class:`Batch`; ``len()`` batches per epoch, identical on every rank.

    Iterating runs (the rest of) the current epoch; when an epoch is exhausted the loader moves on to
    the next one by itself. ``set_epoch(e)`` selects epoch ``e`` (from its start, unless ``e`` is the
    current epoch, so that a resumed mid-epoch position survives the trainer's usual ``set_epoch``).
    """

    def __init__(self, dataset: TrainStream, *, num_samples: int, num_workers: int, seed: int) -> None:
        self.dataset = dataset
        self.num_samples = num_samples
        self.num_batches = dataset.num_batches
        self.num_workers = num_workers
        self.seed = seed
        self.epoch = 0
        self._done = [0] * max(1, num_workers)  # batches delivered by each worker in this epoch
        generator = torch.Generator()
        generator.manual_seed(make_seed(seed, dataset.rank))  # worker base seeds (crops are seeded per sample)
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_identity,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    @property
    def batches_consumed(self) -> int:
        """Batches of the current epoch already handed out."""
        return sum(self._done)

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``; restarts it from its first batch unless it is already the current epoch."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._done = [0] * len(self._done)

    def __iter__(self) -> Iterator[Batch]:
        workers = len(self._done)
        shares = [worker_share(self.num_batches, w, workers) for w in range(workers)]
        remaining = [s - d for s, d in zip(shares, self._done)]
        if sum(remaining) > 0:
            # A fresh DataLoader pass starts its round-robin at worker 0: rotate the roles so that worker 0
            # plays the role that was next (the uninterrupted order is role = batch index % workers).
            offset = sum(self._done) % workers
            self.dataset.state.set(self.epoch, self.seed, self._done, offset=offset)
            # The DataLoader returns batches strictly round-robin over the workers that still have
            # some, so this schedule says which role produced each batch.
            roles = [(w + offset) % workers for w in range(workers)]
            schedule = [role for r in range(max(remaining)) for role in roles if remaining[role] > r]
            batches = iter(self.loader)
            for produced, worker in enumerate(schedule):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise RuntimeError(f"training stream ended after {produced} of {len(schedule)} batches") from None
                self._done[worker] += 1
                yield batch
        self.epoch += 1
        self._done = [0] * workers

    def state_dict(self) -> Dict[str, Any]:
        """Resume position: epoch, batches consumed (in total and per worker) and the stream seed."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "worker_batches": list(self._done),
            "num_batches": self.num_batches,
            "seed": self.seed,
            "resampled": bool(self.dataset.cfg.resampled),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: same epoch, same stream seed, consumed batches skipped."""
        try:
            epoch, consumed, seed = int(state["epoch"]), int(state["batches_consumed"]), int(state["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid TrainLoader state {state!r}") from exc
        if state.get("num_batches", self.num_batches) != self.num_batches:
            logger.warning(
                "epoch size changed since the checkpoint (%s -> %d batches); resuming by batch count",
                state.get("num_batches"),
                self.num_batches,
            )
        workers = len(self._done)
        per_worker = state.get("worker_batches")
        if not (isinstance(per_worker, list) and len(per_worker) == workers and sum(per_worker) == consumed):
            if consumed:
                logger.warning(
                    "the checkpoint was written with a different number of data workers; the rest of epoch %d "
                    "is approximate (%d batches skipped)",
                    epoch,
                    consumed,
                )
            per_worker = [math.ceil(max(0, consumed - w) / workers) for w in range(workers)]
        shares = [worker_share(self.num_batches, w, workers) for w in range(workers)]
        self.epoch, self.seed = epoch, seed
        self._done = [min(int(d), s) for d, s in zip(per_worker, shares)]


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
    check_loader_args(
        batch_size=batch_size, context_length=context_length, rank=rank, world_size=world_size, workers=cfg.workers
    )
    if not cfg.shards:
        raise ValueError("no training shards: set data.shards (paths, brace patterns, pipe: commands or URLs)")
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
    "check_loader_args",
    "sample_location",
    "expand_shards",
    "count_samples",
    "local_shard_path",
    "batches_per_epoch",
    "worker_share",
    "shard_sizes_of",
]
