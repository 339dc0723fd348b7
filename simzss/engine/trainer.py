"""The SimZSS / LiT trainer (``simzss train``): accelerate DDP, checkpoints, preemption, evaluation.

Runs as a plain process or under ``accelerate launch`` (multi-GPU, multi-node). Only the model,
optimizer and scheduler go through ``accelerator.prepare``; the webdataset stream is built per rank
from the accelerator's rank and world size. One loop iteration = one batch = one optimizer step
(``step`` counts batches consumed, including skipped non-finite ones, so the schedule and the data
position stay aligned).

With ``data.feature_cache`` set, batches come from ``simzss.data.features.build_cached_loader`` and carry the
frozen tower's features, so the tower never runs in a training step. It is still built (frozen, cheap to
hold) for the zero-shot evaluation hook and for exports, and its weights fingerprint must match the
cache's ``meta.json`` (:func:`simzss.engine.startup_checks.check_feature_cache`): features from other weights are
refused. The checks that run before training are in :mod:`simzss.engine.startup_checks`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from simzss.concepts import ConceptBank
from simzss.config import ConfigError, TrainConfig, to_dict, to_yaml
from simzss.data.features import CacheError, build_cached_loader
from simzss.data.padding import trim_padding
from simzss.data.stream import build_train_loader
from simzss.data.tokenize import load_tokenizer
from simzss.engine import checkpoint as ckpt_io
from simzss.engine.epoch_position import loader_state_at, resume_position, steps_to_finish
from simzss.engine.optim import build_optimizer, build_scheduler, match_fused_state, step_unless
from simzss.engine.prefetch import DeviceFeed
from simzss.engine.signals import GracefulStop
from simzss.engine.startup_checks import (
    check_eval_datasets, check_feature_cache, check_world, missing_eval_path, validate_config,
)
from simzss.engine.tracking import MetricLogger, ThroughputWindow, new_run_id
from simzss.eval import evaluate_segmentation
from simzss.logs import progress
from simzss.models.pretrained import write_text_config
from simzss.models.simzss import SimZSS
from simzss.models.zeroshot import get_mean_std

log = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; a checkpoint was written before raising."""


def resolve_mixed_precision(setting: str, use_cuda: bool) -> str:
    """``auto``: bf16 on a GPU that supports it (fp16 on older GPUs), full fp32 on the CPU."""
    if setting != "auto":
        return setting
    if not use_cuda:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def needs_find_unused(cfg: TrainConfig) -> bool:
    """Whether DDP must look for parameters without a gradient in a step.

    The frozen vision tower has ``requires_grad=False`` and is ignored by DDP. Every trainable
    parameter of SimZSS (scratch text tower, projection, the one logit scale, which the concept loss
    shares when ``concept_scale`` is null) feeds the global loss every step, in LiT too, so the
    cheaper ``find_unused_parameters=False`` is safe. A pretrained HF text model may carry heads the
    tower never calls (e.g. a BERT pooler): then DDP has to search.
    """
    if cfg.find_unused_parameters is not None:
        return cfg.find_unused_parameters
    return cfg.model.text.kind != "scratch"


# --- builders (module level so tests can substitute small fakes) --------------------------------


def build_tokenizer(cfg: TrainConfig) -> Any:
    """The text tokenizer named by ``cfg.model.tokenizer``."""
    return load_tokenizer(cfg.model.tokenizer)


def build_model(cfg: TrainConfig, tokenizer: Any) -> nn.Module:
    """The SimZSS model, always with its frozen vision tower.

    With a feature cache the tower does not run in training steps (batches carry its features), but the
    evaluation hook and exports need it, and the trainer checks its weights against the cache.
    """
    return SimZSS.from_config(cfg.model, tokenizer)


def build_concept_bank(cfg: TrainConfig) -> Any:
    """``data.concept_bank`` (with ``data.synonyms``), or the built-in evaluation vocabulary."""
    if cfg.data.concept_bank:
        return ConceptBank.from_file(cfg.data.concept_bank, synonyms=cfg.data.synonyms)
    return ConceptBank.default()


