"""Metrics for zero-shot evaluation: segmentation confusion matrix / mIoU, top-k accuracy, retrieval recall.

Everything here is a pure tensor function so that the distributed runner can reduce the raw counts
(confusion matrices, hit counts) across ranks before turning them into scores.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """A ``[num_classes + 1, num_classes]`` int64 confusion matrix: rows = ground truth, cols = prediction.

    Pixels whose target is ``ignore_index`` are excluded. The last row counts, by predicted class, the pixels
    whose target is neither a class id nor ``ignore_index``: mmsegmentation's ``IoUMetric`` keeps those pixels,
    so their predictions count as false positives of the predicted class while they add to no class's ground
    truth (:func:`segmentation_scores` does the same). One ``bincount`` (a scatter-add off the CPU) on the tensors' device, no host sync
    (the prediction range is checked on CPU tensors only; on a GPU predictions come from an argmax).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if pred.device.type == "cpu" and pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"prediction contains a class id outside [0, {num_classes})")
    cells = (num_classes + 1) * num_classes
    row = torch.where((target >= 0) & (target < num_classes), target, num_classes)
    idx = torch.where(target != ignore_index, row * num_classes + pred, cells)  # ignored pixels: one extra bin
    if idx.device.type == "cpu":
        counts = torch.bincount(idx, minlength=cells + 1)
    else:  # CUDA's bincount reads the maximum back to the host; a scatter-add of fixed size does not
        counts = torch.zeros(cells + 1, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
    return counts[:cells].reshape(num_classes + 1, num_classes)


def segmentation_scores(conf: Tensor, classnames: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Turn a dataset-total confusion matrix into mIoU (nan-mean x100), pixel accuracy (x100) and per-class IoU,
    exactly as mmsegmentation's ``IoUMetric`` (``intersect_and_union`` + ``total_area_to_metrics``).

    ``conf`` is ``[C, C]`` or :func:`confusion_matrix`'s ``[C + 1, C]`` (last row: pixels whose label is no class
    id). IoU of class c = TP / (TP + FP + FN) summed over the whole dataset, FP including the predictions on
    out-of-range labels; pixel accuracy = TP / labelled pixels of the C classes (out-of-range labels are in no
    class's area). A class absent from both the ground truth and the predictions has an undefined IoU (NaN,
    ``None`` in ``per_class``) and is left out of the mean.
    """
    conf = conf.double().cpu()
    c = conf.shape[1]
    if conf.shape[0] not in (c, c + 1):
        raise ValueError(f"confusion matrix of shape {tuple(conf.shape)}: expected [C, C] or [C + 1, C]")
    labelled = conf[:c]
    tp = labelled.diag()
    area_label = labelled.sum(1)
    union = conf.sum(0) + area_label - tp
    iou = tp / union  # 0/0 -> nan
    total = area_label.sum()
    miou = float(torch.nanmean(iou)) * 100 if not torch.isnan(iou).all() else float("nan")
    pixel_acc = float(tp.sum() / total) * 100 if total > 0 else float("nan")
    names = list(classnames) if classnames is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for a {c}-class confusion matrix")
    per_class = {n: (None if math.isnan(v) else v * 100) for n, v in zip(names, iou.tolist())}
    return {"mIoU": miou, "pixel_acc": pixel_acc, "per_class": per_class}


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, int]:
    """Number of samples whose label is among the ``k`` highest logits, for each k (k clamped to #classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # [N, maxk]
    hit = top == labels.view(-1, 1)
    return {k: int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks}


def retrieval_recall(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> Dict[str, float]:
    """Recall@k (x100) for image->text and text->image retrieval with several captions per image.

    ``text_to_image[t]`` is the index of caption t's image. Image->text: an image is a hit at k when ANY of its
    captions is among its k most similar texts. Text->image: a caption is a hit when its image is among the k most
    similar images. Embeddings are assumed L2-normalised (cosine = dot product); similarities are computed in
    row chunks so that 5k x 25k problems stay small.
    """
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape ({n_txt},), got {tuple(text_to_image.shape)}")
    text_to_image = text_to_image.to(image_emb.device).long()
    out: Dict[str, float] = {}
    i2t_hits = {k: 0 for k in ks}
    kt = min(max(ks), n_txt)
    for s in range(0, n_img, chunk):
        sim = image_emb[s : s + chunk].float() @ text_emb.float().T  # [c, n_txt]
        top = sim.topk(kt, dim=1).indices  # [c, kt]
        own = torch.arange(s, s + sim.shape[0], device=sim.device).view(-1, 1)
        hit = text_to_image[top] == own
        for k in ks:
            i2t_hits[k] += int(hit[:, : min(k, kt)].any(dim=1).sum())
    t2i_hits = {k: 0 for k in ks}
    ki = min(max(ks), n_img)
    for s in range(0, n_txt, chunk):
        sim = text_emb[s : s + chunk].float() @ image_emb.float().T  # [c, n_img]
        top = sim.topk(ki, dim=1).indices
        hit = top == text_to_image[s : s + sim.shape[0]].view(-1, 1)
        for k in ks:
            t2i_hits[k] += int(hit[:, : min(k, ki)].any(dim=1).sum())
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * i2t_hits[k] / max(n_img, 1)
        out[f"t2i_R@{k}"] = 100.0 * t2i_hits[k] / max(n_txt, 1)
    return out


__all__: List[str] = [
    "IGNORE_INDEX",
    "confusion_matrix",
    "segmentation_scores",
    "topk_correct",
    "retrieval_recall",
]
