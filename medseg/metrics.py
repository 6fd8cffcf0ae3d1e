"""Segmentation quality metrics used in the field's benchmarks, as plain NumPy functions.

Object (instance) metrics as in the Data Science Bowl 2018, StarDist (Schmidt et al. 2018) and Cellpose
(Stringer et al. 2021): a predicted and a true object match when their intersection over union exceeds a
threshold ``t``; for ``t >= 0.5`` every object has at most one match, so the matching is unique. Then
``accuracy = TP / (TP + FP + FN)`` (the DSB's "average precision" at ``t``) and
``F1 = 2 TP / (2 TP + FP + FN)``.

Membrane (boundary) metrics of the ISBI 2012 EM segmentation challenge (Arganda-Carreras et al., Front.
Neuroanat. 2015), where U-Net (paper Sec. 4) was ranked by pixel error and Rand error: inputs are binary
maps, non-zero = cell interior, 0 = membrane. The pixel error is ``1 -`` the pixel accuracy of the membrane
map; the Rand error is ``1 -`` the foreground-restricted Rand F-score (V_rand) of the cell regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "ERROR_KINDS",
    "IOU_THRESHOLDS",
    "ObjectErrors",
    "ObjectScores",
    "RandScores",
    "cell_regions",
    "foreground_iou",
    "instance_iou",
    "object_errors",
    "object_scores",
    "pixel_error",
    "rand_error",
    "rand_scores",
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


class _Overlaps(NamedTuple):
    ids_p: np.ndarray  # original id of each compact prediction id (index 0 = background)
    ids_t: np.ndarray
    area_p: np.ndarray  # pixels per compact id
    area_t: np.ndarray
    p: np.ndarray  # compact ids of the overlapping (prediction, true object) pairs, sorted by p then t
    t: np.ndarray
    inter: np.ndarray  # their intersections in pixels
    iou: np.ndarray  # and their IoU


def _overlaps(pred: np.ndarray, true: np.ndarray) -> _Overlaps:
    """Every overlapping (prediction, true object) pair, from the pixel-pair histogram (one pass, sparse)."""
    p, t = _labels(pred, "pred"), _labels(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in shape: {p.shape} vs {t.shape}")
    if p.size and min(p.min(), t.min()) < 0:
        raise ValueError("label images must not hold negative ids")
    # compact ids 1..n, the background kept at 0
    ids_p, cp = np.unique(np.concatenate([[0], p.ravel()]), return_inverse=True)
    ids_t, ct = np.unique(np.concatenate([[0], t.ravel()]), return_inverse=True)
    cp, ct = cp[1:], ct[1:]
    area_p, area_t = np.bincount(cp, minlength=len(ids_p)), np.bincount(ct, minlength=len(ids_t))
    both = (cp > 0) & (ct > 0)
    pairs, inter = np.unique(cp[both] * len(ids_t) + ct[both], return_counts=True)
    pp, pt = pairs // len(ids_t), pairs % len(ids_t)
    iou = inter / (area_p[pp] + area_t[pt] - inter)
    return _Overlaps(ids_p, ids_t, area_p, area_t, pp, pt, inter, iou)


def instance_iou(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (predicted, true) object pair: ``(pred ids, true ids, iou)`` (0 = background).

    Label ids need not be consecutive; negative ids are refused. Computed from the pixel-pair histogram
    (one pass, sparse).
    """
    o = _overlaps(pred, true)
    return o.ids_p[o.p].astype(np.int64), o.ids_t[o.t].astype(np.int64), o.iou


