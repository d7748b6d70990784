"""Segmentation metrics from one confusion matrix, with MMSegmentation's conventions.

cm[g, p] counts pixels of ground-truth class g predicted as p (ignore pixels dropped).
IoU_c = cm[c,c] / (row_c + col_c - cm[c,c]); Acc_c = cm[c,c] / row_c. A class with an empty
denominator is NaN and left out of the mean (absent from both prediction and ground truth for IoU,
absent from ground truth for Acc), as MMSeg's IoUMetric does. aAcc = trace / total.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> torch.Tensor:
    """(C, C) int64 from label maps of equal shape; pixels where gt == ignore_index are dropped."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != ground truth shape {tuple(gt.shape)}")
    pred = pred.reshape(-1).long()
    gt = gt.reshape(-1).long()
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"prediction has class index outside 0..{num_classes - 1}: "
                         f"{int(pred.min())}..{int(pred.max())}")
    if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= num_classes):
        raise ValueError(f"ground truth has class index outside 0..{num_classes - 1}")
    # one bincount over the joint index g*C + p: O(pixels), no per-class loop
    return torch.bincount(gt * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


@dataclass
class Metrics:
    iou: np.ndarray  # (C,) float64, NaN where undefined
    acc: np.ndarray  # (C,)
    miou: float  # all in [0, 1]; NaN if no class is defined
    macc: float
    aacc: float

    def as_percent(self) -> dict[str, float]:
        return {"mIoU": _pct(self.miou), "mAcc": _pct(self.macc), "aAcc": _pct(self.aacc)}


def _pct(x: float) -> float:
    return float(round(100.0 * x, 2)) if np.isfinite(x) else float("nan")


def _nanmean(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else float("nan")


def metrics_from_confusion(cm: torch.Tensor | np.ndarray) -> Metrics:
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    tp = np.diag(cm)
    gt_area = cm.sum(axis=1)
    pred_area = cm.sum(axis=0)
    union = gt_area + pred_area - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_area > 0, tp / gt_area, np.nan)
    total = cm.sum()
    aacc = float(tp.sum() / total) if total > 0 else float("nan")
    return Metrics(iou=iou, acc=acc, miou=_nanmean(iou), macc=_nanmean(acc), aacc=aacc)
