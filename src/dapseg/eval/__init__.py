"""Evaluation: confusion-matrix metrics, the (distributed, resumable) runner, reports and sweeps."""

from dapseg.eval.metrics import Metrics, confusion_matrix, metrics_from_confusion
from dapseg.eval.runner import EvalResult, RunOptions, evaluate

__all__ = ["EvalResult", "Metrics", "RunOptions", "confusion_matrix", "evaluate", "metrics_from_confusion"]
