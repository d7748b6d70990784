"""Metrics from the confusion matrix vs an independent per-class computation (MMSeg conventions)."""

import math

import numpy as np
import pytest
import torch

from dapseg.eval.metrics import confusion_matrix, metrics_from_confusion


def naive(preds, gts, C, ignore):
    """Per class, by boolean masks over all images: IoU = |P∩G|/|P∪G|, Acc = |P∩G|/|G| (NaN if empty)."""
    inter = np.zeros(C)
    union = np.zeros(C)
    gt_area = np.zeros(C)
    correct = total = 0
    for p, g in zip(preds, gts, strict=True):
        valid = g != ignore
        for c in range(C):
            pc, gc = (p == c) & valid, (g == c) & valid
            inter[c] += (pc & gc).sum()
            union[c] += (pc | gc).sum()
            gt_area[c] += gc.sum()
        correct += ((p == g) & valid).sum()
        total += valid.sum()
    iou = [inter[c] / union[c] if union[c] else math.nan for c in range(C)]
    acc = [inter[c] / gt_area[c] if gt_area[c] else math.nan for c in range(C)]
    miou = np.mean([x for x in iou if not math.isnan(x)])
    macc = np.mean([x for x in acc if not math.isnan(x)])
    return np.array(iou), np.array(acc), miou, macc, correct / total


@pytest.mark.parametrize("C,ignore", [(5, 255), (21, 255), (300, 65535)])
def test_metrics_match_naive(C, ignore):
    rng = np.random.default_rng(C)
    preds, gts = [], []
    cm = torch.zeros(C, C, dtype=torch.long)
    for k in range(4):
        h, w = 17 + k, 23 - k
        # use only some classes so that several are absent from both (must be excluded from the means)
        used = rng.choice(C, size=max(2, C // 2), replace=False)
        g = rng.choice(used, size=(h, w))
        g[rng.random((h, w)) < 0.15] = ignore
        p = rng.choice(used, size=(h, w))
        copy = (rng.random((h, w)) < 0.4) & (g != ignore)  # make part of the prediction right
        p[copy] = g[copy]
        preds.append(p)
        gts.append(g)
        cm += confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), C, ignore)
    m = metrics_from_confusion(cm)
    iou, acc, miou, macc, aacc = naive(preds, gts, C, ignore)
    np.testing.assert_allclose(m.iou, iou, equal_nan=True)
    np.testing.assert_allclose(m.acc, acc, equal_nan=True)
    assert m.miou == pytest.approx(miou)
    assert m.macc == pytest.approx(macc)
    assert m.aacc == pytest.approx(aacc)
    assert np.isnan(m.iou).any()  # some class absent from both: excluded, not counted as 0


def test_predicted_but_absent_class_counts_as_zero_iou():
    # class 2 predicted but not in gt: IoU 0 (union > 0) and part of mIoU; its Acc is undefined
    g = torch.tensor([[0, 0, 1, 1]])
    p = torch.tensor([[0, 2, 1, 1]])
    m = metrics_from_confusion(confusion_matrix(p, g, 4))
    assert m.iou[0] == pytest.approx(0.5) and m.iou[1] == 1.0 and m.iou[2] == 0.0 and math.isnan(m.iou[3])
    assert m.miou == pytest.approx((0.5 + 1 + 0) / 3)
    assert math.isnan(m.acc[2]) and m.macc == pytest.approx((0.5 + 1) / 2)
    assert m.aacc == pytest.approx(3 / 4)


def test_all_ignore_gives_nan_not_error():
    g = torch.full((3, 3), 255)
    p = torch.zeros(3, 3, dtype=torch.long)
    cm = confusion_matrix(p, g, 3)
    assert int(cm.sum()) == 0
    m = metrics_from_confusion(cm)
    assert math.isnan(m.miou) and math.isnan(m.aacc)


def test_prediction_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 3)
