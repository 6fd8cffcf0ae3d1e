"""Instances from a separated foreground mask: the inverse of the paper's 1-px gap separation.

The U-Net of Ronneberger et al. (2015, Sec. 3) is trained to predict the background gap between touching
cells, so the predicted foreground's connected components are the cells, each shrunk by the gap. This
labels the components, drops tiny ones (noise specks), and gives the gap pixels between two cells back
to the nearest one, so that touching cells come out as touching instances of their full size.

Where the network leaves no gap (dim or crowded nuclei), components that are two or more cells joined by a
neck can also be split by the classic distance-transform watershed (Beucher and Meyer 1993): one marker per
h-maximum of the smoothed distance to the background, flooded within the foreground (scikit-image's
``watershed`` and ``h_maxima``).

A network trained on three classes (background, interior, contour: :class:`medseg.transforms.ContourClasses`)
gives the markers itself: each component of its interior is one instance, grown back over the contour
pixels around it by the same watershed (``interior``).

Given the network's softmax output instead of its argmax, objects whose mean foreground probability is low
(faint texture, out-of-focus debris, the background of an image unlike the training images) can be dropped
as well (``min_mean_probability``): an object-level confidence, as in the detection score of Mask R-CNN
(He et al. 2017) or the object probability of StarDist (Schmidt et al. 2018).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

__all__ = ["LabelInstances", "LabelInstancesd", "label_instances"]


def _between_two_instances(labels: np.ndarray) -> np.ndarray:
    """Background pixels whose opposite neighbours (along an axis or a diagonal) are two instances."""
    padded = np.pad(labels, 1)
    inner = tuple(slice(1, -1) for _ in range(labels.ndim))
    gap = np.zeros(labels.shape, dtype=bool)
    for off in itertools.product((-1, 0, 1), repeat=labels.ndim):
        if off <= tuple(-o for o in off):  # each opposite pair once, and not the centre
            continue
        a = padded[tuple(slice(1 + o, padded.shape[i] - 1 + o) for i, o in enumerate(off))]
        b = padded[tuple(slice(1 - o, padded.shape[i] - 1 - o) for i, o in enumerate(off))]
        gap |= (a > 0) & (b > 0) & (a != b)
    return gap & (padded[inner] == 0)


def _keep(labels: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, int]:
    """``labels`` with only the ids where ``keep`` (a fresh array indexed by id), renumbered 1..m."""
    keep[0] = False
    new_ids = np.zeros(len(keep), dtype=np.int64)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels], int(keep.sum())


def _drop_small(labels: np.ndarray, n: int, min_size: int) -> tuple[np.ndarray, int]:
    """``labels`` 1..n without the regions under ``min_size`` pixels, renumbered 1..m consecutively."""
    if not n or min_size <= 1:
        return labels, n
    return _keep(labels, np.bincount(labels.ravel(), minlength=n + 1) >= min_size)


def _drop_unsure(labels: np.ndarray, n: int, prob: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """``labels`` 1..n without the regions whose mean of ``prob`` is under ``threshold``, renumbered."""
    if not n:
        return labels, n
    means = np.asarray(ndimage.mean(prob, labels, np.arange(1, n + 1)))
    return _keep(labels, np.r_[False, means >= threshold])


def _flood(
    fg: np.ndarray, dist: np.ndarray, markers: np.ndarray, n: int, structure: np.ndarray
) -> tuple[np.ndarray, int]:
    """Watershed of ``-dist`` from ``markers`` (1..n) within ``fg``; unmarked components kept whole."""
    labels = watershed(-dist, markers, mask=fg, connectivity=structure)
    rest, m = ndimage.label(fg & (labels == 0), structure=structure)
    return np.where(rest > 0, rest + n, labels), n + m


def _split_at_necks(fg: np.ndarray, h: float, sigma: float, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """Distance-transform watershed of ``fg``: one region per h-maximum; unmarked components kept whole."""
    dist = ndimage.distance_transform_edt(fg)
    if sigma > 0:
        dist = ndimage.gaussian_filter(dist, sigma)
    markers, n = ndimage.label(h_maxima(dist, h).astype(bool) & fg, structure=structure)
    return _flood(fg, dist, markers, n, structure)


def _grow_interiors(
    fg: np.ndarray, inner: np.ndarray, min_size: int, structure: np.ndarray
) -> tuple[np.ndarray, int]:
    """Watershed of the distance to the background from the interior components, within ``fg``."""
    markers, n = _drop_small(*ndimage.label(inner, structure=structure), min_size)
    if not n:
        return ndimage.label(fg, structure=structure)
    return _flood(fg, ndimage.distance_transform_edt(fg), markers, n, structure)


def label_instances(
    foreground: np.ndarray,
    min_size: int = 10,
    connectivity: int = 1,
    fill_gaps: bool = True,
    fill_holes: bool = True,
    split_h: float | None = None,
    split_sigma: float = 1.0,
    interior: np.ndarray | None = None,
    min_interior_size: int = 1,
    probability: np.ndarray | None = None,
    min_mean_probability: float = 0.0,
) -> np.ndarray:
    """Instance labels (0 = background, 1..N consecutive) of a binary foreground (no channel axis).

    Args:
        foreground: boolean / 0-1 array; non-zero is foreground.
        min_size: components with fewer pixels are dropped (set to background).
        connectivity: 1 (default; 4-neighbours in 2D, 6 in 3D) separates cells whose gap is only
            diagonal; ``ndim`` for full connectivity.
        fill_gaps: give background pixels that lie between two different instances (opposite neighbours,
            along an axis or a diagonal, of two ids: the separating gaps) to the nearest instance.
        fill_holes: fill holes inside each component first (nuclei and cells are solid).
        split_h: split components at necks: watershed of the distance to the background (Gaussian-smoothed
            with ``split_sigma`` px) from its maxima of height >= ``split_h`` px. ``None``: no split (only
            the network's gaps separate instances). A component without such a maximum stays whole.
        split_sigma: smoothing of the distance map before finding its maxima (0: none).
        interior: boolean array of the instances' interiors (a three-class network's interior class),
            part of the foreground: its components of at least ``min_interior_size`` px are the markers of
            the watershed of the distance to the background within the foreground (replaces ``split_h``);
            foreground components without such a marker stay whole.
        min_interior_size: smaller interior components are not markers (their pixels join a neighbour).
        probability: foreground probability per pixel (same shape), for ``min_mean_probability``.
        min_mean_probability: objects whose mean ``probability`` is lower are dropped (0: keep all).

    Returns:
        uint16 labels (uint32 beyond 65535 instances).
    """
    fg = np.asarray(foreground) > 0
    if min_mean_probability > 0 and (probability is None or np.shape(probability) != fg.shape):
        shape = None if probability is None else np.shape(probability)
        raise ValueError(f"min_mean_probability needs a probability map of shape {fg.shape}, got {shape}")
    inner = None if interior is None else np.asarray(interior) > 0
    if inner is not None:
        fg = fg | inner
    if fill_holes:
        fg = ndimage.binary_fill_holes(fg)
    structure = ndimage.generate_binary_structure(fg.ndim, connectivity)
    if inner is not None:
        labels, n = _grow_interiors(fg, inner, int(min_interior_size), structure)
    elif split_h is not None and fg.any():
        labels, n = _split_at_necks(fg, float(split_h), float(split_sigma), structure)
    else:
        labels, n = ndimage.label(fg, structure=structure)
    labels, n = _drop_small(labels.astype(np.int64, copy=False), n, min_size)
    if min_mean_probability > 0:
        labels, n = _drop_unsure(labels, n, np.asarray(probability), float(min_mean_probability))
    if n > 1 and fill_gaps:
        gap = _between_two_instances(labels)
        if gap.any():
            _, nearest = ndimage.distance_transform_edt(labels == 0, return_indices=True)
            labels = labels.copy()
            labels[gap] = labels[tuple(ax[gap] for ax in nearest)]
    dtype = np.uint16 if n < 65536 else np.uint32
    return labels.astype(dtype)


class LabelInstances(Transform):
    """Channel-first mask ``(1, *spatial)`` (or one-hot) -> instance labels ``(1, *spatial)``.

    See :func:`label_instances`. A one-hot or softmax input (C > 1 channels) is read as its argmax. Foreground
    is every class above 0; with ``interior_label`` set (a three-class network: 1 for
    :class:`medseg.transforms.ContourClasses`), the pixels of that class are the interiors grown into
    instances. With ``min_mean_probability`` the input must be the softmax output: one minus its background
    channel is the foreground probability whose mean over an object decides whether it is kept. Metadata of
    a ``MetaTensor`` input is kept.
    """

    def __init__(
        self,
        min_size: int = 10,
        connectivity: int = 1,
        fill_gaps: bool = True,
        fill_holes: bool = True,
        split_h: float | None = None,
        split_sigma: float = 1.0,
        interior_label: int | None = None,
        min_interior_size: int = 1,
        min_mean_probability: float = 0.0,
    ) -> None:
        self.min_size = int(min_size)
        self.connectivity = int(connectivity)
        self.fill_gaps = bool(fill_gaps)
        self.fill_holes = bool(fill_holes)
        self.split_h = None if split_h is None else float(split_h)
        self.split_sigma = float(split_sigma)
        self.interior_label = None if interior_label is None else int(interior_label)
        self.min_interior_size = int(min_interior_size)
        self.min_mean_probability = float(min_mean_probability)

    def __call__(self, mask: NdarrayOrTensor) -> NdarrayOrTensor:
        raw = mask.as_tensor() if isinstance(mask, MetaTensor) else mask
        arr = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
        if arr.ndim < 2:
            raise ValueError(f"expected a channel-first mask, got shape {arr.shape}")
        classes = np.argmax(arr, axis=0) if arr.shape[0] > 1 else np.rint(arr[0])  # one-hot or a label map
        probability = None
        if self.min_mean_probability > 0:
            if arr.shape[0] < 2:
                raise ValueError(
                    "min_mean_probability needs the network's softmax output (C > 1 channels), "
                    f"got {arr.shape[0]} channel"
                )
            probability = 1.0 - arr[0].astype(np.float32)
        interior = None if self.interior_label is None else classes == self.interior_label
        out = label_instances(
            classes > 0,
            self.min_size,
            self.connectivity,
            self.fill_gaps,
            self.fill_holes,
            self.split_h,
            self.split_sigma,
            interior=interior,
            min_interior_size=self.min_interior_size,
            probability=probability,
            min_mean_probability=self.min_mean_probability,
        )[None]
        if isinstance(mask, MetaTensor):
            return MetaTensor(torch.from_numpy(out.astype(np.int32)), meta=dict(mask.meta))
        if isinstance(mask, torch.Tensor):
            return torch.from_numpy(out.astype(np.int32))
        return out


class LabelInstancesd(MapTransform):
    """Dictionary version of :class:`LabelInstances`: writes the instances of ``keys`` to ``instance_key``.

    E.g. in a bundle's post-processing after ``Activationsd(softmax=True)`` (before ``AsDiscreted``):
    ``{"_target_": "medseg.transforms.LabelInstancesd", "keys": "pred", "instance_key": "instances"}``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        instance_key: str = "instances",
        min_size: int = 10,
        connectivity: int = 1,
        fill_gaps: bool = True,
        fill_holes: bool = True,
        split_h: float | None = None,
        split_sigma: float = 1.0,
        interior_label: int | None = None,
        min_interior_size: int = 1,
        min_mean_probability: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("LabelInstancesd takes one mask key")
        self.instance_key = instance_key
        self.transform = LabelInstances(
            min_size,
            connectivity,
            fill_gaps,
            fill_holes,
            split_h,
            split_sigma,
            interior_label,
            min_interior_size,
            min_mean_probability,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.instance_key] = self.transform(d[key])
        return d