def build_loader(cfg: TrainConfig, tokenizer: Any, *, rank: int, world_size: int) -> Any:
    """This rank's training stream (a ``TrainLoader``): the image shards, or the feature cache when
    ``data.feature_cache`` is set (an unusable cache raises :class:`ConfigError`)."""
    kwargs = dict(batch_size=cfg.batch_size, context_length=cfg.model.text.context_length, rank=rank,
                  world_size=world_size, seed=cfg.seed)
    if cfg.data.feature_cache is None:
        return build_train_loader(cfg.data, tokenizer, build_concept_bank(cfg), **kwargs)
    if cfg.data.shards:
        log.info("data.feature_cache is set: training on %s; data.shards is not used", cfg.data.feature_cache)
    try:
        return build_cached_loader(cfg.data, tokenizer, build_concept_bank(cfg), **kwargs)
    except CacheError as e:
        raise ConfigError(f"data.feature_cache={cfg.data.feature_cache!r}: {e}") from None


def run_evaluation(cfg: TrainConfig, model: nn.Module, accelerator: Any) -> Dict[str, Any]:
    """Zero-shot segmentation on every ``cfg.eval.datasets`` spec; ``{spec: {"mIoU", ...}}`` (the trainer passes a
    config whose datasets all exist, see :func:`check_eval_datasets`)."""
    return {
        spec: evaluate_segmentation(
            model,
            spec,
            templates=cfg.eval.templates,
            short_side=cfg.eval.image_size,
            crop=cfg.eval.crop,
            stride=cfg.eval.stride,
            accelerator=accelerator,
        )
        for spec in cfg.eval.datasets
    }


# --- helpers -------------------------------------------------------------------------------------


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span many lines)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0]


