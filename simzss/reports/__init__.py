"""Pictures of results: segmentation evaluation reports (per-class IoU, confusions, sample grids, report.md) and
training curves from ``metrics.jsonl``. matplotlib with the headless Agg backend."""

from simzss.reports.curves import RunMetrics, plot_training_curves, read_metrics
from simzss.reports.segmentation_report import ModelRun, comparison_table, load_results, write_report

__all__ = ["RunMetrics", "read_metrics", "plot_training_curves", "ModelRun", "load_results", "comparison_table",
           "write_report"]
