"""Zero-shot evaluation: segmentation (sliding windows, mIoU), classification (top-1/5), retrieval (R@k).

Library entry points used by the trainer, ``SimZSS.segment`` and ``simzss eval`` (:mod:`simzss.eval.runner`).
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
from simzss.eval.segmentation import (
    evaluate_segmentation,
    segment_image,
    slide_windows,
    text_classifier,
)

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
    "segment_image",
    "segmentation_scores",
    "slide_windows",
    "text_classifier",
    "topk_correct",
]