def object_scores(
    pred: np.ndarray, true: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> list[ObjectScores]:
    """TP / FP / FN of the instances ``pred`` against ``true`` at each IoU threshold (>= 0.5)."""
    if any(t < 0.5 for t in thresholds):
        raise ValueError("thresholds below 0.5 need a matching step; use thresholds >= 0.5")
    o = _overlaps(pred, true)
    n_pred, n_true = len(o.ids_p) - 1, len(o.ids_t) - 1  # ids_* start with the background
    out = []
    for t in thresholds:
        tp = int((o.iou > t).sum())
        out.append(ObjectScores(float(t), tp, n_pred - tp, n_true - tp))
    return out


#: the fields of :class:`ObjectErrors` that count unmatched objects: true objects first, then predictions
ERROR_KINDS = ("missed", "merged", "split", "inexact_true", "extra", "merging", "fragment", "inexact_pred")


@dataclass(frozen=True)
class ObjectErrors:
    """The unmatched objects at one IoU threshold, by kind (see :func:`object_errors`).

    ``missed + merged + split + inexact_true == fn`` and
    ``extra + merging + fragment + inexact_pred == fp`` of :func:`object_scores` at the same threshold.
    """

    threshold: float
    tp: int
    missed: int  #: true objects less than half covered by predictions
    merged: int  #: true objects whose main prediction also covers most of another true object
    split: int  #: true objects of which two or more predictions each cover over a fifth
    inexact_true: int  #: other unmatched true objects (found, boundary too far off)
    extra: int  #: predictions lying mostly (over half) on the background
    merging: int  #: predictions covering most of two or more true objects
    fragment: int  #: predictions under half the size of the true object they overlap most
    inexact_pred: int  #: other unmatched predictions

    @property
    def fn(self) -> int:
        return self.missed + self.merged + self.split + self.inexact_true

    @property
    def fp(self) -> int:
        return self.extra + self.merging + self.fragment + self.inexact_pred


def object_errors(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> ObjectErrors:
    """Sort the false negatives and false positives at ``threshold`` (>= 0.5) by cause.

    The error kinds of Caicedo et al. (Cytometry A 2019) for nucleus segmentation: missed, merged and split
    nuclei, extra objects; here with fixed rules, checked in this order. An unmatched true object is
    *missed* when predictions cover under half of it, *merged* when the prediction overlapping it most
    covers over half of two or more true objects, *split* when two or more predictions each
    cover over a fifth of it, else *inexact*. An unmatched prediction is *extra* when under half of it
    lies on true objects, *merging* when it covers over half of two or more true objects, a *fragment*
    when it is under half the size of the true object it overlaps most, else *inexact*.
    """
    if threshold < 0.5:
        raise ValueError("threshold below 0.5 needs a matching step; use threshold >= 0.5")
    o = _overlaps(pred, true)
    n_t, n_p = len(o.ids_t), len(o.ids_p)
    area_t, area_p, a, b, inter, iou = o.area_t, o.area_p, o.t, o.p, o.inter, o.iou
    matched_t = np.bincount(a[iou > threshold], minlength=n_t) > 0
    matched_p = np.bincount(b[iou > threshold], minlength=n_p) > 0
    covered_t = np.bincount(a, weights=inter, minlength=n_t)  # pixels of each true object on predictions
    on_true_p = np.bincount(b, weights=inter, minlength=n_p)
    most = inter > 0.5 * area_t[a]  # the prediction covers over half of the true object
    n_most_p = np.bincount(b[most], minlength=n_p)
    n_parts_t = np.bincount(a[inter > 0.2 * area_t[a]], minlength=n_t)
    main_p = np.zeros(n_t, np.int64)  # the prediction overlapping each true object most
    order = np.lexsort((inter, a))
    main_p[a[order]] = b[order]  # the last write per true object is its largest overlap
    main_t = np.zeros(n_p, np.int64)
    order = np.lexsort((inter, b))
    main_t[b[order]] = a[order]
    kinds = dict.fromkeys(ERROR_KINDS, 0)
    for i in np.flatnonzero(~matched_t[1:]) + 1:
        if covered_t[i] < 0.5 * area_t[i]:
            kinds["missed"] += 1
        elif n_most_p[main_p[i]] >= 2:
            kinds["merged"] += 1
        elif n_parts_t[i] >= 2:
            kinds["split"] += 1
        else:
            kinds["inexact_true"] += 1
    for j in np.flatnonzero(~matched_p[1:]) + 1:
        if on_true_p[j] < 0.5 * area_p[j]:
            kinds["extra"] += 1
        elif n_most_p[j] >= 2:
            kinds["merging"] += 1
        elif area_p[j] < 0.5 * area_t[main_t[j]]:
            kinds["fragment"] += 1
        else:
            kinds["inexact_pred"] += 1
    return ObjectErrors(float(threshold), int(matched_t[1:].sum()), **kinds)


def foreground_iou(pred: np.ndarray, true: np.ndarray) -> float:
    """IoU of the foregrounds (non-zero pixels); 1.0 when both are empty."""
    p, t = np.squeeze(np.asarray(pred)) > 0, np.squeeze(np.asarray(true)) > 0
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in shape: {p.shape} vs {t.shape}")
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else 1.0


def _binary(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.squeeze(np.asarray(x))
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D map, got shape {np.shape(x)}")
    return arr > 0


def pixel_error(pred: np.ndarray, true: np.ndarray) -> float:
    """Fraction of pixels whose class (cell interior vs membrane) differs: ``1 -`` pixel accuracy."""
    p, t = _binary(pred, "pred"), _binary(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in shape: {p.shape} vs {t.shape}")
    return float(np.count_nonzero(p != t) / p.size)


def cell_regions(cells: np.ndarray, connectivity: int = 1, fill_membrane: bool = False) -> np.ndarray:
    """Cell regions of a binary cell map: connected components of its non-zero pixels (int64, 0 = membrane).

    ``connectivity`` 1 (4-neighbours in 2D): cells that touch only diagonally across a membrane stay apart.
    ``fill_membrane``: give every membrane pixel to its nearest region (Euclidean; the membranes thinned to
    zero width, as the challenge thins predicted borders before its Rand scoring).
    """
    fg = _binary(cells, "cells")
    structure = ndimage.generate_binary_structure(fg.ndim, connectivity)
    labels, n = ndimage.label(fg, structure=structure)
    labels = labels.astype(np.int64, copy=False)
    if fill_membrane and n and not fg.all():
        _, nearest = ndimage.distance_transform_edt(~fg, return_indices=True)
        labels = labels[tuple(nearest)]
    return labels


@dataclass(frozen=True)
class RandScores:
    """Foreground-restricted Rand scores of a segmentation against the truth (Arganda-Carreras et al. 2015).

    Over the pairs of distinct pixels inside true cells: ``split`` (V_rand_split) is the fraction of the
    pairs in one true cell that are also in one predicted region (low = cells split), ``merge``
    (V_rand_merge) the fraction of the pairs in one predicted region that are also in one true cell (low =
    cells merged); ``f_score`` (V_rand) is their harmonic mean, ``error = 1 - f_score``.
    """

    split: float
    merge: float

    @property
    def f_score(self) -> float:
        """V_rand: the harmonic mean of the split and merge scores."""
        total = self.split + self.merge
        return 2 * self.split * self.merge / total if total else 0.0

    @property
    def error(self) -> float:
        """The Rand error, ``1 - f_score``."""
        return 1.0 - self.f_score


def rand_scores(pred: np.ndarray, true: np.ndarray, connectivity: int = 1) -> RandScores:
    """Foreground-restricted Rand scores of the cell regions of two binary maps (non-zero = cell).

    True regions: the connected components of the true cell pixels (:func:`cell_regions`); only pixels
    inside them count (the true membranes are left out, "foreground-restricted"). Predicted regions: the
    components of the predicted cell pixels, with every predicted membrane pixel given to its nearest region
    (borders thinned away, so that the thickness of a predicted membrane does not count, only whether it
    separates). Computed with :func:`skimage.metrics.adapted_rand_error` (the SNEMI3D / ISBI 2012 "adapted
    Rand" score).
    """
    from skimage.metrics import adapted_rand_error

    p, t = _binary(pred, "pred"), _binary(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in shape: {p.shape} vs {t.shape}")
    if not t.any():
        raise ValueError("true has no cell pixels: the foreground-restricted Rand score is undefined")
    true_regions = cell_regions(t, connectivity)
    pred_regions = cell_regions(p, connectivity, fill_membrane=True)
    if not p.any():
        pred_regions = np.ones_like(true_regions)  # no membrane predicted: one region
    # skimage's "precision" divides by the true pairs, its "recall" by the predicted ones
    _, split, merge = adapted_rand_error(true_regions, pred_regions, ignore_labels=(0,))
    return RandScores(split=float(split), merge=float(merge))


def rand_error(pred: np.ndarray, true: np.ndarray, connectivity: int = 1) -> float:
    """Rand error ``1 - V_rand`` of the cell regions of two binary maps: see :func:`rand_scores`."""
    return rand_scores(pred, true, connectivity).error
