"""Zero-shot evaluation: segmentation (sliding windows, mIoU), classification (top-1/5), retrieval (R@k).

Library entry points used by the trainer and ``simzss eval`` (:mod:`simzss.cli.eval`); the per-image
prediction they share with ``SimZSS.segment`` is :mod:`simzss.models.zeroshot`.
"""

from simzss.eval.classification import evaluate_classification
from simzss.eval.datasets import (
    DatasetError,
    build_classification_dataset,
    build_segmentation_dataset,
    iter_retrieval_records,
    parse_spec,
)
from simzss.eval.metrics import confusion_matrix, retrieval_recall, segmentation_scores, topk_correct
from simzss.eval.retrieval import evaluate_retrieval
from simzss.eval.segmentation import evaluate_segmentation

__all__ = [
    "DatasetError",
    "build_classification_dataset",
    "build_segmentation_dataset",
    "confusion_matrix",
    "evaluate_classification",
    "evaluate_retrieval",
    "evaluate_segmentation",
    "iter_retrieval_records",
    "parse_spec",
    "retrieval_recall",
    "segmentation_scores",
    "topk_correct",
]