def _drop_rows_after(path: Path, step: int) -> int:
    """Remove the rows of a ``{"step": N, ...}`` JSON-lines log with ``N > step`` (steps that a resume from
    ``step`` runs again) and torn lines; returns how many were removed."""
    if not path.is_file():
        return 0
    kept: List[str] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            row_step = None
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        _write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """In-place all-reduce across ranks (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def _vision_weights_needed(cfg: TrainConfig) -> bool:
    """A random-init vision tower cannot be rebuilt from its name: keep its weights in checkpoints
    (also with a feature cache: evaluating or exporting the checkpoint needs the tower)."""
    return not cfg.model.vision.pretrained and cfg.model.vision.weights is None


def _checkpoint_weights(model: nn.Module, cfg: TrainConfig) -> Dict[str, torch.Tensor]:
    state = dict(model.trainable_state_dict())
    vision = getattr(model, "vision", None)
    if _vision_weights_needed(cfg) and vision is not None:
        state.update({f"vision.{k}": v for k, v in vision.state_dict().items()})
    return state


def _load_weights(model: nn.Module, state: Dict[str, torch.Tensor], source: Path) -> None:
    """Load checkpoint weights; everything trainable must be present, frozen vision weights may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing_trainable = sorted(set(missing) & trainable)
    if unexpected or missing_trainable:
        raise ValueError(
            f"{source}: weights do not match the model built from the config "
            f"(missing: {missing_trainable[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )


class _SkipCounter:
    """Sums ``Batch.skipped`` (samples the stream dropped, by reason) over the run."""

    def __init__(self) -> None:
        self.by_reason: Counter = Counter()

    def add(self, skipped: Optional[Dict[str, int]]) -> None:
        for reason, n in (skipped or {}).items():
            self.by_reason[reason] += int(n)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


# --- the trainer ---------------------------------------------------------------------------------


class Trainer:
    """Holds the prepared objects of one run; :func:`train` is the entry point."""

    def __init__(self, cfg: TrainConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        validate_config(cfg)
        self.cfg = cfg
        use_cuda = torch.cuda.is_available() and not cfg.cpu
        if use_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.accelerator = Accelerator(
            # cpu=True also when there is no GPU: otherwise accelerate, launched by torchrun on a CPU-only
            # machine, initialises torch.distributed yet reports a single process (no DDP).
            cpu=not use_cuda,
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision, use_cuda),
            step_scheduler_with_optimizer=False,  # we step it once per optimizer step ourselves
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=needs_find_unused(cfg))],
        )
        acc = self.accelerator
        check_world(acc.num_processes)
        self.is_main = acc.is_main_process
        self.run_dir = Path(cfg.output_dir) / cfg.run_name
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Nothing is written before the tokenizer, model and data are built: a run that cannot start leaves no
        # run folder (config.yaml, empty checkpoints/) behind.
        check_eval_datasets(cfg)
        try:
            self.resume_from: Optional[Path] = ckpt_io.resolve_resume(cfg.resume, self.ckpt_dir, validate=True) if cfg.resume else None
            self.resume_state: Dict[str, Any] = (
                json.loads((self.resume_from / "trainer_state.json").read_text(encoding="utf-8"))
                if self.resume_from else {}
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"resume={cfg.resume!r}: {e}") from None
        if cfg.resume == "latest" and self.resume_from is None:
            log.info("resume=latest: no checkpoint in %s yet, starting from scratch", self.ckpt_dir)
        # Continue the tracker run only when resuming this run (not when starting from another run's checkpoint).
        same_run = self.resume_from is not None and self.resume_from.parent.resolve() == self.ckpt_dir.resolve()
        self.run_id: str = (self.resume_state.get("run_id") if same_run else None) or new_run_id()

        # A cache made for another tower or image size is refused before anything is built or downloaded.
        self.cache_meta = check_feature_cache(cfg)
        set_seed(cfg.seed)  # identical model init on every rank
        try:
            self.tokenizer = build_tokenizer(cfg)
        except (OSError, ValueError, TypeError) as e:
            msg = first_line(e)
            if "simzss tokenizer" not in msg:  # load_tokenizer's own messages already say what to give
                msg += " (give the folder written by `simzss tokenizer` or a Hugging Face hub name)"
            raise ConfigError(f"model.tokenizer={cfg.model.tokenizer!r}: {msg}") from None
        try:
            model = build_model(cfg, self.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot build the model: {first_line(e)}") from None
        if hasattr(model, "equal_batch_sizes"):
            model.equal_batch_sizes = True  # both streams yield full batches: no per-step size exchange
        if hasattr(model, "right_padded_inputs"):
            # tokenize_batch (and Batch.cat) pad on the right: the causal tower need not check it on the device
            model.right_padded_inputs = True
        if cfg.model.text.compile and hasattr(model, "text"):
            model.text.compile()
        if cfg.model.vision.compile and getattr(model, "vision", None) is not None:
            model.vision.compile()
        try:
            self.loader = build_loader(cfg, self.tokenizer, rank=acc.process_index, world_size=acc.num_processes)
            if hasattr(model, "concept_classes"):
                # concept labels are ids of this bank: the concept loss sizes its class table without a host read
                model.concept_classes = len(build_concept_bank(cfg))
        except (OSError, ValueError) as e:  # missing shards or bank, no sizes, batch larger than the data...
            raise ConfigError(f"training data: {first_line(e)}") from None
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the training stream has no full batch per rank (batch_size={cfg.batch_size}, "
                f"{acc.num_processes} process(es)); check data.shards / data.num_samples"
            )
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.clean_tmp(self.ckpt_dir)
            _write_text_atomic(self.run_dir / "config.yaml", to_yaml(cfg))
        acc.wait_for_everyone()
        self.global_batch = cfg.batch_size * acc.num_processes * cfg.grad_accum
        self.total_steps = self._planned_steps()
        optimizer = build_optimizer(model, cfg.optim, self.global_batch)
        scheduler = build_scheduler(optimizer, self.total_steps, cfg.optim.warmup)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        self.step = 0
        self.epoch = 0
        self.nonfinite_total = 0
        self.consecutive_nonfinite = 0  # as of the last read of the device flags
        self.peak_nonfinite = 0  # the longest run of consecutive non-finite steps read so far in this call
        self._pending_flags: List[torch.Tensor] = []  # [bad_loss, bad_grad] of steps not read on the host yet
        self.skips = _SkipCounter()
        if self.resume_from is not None:
            self._restore(self.resume_from)
            if self.is_main:
                for name in ("metrics.jsonl", "eval_history.jsonl"):
                    n = _drop_rows_after(self.run_dir / name, self.step)
                    if n:
                        log.info("%s: removed %d row(s) after step %d (steps run again from the checkpoint)",
                                 name, n, self.step)
        else:
            set_seed(cfg.seed, device_specific=True)  # per-rank randomness from here on
        # After a resume too: the vision weights may come from the checkpoint (random-init tower).
        check_feature_cache(cfg, self.unwrapped, self.cache_meta)
        self.epoch_times: List[float] = []  # wall seconds of each whole epoch run by fit()

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # -- checkpoints --

    def save_checkpoint(self) -> Path:
        """Write ``step-N`` atomically (all ranks take part), then keep only the newest K."""
        acc, cfg = self.accelerator, self.cfg
        tmp = ckpt_io.tmp_checkpoint_dir(self.ckpt_dir, self.step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rank_state = {"rng": ckpt_io.rng_state(), "loader": self.loader.state_dict()}
        ckpt_io.save_state(rank_state, tmp, f"rank-{acc.process_index}")
        if self.is_main:
            # a failed write (a full disk) removes the temporary folder and raises DiskFullError naming step-N
            with ckpt_io.removed_on_failure(tmp, self.ckpt_dir / ckpt_io.checkpoint_name(self.step), "a checkpoint"):
                ckpt_io.save_model_weights(_checkpoint_weights(self.unwrapped, cfg), tmp / "model.safetensors")
                ckpt_io.save_state(self.optimizer.state_dict(), tmp, "optimizer")
                ckpt_io.save_state(self.scheduler.state_dict(), tmp, "scheduler")
                (tmp / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
                if hasattr(self.tokenizer, "save_pretrained"):
                    self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
                # a pretrained-kind text tower's HF config, so loading the checkpoint needs no hub access
                write_text_config(self.unwrapped, tmp)
                trainer_state = {
                    "step": self.step,
                    "epoch": self.epoch,
                    "total_steps": self.total_steps,
                    "world_size": acc.num_processes,
                    "run_id": self.run_id,
                    "nonfinite_total": self.nonfinite_total,
                    "skipped": dict(self.skips.by_reason),
                    "loader": self.loader.state_dict(),
                    # the epoch position in samples over all ranks: a resume with another batch size continues there
                    "global_batch": self.global_batch,
                    "samples_in_epoch": self.loader.state_dict()["batches_consumed"] * self.global_batch,
                    "config": to_dict(cfg),
                }
                # Written last: list_checkpoints treats a folder without it as incomplete.
                (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        acc.wait_for_everyone()
        final = self.ckpt_dir / ckpt_io.checkpoint_name(self.step)
        if self.is_main:
            final = ckpt_io.finalize_checkpoint(tmp, self.ckpt_dir, self.step, checksum=cfg.checkpoint_checksum)
            removed = ckpt_io.rotate_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
            log.info("checkpoint %s%s", final, f" (removed {len(removed)} old)" if removed else "")
        acc.wait_for_everyone()
        return final

    def _restore(self, path: Path) -> None:
        """Continue exactly where ``path`` left off: weights, optimizer, schedule, RNG, data position."""
        acc = self.accelerator
        st = self.resume_state
        # The hyperparameters come from the current config (a user lowering optim.lr after a non-finite stop
        # means it), the optimizer's moments and the schedule's position from the checkpoint.
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            _load_weights(self.unwrapped, ckpt_io.load_model_weights(path / "model.safetensors"), path)
            self.optimizer.load_state_dict(ckpt_io.load_state(path, "optimizer"))
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"resume: {path} does not fit this model/optimizer config ({first_line(e)})") from None
        match_fused_state(getattr(self.optimizer, "optimizer", self.optimizer), fresh)  # e.g. an older checkpoint
        sched = ckpt_io.load_state(path, "scheduler")
        # The schedule's shape (warmup, total steps) comes from the current config, its position from the checkpoint.
        sched["lr_lambdas"] = [None] * len(sched.get("lr_lambdas", [None]))
        self.scheduler.load_state_dict(sched)
        inner = getattr(self.scheduler, "scheduler", self.scheduler)  # accelerate's wrapper
        for group, new in zip(self.optimizer.param_groups, fresh):
            group.update({k: new[k] for k in ("weight_decay", "betas", "eps", "initial_lr") if k in new})
        inner.base_lrs = [float(new["initial_lr"]) for new in fresh]
        self._report_changed_settings(st.get("config") or {}, int(st["step"]))
        for group, base, fn in zip(self.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
            group["lr"] = base * fn(inner.last_epoch)  # as LambdaLR computes it: identical when the shape is unchanged
        self.step = int(st["step"])
        self.epoch = int(st["epoch"])
        self.nonfinite_total = int(st.get("nonfinite_total", 0))
        self.skips.by_reason.update(st.get("skipped", {}))
        if st.get("total_steps") not in (None, self.total_steps):
            log.warning("the run now has %d steps (checkpoint: %s): the schedule is stretched from here",
                        self.total_steps, st.get("total_steps"))
        rank_file = path / f"rank-{acc.process_index}.json"
        if st.get("world_size") == acc.num_processes and rank_file.exists():
            rank_state = ckpt_io.load_state(path, f"rank-{acc.process_index}")
            self.loader.load_state_dict(self._position_by_samples(rank_state["loader"]))
            ckpt_io.set_rng_state(rank_state["rng"])
        else:
            log.warning("checkpoint written by %s process(es), now %d: data position from rank 0, fresh RNG "
                        "(the run continues, not bit-exactly)", st.get("world_size"), acc.num_processes)
            self.loader.load_state_dict(self._position_by_samples(st["loader"]))
            from accelerate.utils import set_seed

            set_seed(self.cfg.seed + self.step, device_specific=True)
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    def _resume_position(self) -> Optional[Tuple[int, int]]:
        """(checkpoint's global batch, new batches already consumed in its epoch) when resuming with another
        global batch; None otherwise (:func:`~simzss.engine.epoch_position.resume_position`)."""
        return resume_position(self.resume_state, self.global_batch, self.steps_per_epoch)

    def _planned_steps(self) -> int:
        """``max_steps``, else ``epochs`` worth of steps; after a resume with another global batch, the steps that
        finish the configured epochs from the checkpoint's sample position."""
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        position = self._resume_position()
        if position is None:
            return cfg.epochs * self.steps_per_epoch
        return steps_to_finish(self.resume_state, position, self.steps_per_epoch, cfg.epochs)

    def _position_by_samples(self, loader_state: Dict[str, Any]) -> Dict[str, Any]:
        """The loader state to resume from: unchanged when the global batch is the checkpoint's, else the same
        epoch continued at the same sample, not at the same batch number."""
        position = self._resume_position()
        if position is None:
            return loader_state
        old_batch, consumed = position
        log.warning("resume: the global batch changed (%d -> %d): epoch %s continues at sample %d (batch %d of %d)",
                    old_batch, self.global_batch, self.resume_state.get("epoch"), consumed * self.global_batch,
                    consumed, self.steps_per_epoch)
        return loader_state_at(loader_state, position, self.steps_per_epoch)

    def _report_changed_settings(self, saved: Dict[str, Any], step: int) -> None:
        """Warn about each optimizer / schedule setting that differs from the checkpoint's config: the new
        values are in effect from here on (never silently replaced by the checkpoint's)."""
        now = json.loads(json.dumps(to_dict(self.cfg)))  # tuples -> lists, as stored in the checkpoint
        fields = [("optim", k) for k in now["optim"]] + [(None, k) for k in ("batch_size", "max_steps", "epochs")]
        for section, key in fields:
            old_section = saved.get(section, {}) if section else saved
            new_section = now[section] if section else now
            if isinstance(old_section, dict) and key in old_section and old_section[key] != new_section[key]:
                name = f"{section}.{key}" if section else key
                log.warning("resume: %s changed since the checkpoint (%r -> %r); the new value is used from step %d",
                            name, old_section[key], new_section[key], step)

    # -- evaluation --

    def evaluate(self, logger: MetricLogger) -> Dict[str, Any]:
        """Run the eval hook, log ``eval/...`` metrics, write ``RUN/eval.json`` (main process):
        ``{"step": N, "results": {"NAME:PATH": {"mIoU", "pixel_acc", "per_class", ...}, ...}}``."""
        specs = [spec for spec in self.cfg.eval.datasets if missing_eval_path(spec) is None]
        for spec in self.cfg.eval.datasets:
            if spec not in specs:
                log.warning("evaluation of %s skipped: %s does not exist", spec, missing_eval_path(spec))
        if not specs:
            return {}
        if getattr(self.unwrapped, "vision", None) is None:
            log.warning("the model has no vision tower: zero-shot evaluation skipped")
            return {}
        model = self.unwrapped
        model.eval()
        cfg = dataclasses.replace(self.cfg, eval=dataclasses.replace(self.cfg.eval, datasets=specs))
        try:
            with torch.no_grad():
                results = run_evaluation(cfg, model, self.accelerator)
        finally:
            model.train()
        metrics = {f"eval/{spec}/mIoU": r["mIoU"] for spec, r in results.items() if "mIoU" in r}
        logger.log(metrics, self.step)
        if self.is_main:
            _write_text_atomic(self.run_dir / "eval.json",
                               json.dumps({"step": self.step, "results": results}, indent=1, default=str))
            with open(self.run_dir / "eval_history.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        return results

    # -- the loop --

    def _feed(self) -> DeviceFeed:
        """Host batches to the device (uint8 images normalised there with the tower's statistics)."""
        mean, std = get_mean_std(self.unwrapped)
        transform = trim_padding if self.cfg.data.dynamic_padding else None  # on the CPU batch: no device sync
        return DeviceFeed(self.accelerator.device, mean=mean.tolist(), std=std.tolist(), transform=transform)

    def _train_step(self, batch: Any) -> Tuple[Any, Optional[torch.Tensor], float]:
        """Issue one optimizer step without waiting for the device; returns (model output, grad norm, lr).

        The step's non-finite flags (loss, gradient; the max over ranks, so every rank skips the same steps) stay
        on the device: the fused optimizer skips the update itself, and :meth:`_read_flags` counts them later.
        """
        acc, cfg = self.accelerator, self.cfg
        out = self.model(batch)
        loss = out.loss
        # Backward even on a bad loss (the update is skipped) so DDP ranks stay in lockstep.
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(self.trainable, cfg.optim.grad_clip or math.inf)
        bad_loss = ~torch.isfinite(loss.detach().float())
        check_grad = acc.scaler is None and isinstance(grad_norm, torch.Tensor)  # fp16: the scaler handles overflow
        bad_grad = ~torch.isfinite(grad_norm.detach().float()) if check_grad else torch.zeros_like(bad_loss)
        flags = _all_reduce(torch.stack([bad_loss, bad_grad]).float(), "max")
        self._pending_flags.append(flags)
        if acc.scaler is not None:
            self.optimizer.step()  # the GradScaler skips a step whose gradients are not finite
        else:
            step_unless(getattr(self.optimizer, "optimizer", self.optimizer), flags.amax(), self.optimizer.step)
        self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the lr of this step, logged below
        with warnings.catch_warnings():
            # torch warns when a skipped (non-finite) first step leaves the optimizer unstepped
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        return out, grad_norm, lr

    def _read_flags(self) -> None:
        """Read the non-finite flags of the steps since the last read (one host sync), count and log them."""
        if not self._pending_flags:
            return
        values = torch.stack(self._pending_flags).tolist()
        first = self.step - len(values) + 1
        self._pending_flags.clear()
        for i, (bad_loss, bad_grad) in enumerate(values):
            if bad_loss or bad_grad:
                self.nonfinite_total += 1
                self.consecutive_nonfinite += 1
                self.peak_nonfinite = max(self.peak_nonfinite, self.consecutive_nonfinite)
                log.warning("step %d: non-finite %s, update skipped (%d in a row)", first + i,
                            "loss" if bad_loss else "gradient", self.consecutive_nonfinite)
            else:
                self.consecutive_nonfinite = 0

    def _agree_stop(self, requested: Optional[str]) -> bool:
        """Whether any rank received a stop signal (a tiny all-reduce; all ranks call it at the same steps)."""
        flag = torch.tensor([1.0 if requested else 0.0], device=self.accelerator.device)
        return bool(_all_reduce(flag, "max").item())

    def fit(self) -> Dict[str, Any]:
        """Train to ``total_steps`` (or a stop signal); returns final metrics and paths.

        No step waits for the device: batch ``n + 1`` is fetched and copied while step ``n`` runs. The host reads
        device values only at *check steps* (log, checkpoint and evaluation steps, the last step): the logged
        metrics, the non-finite flags of the steps since the previous check, and, with several processes, the
        stop agreement. So a run stops on SIGTERM/SIGUSR1 at the next check step (every step in a single
        process), and ``max_nonfinite`` consecutive non-finite steps stop it at the next check step; skipped
        steps never change the weights either way.
        """
        acc, cfg = self.accelerator, self.cfg
        logger = MetricLogger(self.run_dir, cfg.report_to, run_id=self.run_id, run_name=cfg.run_name,
                              config=to_dict(cfg), enabled=self.is_main)
        bar = progress(total=self.total_steps, initial=self.step, enabled=self.is_main, desc=cfg.run_name,
                       unit="step")
        last: Dict[str, Any] = {}
        eval_results: Dict[str, Any] = {}
        stopped: Optional[str] = None
        last_ckpt: Optional[Path] = self.resume_from
        # The first epoch after a resume continues the loader's restored position instead of restarting it.
        fresh_epoch = self.resume_from is None or self.step == 0
        distributed = acc.num_processes > 1
        feed = self._feed()
        window = ThroughputWindow()
        self.model.train()
        try:
            with GracefulStop() as stop:
                while self.step < self.total_steps and stopped is None:
                    restarted = fresh_epoch
                    if fresh_epoch:
                        self.loader.set_epoch(self.epoch)
                    fresh_epoch = True
                    batches_this_pass = 0
                    t_epoch = time.perf_counter()
                    for batch in feed(self.loader):
                        batches_this_pass += 1
                        self.skips.add(getattr(batch, "skipped", None))
                        out, grad_norm, lr = self._train_step(batch)
                        self.step += 1
                        bar.update(1)
                        window.add(len(batch))
                        done = self.step >= self.total_steps
                        log_now = self.step % cfg.log_every == 0 or done
                        ckpt_now = done or bool(cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                        eval_now = bool(cfg.eval.every and self.step % cfg.eval.every == 0) and not done
                        stop_now = stop.requested is not None and not distributed
                        if log_now or ckpt_now or eval_now or stop_now:
                            if distributed:
                                stop_now = self._agree_stop(stop.requested)
                            self._read_flags()
                        if log_now or stop_now:
                            last = self._metrics(out, grad_norm, lr, feed, window)
                            logger.log(last, self.step)
                            postfix = {"loss": f"{last['loss']:.4f}"}
                            if math.isfinite(last["concept_accuracy"]):  # nan without concepts (LiT)
                                postfix["acc"] = f"{last['concept_accuracy']:.3f}"
                            bar.set_postfix(postfix)

                        if self.peak_nonfinite >= cfg.max_nonfinite:
                            last_ckpt = self.save_checkpoint()
                            raise NonFiniteLossError(
                                f"{self.peak_nonfinite} consecutive non-finite losses/gradients by step {self.step} "
                                f"(max_nonfinite={cfg.max_nonfinite}); checkpoint {last_ckpt}. Lower optim.lr, set "
                                "optim.grad_clip, or check the data."
                            )
                        if stop_now:
                            stopped = stop.requested or "signal"
                        if done or stop_now or ckpt_now:
                            last_ckpt = self.save_checkpoint()
                        if eval_now and not stop_now:
                            eval_results = self.evaluate(logger)
                        if done or stop_now:
                            if restarted and batches_this_pass == self.steps_per_epoch:
                                self._epoch_done(time.perf_counter() - t_epoch)
                            break
                    else:
                        if restarted and batches_this_pass == 0:
                            raise RuntimeError(f"the training stream yielded no batch in epoch {self.epoch}; "
                                               "check data.shards and the skipped-sample log")
                        if restarted:
                            self._epoch_done(time.perf_counter() - t_epoch)
                        self.epoch += 1  # the stream is exhausted: next epoch
            bar.close()
            if stopped is None:
                if last_ckpt is None or last_ckpt.name != ckpt_io.checkpoint_name(self.step):
                    self._read_flags()
                    last_ckpt = self.save_checkpoint()
                eval_results = self.evaluate(logger) or eval_results
                if self.is_main:
                    for spec, r in eval_results.items():
                        if "mIoU" in r:
                            print(f"final mIoU {spec}: {float(r['mIoU']):.4f}", flush=True)
            else:
                log.warning("stopped by %s at step %d; checkpoint %s (resume with resume=latest)",
                            stopped, self.step, last_ckpt)
        finally:
            bar.close()
            logger.close()
            close_loader = getattr(self.loader, "close", None)  # its data workers would idle until exit
            if close_loader is not None:
                close_loader()
        return {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,  # epochs done (fraction)
            "total_steps": self.total_steps,
            "run_dir": str(self.run_dir),
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "run_id": self.run_id,
            "stopped": stopped,
            "nonfinite_steps": self.nonfinite_total,
            "skipped": dict(self.skips.by_reason),
            "epoch_times": list(self.epoch_times),
            "data_wait_seconds": feed.wait_seconds,
            "metrics": last,
            "eval": eval_results,
        }

    def _epoch_done(self, seconds: float) -> None:
        """Record the wall time of an epoch run whole (from its first batch) in this process."""
        self.epoch_times.append(seconds)
        log.info("epoch %d: %d steps in %.1fs", self.epoch, self.steps_per_epoch, seconds)

    def _metrics(self, out: Any, grad_norm: Any, lr: float, feed: DeviceFeed,
                 window: ThroughputWindow) -> Dict[str, Any]:
        """The log row of a check step: the step's values read in one host sync, then the window's wall-clock
        throughput (all ranks call this; the skipped-sample count is summed over ranks)."""
        acc = self.accelerator
        skipped = _all_reduce(torch.tensor([float(self.skips.total)], device=acc.device), "sum")
        nan = torch.full((), float("nan"), device=acc.device)
        device_values = [out.loss, out.global_loss, out.concept_loss, out.concept_accuracy, out.logit_scale,
                         grad_norm if isinstance(grad_norm, torch.Tensor) else nan, skipped,
                         torch.as_tensor(out.num_concepts, device=acc.device),
                         torch.as_tensor(out.num_classes, device=acc.device)]
        (loss, global_loss, concept_loss, concept_accuracy, logit_scale, norm, skipped_total, num_concepts,
         num_classes) = torch.stack([v.detach().float().reshape(()).to(acc.device) for v in device_values]).tolist()
        metrics: Dict[str, Any] = {
            "loss": loss,
            "global_loss": global_loss,
            "concept_loss": concept_loss,
            "concept_accuracy": concept_accuracy,
            "concepts_per_batch": int(num_concepts),
            "classes_per_batch": int(num_classes),
            "logit_scale": logit_scale,
            "lr": lr,
            "grad_norm": norm if grad_norm is not None else float("nan"),
            **window.close(feed.wait_seconds, acc.num_processes),  # after the sync: the window's work is done
            "epoch": self.step / self.steps_per_epoch,
            "skipped_samples": int(skipped_total),
            "nonfinite_steps": self.nonfinite_total,
        }
        if acc.device.type == "cuda":
            metrics["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        metrics.update({f"skipped/{k}": v for k, v in self.skips.by_reason.items()})
        return metrics


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train a SimZSS (or LiT, ``model.concept_weight: 0``) model as configured.

    Returns ``{"step", "epoch", "run_dir", "checkpoint", "stopped", "metrics", "eval", "epoch_times", ...}``
    (``epoch_times``: wall seconds of each epoch run whole in this call, checkpoints and evaluations inside it
    included);
    ``stopped`` is the signal name when SIGTERM/SIGUSR1 ended the run early (after a checkpoint).
    Raises :class:`ConfigError` for unusable settings and :class:`NonFiniteLossError` after
    ``max_nonfinite`` consecutive bad steps.
    """
    return Trainer(cfg).fit()


__all__ = [
    "NonFiniteLossError",
    "Trainer",
    "train",
    "needs_find_unused",
    "resolve_mixed_precision",
    "build_tokenizer",
    "build_model",
    "build_loader",
    "build_concept_bank",
    "run_evaluation",
]
