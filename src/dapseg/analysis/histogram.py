"""Streaming pair counts: positives and negatives per score bin, and AP / PR curves from them.

Scores are cosines, so one fixed range [-1, 1] cut into ``bins`` equal bins serves every source.
Pairs in one bin count as tied: the AP of the histogram is exactly scikit-learn's
``average_precision_score`` of the bin indices (ties grouped into one threshold), and differs from
the AP of the raw scores only by the order of pairs inside a bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOW, HIGH = -1.0, 1.0  # the score range (cosine); values outside are clamped into the end bins


@dataclass
class PairHistogram:
    """Counts of positive and negative pairs per score bin; bin 0 holds the lowest scores."""

    pos: torch.Tensor  # (bins,) int64
    neg: torch.Tensor  # (bins,) int64

    @classmethod
    def empty(cls, bins: int) -> PairHistogram:
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        return cls(torch.zeros(bins, dtype=torch.long), torch.zeros(bins, dtype=torch.long))

    @property
    def bins(self) -> int:
        return int(self.pos.numel())

    def bin_index(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores (any shape) -> bin indices (long, same shape), clamped to [0, bins - 1]."""
        b = self.bins
        idx = torch.floor((scores.float() - LOW) * (b / (HIGH - LOW))).long()
        return idx.clamp_(0, b - 1)

    def add(self, scores: torch.Tensor, positive: torch.Tensor) -> None:
        """Count pairs: ``scores`` and the boolean ``positive`` of the same shape (any device)."""
        if scores.shape != positive.shape:
            raise ValueError(f"scores {tuple(scores.shape)} and positive {tuple(positive.shape)} differ in shape")
        b = self.bins
        idx = self.bin_index(scores).flatten() + b * positive.flatten().long()
        counts = torch.bincount(idx, minlength=2 * b).cpu()
        self.neg += counts[:b]
        self.pos += counts[b:]

    def merge(self, other: PairHistogram) -> None:
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {other.bins} and {self.bins} bins")
        self.pos += other.pos
        self.neg += other.neg

    @property
    def n_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg.sum())

    def positive_rate(self) -> float:
        """The share of positive pairs: the AP of a chance (constant) score. NaN without pairs."""
        total = self.n_pos + self.n_neg
        return self.n_pos / total if total else float("nan")

    def pr_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(recall, precision), float64, one point per non-empty bin from the highest score down."""
        pos, neg = self.pos.flip(0).double(), self.neg.flip(0).double()
        keep = (pos + neg) > 0
        tp, fp = pos.cumsum(0)[keep], neg.cumsum(0)[keep]
        n_pos = max(self.n_pos, 1)
        return tp / n_pos, tp / (tp + fp)

    def average_precision(self) -> float:
        """AP = Σ_thresholds (R_n − R_{n−1})·P_n over bin thresholds, high to low (scikit-learn's
        definition, bins as ties). NaN without positive pairs (AP is undefined)."""
        if self.n_pos == 0:
            return float("nan")
        pos, neg = self.pos.flip(0).double(), self.neg.flip(0).double()
        tp, fp = pos.cumsum(0), neg.cumsum(0)
        has = pos > 0  # recall moves only at bins holding positives
        precision = tp[has] / (tp[has] + fp[has])
        return float((pos[has] / self.n_pos * precision).sum())
