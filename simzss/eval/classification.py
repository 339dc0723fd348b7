"""Zero-shot image classification: the CLS token against text class embeddings, top-1 / top-5.

Images are resized (short side, bicubic, antialiased) and centre-cropped to ``image_size`` (224 by default, the
CLIP convention), then normalised with the vision tower's mean/std. Class embeddings come from
:func:`simzss.models.zeroshot.text_classifier` (default templates: the 80 OpenAI ImageNet prompts).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torchvision.transforms import v2

from simzss.eval.datasets import ClassificationDataset, build_classification_dataset
from simzss.eval.metrics import topk_correct
from simzss.eval.segmentation import EvalRun
from simzss.models.zeroshot import ZeroShotModel, get_mean_std, get_patch_size, text_classifier
from simzss.logs import progress as progress_bar

log = logging.getLogger(__name__)


def check_image_size(model: Any, image_size: int) -> None:
    """The vision tower takes whole patches only: fail early with a clear message otherwise."""
    p = get_patch_size(model)
    if image_size <= 0 or image_size % p:
        raise ValueError(f"image_size {image_size} must be a positive multiple of the patch size {p}")


def eval_transform(image_size: int, mean: Tensor, std: Tensor) -> v2.Compose:
    """PIL image -> normalised float ``[3, S, S]``: resize short side, centre crop, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean.tolist(), std.tolist()),
        ]
    )


class _Transformed(torch.utils.data.Dataset):
    """Indices of a classification dataset, transformed in workers; unreadable images get label -1 (skipped)."""

    def __init__(self, ds: ClassificationDataset, indices: Sequence[int], transform: v2.Compose, image_size: int):
        self.ds, self.indices, self.transform, self.image_size = ds, list(indices), transform, image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        idx = self.indices[i]
        try:
            image, label = self.ds[idx]
            return self.transform(image), label
        except Exception as e:  # noqa: BLE001 - a bad file becomes a counted, logged skip
            log.warning("%s: skipped %s: %s: %s", self.ds.name, self.ds.samples[idx][0], type(e).__name__, e)
            return torch.zeros(3, self.image_size, self.image_size), -1


def evaluate_classification(
    model: ZeroShotModel,
    dataset_spec: Union[str, ClassificationDataset],
    *,
    templates: Union[str, Sequence[str]] = "imagenet80",
    image_size: int = 224,
    batch_size: int = 64,
    workers: int = 0,
    accelerator: Any = None,
    max_images: Optional[int] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy (x100) of zero-shot classification; ranks split the images and sum the hits."""
    ds = dataset_spec if isinstance(dataset_spec, ClassificationDataset) else build_classification_dataset(dataset_spec)
    run = EvalRun.start(model, accelerator)
    net, device, rank, world, autocast = run.net, run.device, run.rank, run.world, run.autocast
    check_image_size(net, image_size)
    n = len(ds) if max_images is None else min(len(ds), max_images)
    mean, std = get_mean_std(net)
    data = _Transformed(ds, range(rank, n, world), eval_transform(image_size, mean, std), image_size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers)
    # images, skipped, top1 hits, top5 hits
    stats = torch.zeros(4, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            with autocast():
                classifier = text_classifier(net, ds.classnames, templates).to(device)
            it = loader
            if progress and rank == 0:
                it = progress_bar(loader, desc=ds.name, unit="batch")
            for images, labels in it:
                ok = labels >= 0
                stats[1] += int((~ok).sum())
                if not ok.any():
                    continue
                with autocast():
                    cls, _ = net.encode_image(images[ok].to(device))
                logits = cls.float() @ classifier.T
                hits = topk_correct(logits, labels[ok].to(device), (1, 5))
                stats[0] += int(ok.sum())
                stats[2] += hits[1]
                stats[3] += hits[5]
            if accelerator is not None and world > 1:
                stats = accelerator.reduce(stats, reduction="sum")
    finally:
        run.finish()
    num, skipped, top1, top5 = (int(v) for v in stats.tolist())
    return {
        "dataset": ds.name,
        "top1": 100.0 * top1 / num if num else float("nan"),
        "top5": 100.0 * top5 / num if num else float("nan"),
        "num_images": num,
        "num_classes": len(ds.classnames),
        "skipped": skipped,
        "templates": templates if isinstance(templates, str) else list(templates),
    }


__all__ = ["check_image_size", "eval_transform", "evaluate_classification"]
