"""Zero-shot semantic segmentation of a benchmark: per-dataset defaults, distributed evaluation, mIoU.

The per-image prediction (sliding windows, resizing, softmax) is :mod:`simzss.models.zeroshot`, which documents
the standard protocol (GroupViT / TCL / CLIP-DINOiser, mmseg 0.x slide inference).

Background (datasets whose class 0 is background: voc, context60, coco_object, folder with ``background``):

* ``"threshold"`` (default): background wherever the highest foreground probability (softmax over the foreground
  classes only) is below ``bg_threshold``. Defaults follow GroupViT, which thresholds the same quantity
  (softmax of logit_scale x cosine): 0.95 for voc / coco_object, 0.35 for context60 (many more classes, so the
  mass is spread thinner); 0.5 for a generic folder dataset (background unless one class holds a majority).
* ``"class"``: ``"background"`` is embedded like any other class name.

Harnesses differ here (docs/reproduce.md): TCL prepends a constant background score of 0.4 with PAMR (0.5
without), Talk2DINO 0.4 (0.55 for VOC), GEM a softmax threshold of 0.8 for VOC; pass ``bg_threshold`` to match one.
``pamr=True`` refines each image's probabilities with PAMR (:mod:`simzss.models.pamr`) before the argmax; off by
default. Every result names its protocol (``"protocol"``: background, bg_threshold, pamr, templates, short_side,
crop, stride).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from simzss.eval.datasets import SegmentationDataset, build_segmentation_dataset
from simzss.eval.metrics import confusion_matrix, segmentation_scores
from simzss.models.zeroshot import (
    FALLBACK_BG_THRESHOLD, ZeroShotModel, get_logit_scale, get_mean_std, model_device, model_variant,
    normalize_image, segment_images, text_classifier,
)
from simzss.logs import progress as progress_bar

log = logging.getLogger(__name__)

DEFAULT_BG_THRESHOLD: Dict[str, float] = {"voc": 0.95, "coco_object": 0.95, "context60": 0.35, "folder": 0.5}


@dataclass
class EvalRun:
    """Where one evaluation runs: the unwrapped model in eval mode, its device, this rank's share, autocast.

    ``start`` switches the model to eval mode; ``finish`` puts it back in train mode if it was training, so
    the trainer's eval hook can call an evaluator mid-run.
    """

    net: Any
    device: torch.device
    rank: int
    world: int
    autocast: Callable[[], ContextManager[Any]]
    was_training: bool

    @classmethod
    def start(cls, model: Any, accelerator: Any = None) -> "EvalRun":
        net = accelerator.unwrap_model(model) if accelerator is not None else model
        was_training = bool(getattr(net, "training", False))
        if hasattr(net, "eval"):
            net.eval()
        if accelerator is None:
            return cls(net, model_device(net), 0, 1, contextlib.nullcontext, was_training)
        return cls(net, accelerator.device, accelerator.process_index, accelerator.num_processes,
                   accelerator.autocast, was_training)

    def finish(self) -> None:
        if self.was_training and hasattr(self.net, "train"):
            self.net.train()


# ------------------------------------------------------------------------------------------- evaluation


class _Samples(torch.utils.data.Dataset):
    """Dataset view for the DataLoader: decodes in workers, turns bad samples into counted skips."""

    def __init__(self, ds: SegmentationDataset, indices: Sequence[int]):
        self.ds, self.indices = ds, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        idx = self.indices[i]
        try:
            image, mask = self.ds[idx]
        except Exception as e:  # noqa: BLE001 - any decode error becomes a counted, logged skip
            return {"key": self.ds.key(idx), "error": f"{type(e).__name__}: {e}"}
        arr = np.asarray(image, dtype=np.uint8)
        return {
            "key": self.ds.key(idx),
            "image": torch.from_numpy(arr.copy()).permute(2, 0, 1),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
        }


def resolve_background(ds: SegmentationDataset, background: Optional[str], bg_threshold: Optional[float]) -> Tuple[str, Optional[float]]:
    """Background mode and threshold for a dataset: ``none`` without a background class; else the requested mode
    (default ``threshold``, threshold default from :data:`DEFAULT_BG_THRESHOLD`)."""
    if not ds.has_background:
        if background not in (None, "none"):
            log.info("%s has no background class; --background %s does not apply", ds.name, background)
        return "none", None
    mode = background or "threshold"
    if mode not in ("threshold", "class"):
        raise ValueError(f"{ds.name} has a background class: background must be 'threshold' or 'class', got {mode!r}")
    if mode == "class":
        return mode, None
    thr = DEFAULT_BG_THRESHOLD.get(ds.name, FALLBACK_BG_THRESHOLD) if bg_threshold is None else float(bg_threshold)
    if not 0.0 <= thr <= 1.0:
        raise ValueError(f"bg_threshold must be in [0, 1], got {thr}")
    return mode, thr


def evaluate_segmentation(
    model: ZeroShotModel,
    dataset_spec: Union[str, SegmentationDataset],
    *,
    templates: Union[str, Sequence[str]] = "single",
    short_side: Optional[int] = 448,
    crop: int = 448,
    stride: int = 224,
    window_batch: int = 16,
    background: Optional[str] = None,
    bg_threshold: Optional[float] = None,
    accelerator: Any = None,
    max_images: Optional[int] = None,
    workers: int = 0,
    max_long: int = 2048,
    progress: bool = False,
    return_confusion: bool = False,
    num_samples: int = 0,
    pamr: bool = False,
    image_batch: int = 8,
) -> Dict[str, Any]:
    """Zero-shot segmentation of a whole dataset; returns ``{"mIoU", "pixel_acc", "per_class", "num_images", ...}``.

    mIoU / pixel accuracy are x100 from the dataset-total confusion matrix (ignore index 255). With an
    ``accelerator`` every rank segments its share of the images (rank::world_size) and the confusion matrices
    are summed across ranks; all ranks return the same result. Unreadable samples are skipped, counted
    (``"skipped"``) and logged. Mask values that are neither a class id nor the ignore index are counted in
    ``"invalid_pixels"`` and, as in mmsegmentation's ``IoUMetric``, the predictions there are false positives.
    ``image_batch`` images are segmented together: their windows share the vision tower's batches of
    ``window_batch``, and predictions and confusion counts stay on the device until the end (no host sync per
    image). ``"model_variant"`` names what produced the predictions (:func:`simzss.models.zeroshot.model_variant`),
    so that results of different baseline variants are never mixed silently.
    For reports: ``return_confusion`` adds ``"confusion"`` (the ``[C, C]`` matrix as lists, rows = ground truth)
    and ``"confusion_invalid"`` (the predictions on out-of-range mask values, by predicted class: the false
    positives that :func:`segmentation_scores` adds, so the two reproduce the mIoU);
    ``num_samples`` adds ``"samples"``: up to that many ``{"key", "image" uint8 [H,W,3], "mask", "pred"}``
    (numpy, class ids) of the first images of rank 0 (not JSON: pop it before writing).
    ``pamr`` turns on PAMR mask refinement (see the module docstring); the result's ``"protocol"`` records it
    with the other settings that move numbers.
    """
    ds = dataset_spec if isinstance(dataset_spec, SegmentationDataset) else build_segmentation_dataset(dataset_spec)
    mode, thr = resolve_background(ds, background, bg_threshold)
    if image_batch < 1:
        raise ValueError(f"image_batch must be >= 1, got {image_batch}")
    run = EvalRun.start(model, accelerator)
    net, device, rank, world, autocast = run.net, run.device, run.rank, run.world, run.autocast

    n = len(ds) if max_images is None else min(len(ds), max_images)
    names = ds.classnames
    num_classes = len(names)
    num_images = skipped = 0
    try:
        with torch.no_grad():
            with autocast():
                text_names = names[1:] if mode == "threshold" else names
                classifier = text_classifier(net, text_names, templates).to(device)
            mean, std = get_mean_std(net)
            scale = get_logit_scale(net)
            conf = torch.zeros(num_classes + 1, num_classes, dtype=torch.long, device=device)  # last row: no class id
            samples: List[Dict[str, Any]] = []
            loader = torch.utils.data.DataLoader(
                _Samples(ds, range(rank, n, world)), batch_size=None, num_workers=workers,
                pin_memory=device.type == "cuda",  # so the copies to the device below are asynchronous
            )
            it = loader
            if progress and rank == 0:
                it = progress_bar(loader, desc=f"{ds.name}", unit="img")
            pending: List[Dict[str, Any]] = []

            def flush() -> None:
                """Segment the pending images together (their windows share the tower's batches) and add their
                confusion, all on the device."""
                nonlocal conf
                images = [normalize_image(smp["image"].to(device, non_blocking=True), mean, std) for smp in pending]
                with autocast():
                    preds = segment_images(
                        net, images, classifier, short_side=short_side, crop=crop, stride=stride,
                        window_batch=window_batch, background=mode, bg_threshold=thr, max_long=max_long,
                        logit_scale=scale, pamr=pamr,
                    )
                for smp, pred in zip(pending, preds):
                    if rank == 0 and len(samples) < num_samples:
                        samples.append({"key": smp["key"], "image": smp["image"].permute(1, 2, 0).numpy(),
                                        "mask": smp["mask"].numpy(), "pred": pred.to(torch.uint8).cpu().numpy()})
                    conf += confusion_matrix(pred, smp["mask"].to(device, non_blocking=True), num_classes,
                                             ds.ignore_index)
                pending.clear()

            for sample in it:
                if "error" in sample:
                    skipped += 1
                    log.warning("%s: skipped %s: %s", ds.name, sample["key"], sample["error"])
                    continue
                pending.append(sample)
                num_images += 1
                if len(pending) >= image_batch:
                    flush()
            if pending:
                flush()
            stats = torch.tensor([num_images, skipped], dtype=torch.long, device=device)
            if accelerator is not None and world > 1:
                conf = accelerator.reduce(conf, reduction="sum")
                stats = accelerator.reduce(stats, reduction="sum")
    finally:
        run.finish()
    num_images, skipped = (int(v) for v in stats.tolist())
    invalid_pixels = int(conf[num_classes].sum())
    if invalid_pixels:
        log.warning("%s: %d mask pixels had values that are neither a class id nor %d: counted as false positives "
                    "of the class predicted there, as mmsegmentation's IoUMetric does", ds.name, invalid_pixels,
                    ds.ignore_index)
    result: Dict[str, Any] = segmentation_scores(conf, names)
    result.update(
        dataset=ds.name,
        num_images=num_images,
        skipped=skipped,
        invalid_pixels=invalid_pixels,
        background=mode,
        bg_threshold=thr,
        templates=templates if isinstance(templates, str) else list(templates),
        model_variant=model_variant(net),
        protocol={
            "background": mode,
            "bg_threshold": thr,
            "pamr": bool(pamr),
            "templates": templates if isinstance(templates, str) else list(templates),
            "short_side": short_side,
            "crop": crop,
            "stride": stride,
        },
    )
    if return_confusion:
        result["confusion"] = conf[:num_classes].cpu().tolist()
        result["confusion_invalid"] = conf[num_classes].cpu().tolist()  # with it the JSON reproduces the mIoU
    if num_samples:
        result["samples"] = samples
    return result


__all__ = ["DEFAULT_BG_THRESHOLD", "EvalRun", "evaluate_segmentation", "resolve_background"]
