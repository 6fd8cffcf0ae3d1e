"""Segmentation quality metrics used in the field's benchmarks, as plain NumPy functions.

Object (instance) metrics as in the Data Science Bowl 2018, StarDist (Schmidt et al. 2018) and Cellpose
(Stringer et al. 2021): a predicted and a true object match when their intersection over union exceeds a
threshold ``t``; for ``t >= 0.5`` every object has at most one match, so the matching is unique. Then
``accuracy = TP / (TP + FP + FN)`` (the DSB's "average precision" at ``t``) and
``F1 = 2 TP / (2 TP + FP + FN)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "IOU_THRESHOLDS",
    "ObjectScores",
    "foreground_iou",
    "instance_iou",
    "object_scores",
]

#: 0.5, 0.55, ..., 0.95: the thresholds of the DSB 2018 score ("mean accuracy over IoU 0.5:0.95")
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclass(frozen=True)
class ObjectScores:
    """Object counts at one IoU threshold."""

    threshold: float
    tp: int
    fp: int
    fn: int

    @property
    def accuracy(self) -> float:
        """TP / (TP + FP + FN); 1.0 when both images are empty."""
        total = self.tp + self.fp + self.fn
        return self.tp / total if total else 1.0

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN); 1.0 when both images are empty."""
        total = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / total if total else 1.0


def _labels(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iub":
        if not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"{name} must be an integer label image")
        arr = arr.astype(np.int64)
    return np.squeeze(arr).astype(np.int64, copy=False)


def instance_iou(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (predicted, true) object pair: ``(pred ids, true ids, iou)`` (0 = background).

    Label ids need not be consecutive. Computed from the pixel-pair histogram (one pass, sparse).
    """
    p, t = _labels(pred, "pred"), _labels(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in shape: {p.shape} vs {t.shape}")
    p, t = p.ravel(), t.ravel()
    area_p = dict(zip(*np.unique(p, return_counts=True), strict=True))
    area_t = dict(zip(*np.unique(t, return_counts=True), strict=True))
    both = (p > 0) & (t > 0)
    if not both.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    pairs, inter = np.unique(np.stack([p[both], t[both]]), axis=1, return_counts=True)
    union = np.array([area_p[a] + area_t[b] for a, b in pairs.T], dtype=np.float64) - inter
    return pairs[0], pairs[1], inter / union


def object_scores(
    pred: np.ndarray, true: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> list[ObjectScores]:
    """TP / FP / FN of the instances ``pred`` against ``true`` at each IoU threshold (>= 0.5)."""
    if any(t < 0.5 for t in thresholds):
        raise ValueError("thresholds below 0.5 need a matching step; use thresholds >= 0.5")
    n_pred = len(np.setdiff1d(np.unique(_labels(pred, "pred")), [0]))
    n_true = len(np.setdiff1d(np.unique(_labels(true, "true")), [0]))
    _, _, iou = instance_iou(pred, true)
    out = []
    for t in thresholds:
        tp = int((iou > t).sum())
        out.append(ObjectScores(float(t), tp, n_pred - tp, n_true - tp))
    return out


def foreground_iou(pred: np.ndarray, true: np.ndarray) -> float:
    """IoU of the foregrounds (non-zero pixels); 1.0 when both are empty."""
    p, t = np.squeeze(np.asarray(pred)) > 0, np.squeeze(np.asarray(true)) > 0
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in shape: {p.shape} vs {t.shape}")
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else 1.0
