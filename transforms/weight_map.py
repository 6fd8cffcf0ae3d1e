"""The U-Net loss weight map (Ronneberger et al. 2015, section 3, equation 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

``d1`` / ``d2`` are the distances from a background pixel ``x`` to the nearest / second-nearest cell,
``w_c`` balances the class frequencies. Touching cells are first separated by a 1-px background gap
(the paper's preprocessing; see :func:`separate_instances`).

Distances are exact Euclidean distance transforms (:func:`scipy.ndimage.distance_transform_edt`),
one per instance, each restricted to the instance's bounding box dilated by a margin beyond which the
border term is below ``tolerance``; the two smallest distances per pixel are kept with a running
min / second-min update. See :func:`unet_weight_map` for the error bound.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type, ensure_tuple_rep
from scipy import ndimage

__all__ = [
    "separate_instances",
    "unet_weight_map",
    "UNetWeightMap",
    "UNetWeightMapd",
    "UNetWeightMapD",
    "UNetWeightMapDict",
]


def _as_label_array(labels: NdarrayOrTensor | np.ndarray) -> np.ndarray:
    """An integer numpy view/copy of an instance-label image; rejects negative or fractional labels."""
    arr = convert_data_type(labels, np.ndarray)[0]
    if arr.dtype == bool:
        return arr.astype(np.int32)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError("instance labels must be integers (got non-integer floating-point values)")
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"instance labels must be an integer image, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError("instance labels must be >= 0 (0 = background)")
    return arr


def _preceding_offsets(ndim: int, connectivity: int) -> list[tuple[int, ...]]:
    """Neighbour offsets of the given connectivity that come *before* a pixel in C (raster) order."""
    offsets = []
    for off in itertools.product((-1, 0, 1), repeat=ndim):
        nonzero = [o for o in off if o != 0]
        if not nonzero or len(nonzero) > connectivity:
            continue
        if nonzero[0] < 0:  # lexicographically negative = earlier in raster order
            offsets.append(off)
    return offsets


def _shift_slices(off: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices (here, there) so that ``a[here]`` and ``a[there]`` are pixels ``x`` and ``x + off``."""
    here = tuple(slice(-o, None) if o < 0 else slice(0, -o if o > 0 else None) for o in off)
    there = tuple(slice(0, o) if o < 0 else slice(o, None) for o in off)
    return here, there


def _check_gap_width(gap_width: int) -> int:
    """``gap_width`` as an int; a clear error unless it is an odd integer >= 1."""
    if isinstance(gap_width, (bool, np.bool_)) or not isinstance(gap_width, (int, np.integer)):
        raise ValueError(f"gap_width must be an odd integer >= 1, got {gap_width!r}")
    if gap_width < 1 or gap_width % 2 == 0:
        raise ValueError(f"gap_width must be an odd integer >= 1, got {gap_width}")
    return int(gap_width)


def separate_instances(labels: np.ndarray, connectivity: int | None = None, gap_width: int = 1) -> np.ndarray:
    """Separate touching instances by a 1-px (or ``gap_width``) background gap (no channel axis).

    Of every pair of neighbouring foreground pixels with different instance ids, the pixel with the
    larger id is set to 0 (decided on the original labels, in one pass); every other pixel keeps its
    label. So only pixels that touch another instance are removed, and no two different instances stay
    neighbours. The authors' tool (Falk et al. 2019, ``TrainingSample.addLabelsAndWeightsToBlobs``) uses
    the same one-sided idea but removes the pixel that comes later in raster order, which on diagonal
    boundaries removes pixels on both sides (a 2-px gap); ordering by id keeps the gap at 1 px.

    Args:
        labels: instance labels, 0 = background.
        connectivity: neighbourhood in :func:`scipy.ndimage.generate_binary_structure` terms; ``None``
            (default, as the authors' tool) = full connectivity: 8 neighbours in 2D, 26 in 3D, so that
            the instances are also separate 8-/26-connected components. After the call no two different
            instances are neighbours in this connectivity.
        gap_width: odd width of the gap in pixels. Wider gaps (3, 5, ...) also remove the instance pixels
            within ``(gap_width - 1) / 2`` steps (in ``connectivity``) of the 1-px gap, on both sides.
            A cell the wider gap would erase keeps its 1-px separation. The ``fill_gaps`` of
            :class:`medseg.transforms.LabelInstances` gives back 1-px gaps only; wider ones need the
            instances grown back into the foreground (e.g. ``skimage.segmentation.expand_labels``
            within a foreground mask).

    Returns:
        A new integer array (the input's dtype for integer input).
    """
    arr = _as_label_array(labels)
    ndim = arr.ndim
    connectivity = ndim if connectivity is None else int(connectivity)
    if not 1 <= connectivity <= ndim:
        raise ValueError(f"connectivity must be in [1, {ndim}], got {connectivity}")
    gap_width = _check_gap_width(gap_width)
    remove = np.zeros(arr.shape, dtype=bool)
    for off in _preceding_offsets(ndim, connectivity):  # each neighbour pair once
        here, there = _shift_slices(off)
        a, b = arr[here], arr[there]
        touch = (a != b) & (a > 0) & (b > 0)
        remove[here] |= touch & (a > b)
        remove[there] |= touch & (b > a)
    out = arr.copy()
    out[remove] = 0
    if gap_width > 1 and remove.any():
        structure = ndimage.generate_binary_structure(ndim, connectivity)
        wide = ndimage.binary_dilation(remove, structure, iterations=(gap_width - 1) // 2) & (arr > 0)
        wider = np.where(wide, 0, arr)
        lost = np.setdiff1d(np.unique(out), np.unique(wider))  # cells the wide gap would erase entirely
        if lost.size:
            keep = np.isin(out, lost)
            wider[keep] = out[keep]
        out = wider
    return out


def _compact_slices(arr: np.ndarray) -> tuple[np.ndarray, list[tuple[int, tuple[slice, ...]]]]:
    """(labels, [(label, bounding box)]) of the non-empty instances; relabels if the ids are sparse."""
    max_label = int(arr.max()) if arr.size else 0
    if max_label > 4 * arr.size + 1024:  # very sparse ids: compact them so find_objects stays small
        uniq, inv = np.unique(arr, return_inverse=True)
        arr = inv.reshape(arr.shape).astype(np.int64)
        if uniq[0] != 0:  # no background pixel: ids must start at 1
            arr += 1
    boxes = ndimage.find_objects(arr)
    return arr, [(i + 1, box) for i, box in enumerate(boxes) if box is not None]


def _grow(box: tuple[slice, ...], pad: Sequence[int], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` dilated by ``pad`` pixels per axis, clipped to ``shape``."""
    grown = zip(box, pad, shape, strict=True)
    return tuple(slice(max(sl.start - p, 0), min(sl.stop + p, n)) for sl, p, n in grown)


def border_margin(w0: float, sigma: float, tolerance: float) -> float:
    """Distance beyond which ``w0 * exp(-d^2 / (2 sigma^2)) < tolerance``: ``sigma * sqrt(2 ln(w0/tol))``."""
    if w0 <= tolerance:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tolerance))


def unet_weight_map(
    labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | None = None,
    separate: bool = True,
    connectivity: int | None = None,
    sampling: float | Sequence[float] | None = None,
    tolerance: float = 1e-4,
    gap_width: int = 1,
) -> np.ndarray:
    """U-Net weight map (paper eq. 2) of one spatial instance-label array (2D or 3D, no channel axis).

    Args:
        labels: instance labels, 0 = background, each cell a distinct positive id.
        w0: border weight.
        sigma: border width, in the units of ``sampling`` (pixels when ``sampling`` is None).
        class_weights: ``(background, foreground)`` weights ``w_c``. ``None``: from this image's class
            frequencies, ``w_c(k) = n_rare / n_k``, i.e. the rarer class gets 1 and the other the
            frequency ratio (the authors' tool likewise uses foreground 1, background = ratio). An image
            with one class only gets ``w_c = 1``.
        separate: first apply :func:`separate_instances`; ``w_c``, ``d1`` and ``d2`` are then computed
            on the separated labels (the gap pixels are background and get the border term).
        connectivity, gap_width: passed to :func:`separate_instances`.
        sampling: pixel spacing per spatial axis (anisotropic distances), as in
            :func:`scipy.ndimage.distance_transform_edt`.
        tolerance: absolute error bound of the result. The term is < tolerance where ``d1 + d2 > m``,
            ``m = sigma * sqrt(2 ln(w0 / tolerance))`` (21.5 px for tolerance 1e-3, 24 px for 1e-4 at
            w0 = 10, sigma = 5). Each instance's distance transform is computed in its bounding box dilated
            by ``m - h`` (``h`` = the smallest pixel spacing). Inside the box the distance is exact;
            outside it exceeds ``m - h`` while the other of the two nearest cells is at least ``h`` away
            from a background pixel, so wherever a missed distance would be among the two nearest, both
            the true and the computed term are < tolerance. Likewise an instance with no other instance
            within ``m`` of its box is skipped. So the error is below tolerance everywhere.

    Returns:
        float32 array of ``labels.shape``: ``w_c`` everywhere plus the border term on background pixels.
    """
    arr = _as_label_array(labels)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D spatial label array, got shape {arr.shape}")
    if w0 < 0 or sigma < 0 or tolerance <= 0:
        raise ValueError(f"need w0 >= 0, sigma >= 0, tolerance > 0; got {w0}, {sigma}, {tolerance}")
    if separate:
        arr = separate_instances(arr, connectivity, gap_width)
    spacing = np.asarray(ensure_tuple_rep(1.0 if sampling is None else sampling, arr.ndim), dtype=float)
    if np.any(spacing <= 0):
        raise ValueError(f"sampling must be positive, got {tuple(spacing)}")

    fg = arr > 0
    if class_weights is None:
        n_fg = int(np.count_nonzero(fg))
        n_bg = arr.size - n_fg
        if n_fg == 0 or n_bg == 0:
            w_bg = w_fg = 1.0
        else:
            n_rare = min(n_fg, n_bg)
            w_bg, w_fg = n_rare / n_bg, n_rare / n_fg
    else:
        if len(class_weights) != 2:
            raise ValueError(f"class_weights must be (background, foreground), got {class_weights}")
        w_bg, w_fg = (float(c) for c in class_weights)
    weight = np.where(fg, np.float32(w_fg), np.float32(w_bg)).astype(np.float32, copy=False)

    margin = border_margin(w0, sigma, tolerance)
    if margin == 0.0 or sigma == 0.0:
        return weight
    arr, boxes = _compact_slices(arr)
    if len(boxes) < 2:  # no second-nearest cell anywhere: the border term is 0
        return weight
    # Outside the EDT box of an instance its distance is > margin - min(spacing); a background pixel is at
    # least min(spacing) from any other cell, so d1 + d2 > margin there and the term is < tolerance.
    pad = [math.floor((margin - spacing.min()) / s) for s in spacing]
    # An instance with no other instance within `margin` of its box is skipped: d1 + d2 > margin.
    pad_other = [math.floor(margin / s) + 1 for s in spacing]
    d1 = np.full(arr.shape, np.inf)
    d2 = np.full(arr.shape, np.inf)
    samp = None if sampling is None else tuple(spacing)
    for lab, box in boxes:
        near = arr[_grow(box, pad_other, arr.shape)]
        if np.count_nonzero(near) == np.count_nonzero(near == lab):
            continue
        crop = _grow(box, pad, arr.shape)
        dist = ndimage.distance_transform_edt(arr[crop] != lab, sampling=samp)
        c1, c2 = d1[crop], d2[crop]  # views: updated in place
        np.minimum(c2, np.maximum(c1, dist), out=c2)
        np.minimum(c1, dist, out=c1)
    total = np.add(d1, d2, out=d1)
    total *= total
    total *= -1.0 / (2.0 * sigma * sigma)
    np.exp(total, out=total)
    total *= w0
    total[fg] = 0.0  # the border term is on background pixels only
    weight += total.astype(np.float32)
    return weight


class UNetWeightMap(Transform):
    """U-Net pixel weight map (paper eq. 2) from a channel-first instance-label image.

    Input ``(C, H, W[, D])`` instance labels (0 = background; numpy, torch or MetaTensor, any device);
    each channel is processed on its own with :func:`unet_weight_map` (scipy, on the CPU). Output: a
    float32 array/tensor of the same shape, type and device, carrying the input's metadata.

    Args: see :func:`unet_weight_map`.
    """

    backend = [TransformBackends.NUMPY]  # scipy on the CPU; torch in, torch out (same device)

    def __init__(
        self,
        w0: float = 10.0,
        sigma: float = 5.0,
        class_weights: Sequence[float] | None = None,
        separate: bool = True,
        connectivity: int | None = None,
        sampling: float | Sequence[float] | None = None,
        tolerance: float = 1e-4,
        gap_width: int = 1,
    ) -> None:
        self.w0 = float(w0)
        self.sigma = float(sigma)
        self.class_weights = None if class_weights is None else tuple(float(c) for c in class_weights)
        self.separate = separate
        self.connectivity = connectivity
        self.sampling = sampling
        self.tolerance = float(tolerance)
        self.gap_width = _check_gap_width(gap_width)  # a bad config value fails here, not on the first sample

    @staticmethod
    def _channels(img: NdarrayOrTensor) -> np.ndarray:
        arr = convert_data_type(img, np.ndarray)[0]
        if arr.ndim not in (3, 4):
            raise ValueError(f"expected a channel-first 2D or 3D label image (C, H, W[, D]), got {arr.shape}")
        return arr

    def separate_labels(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``img`` with touching instances separated (:func:`separate_instances`), same type/dtype/meta."""
        arr = self._channels(img)
        out = np.stack([separate_instances(ch, self.connectivity, self.gap_width) for ch in arr])
        return convert_to_dst_type(out, img)[0]

    def __call__(self, img: NdarrayOrTensor, separate: bool | None = None) -> NdarrayOrTensor:
        """The weight map of ``img``; ``separate`` overrides the constructor's choice for this call."""
        arr = self._channels(img)
        sep = self.separate if separate is None else separate
        out = np.stack(
            [
                unet_weight_map(
                    ch,
                    self.w0,
                    self.sigma,
                    self.class_weights,
                    sep,
                    self.connectivity,
                    self.sampling,
                    self.tolerance,
                    self.gap_width,
                )
                for ch in arr
            ]
        )
        dtype = torch.float32 if isinstance(img, torch.Tensor) else np.float32
        return convert_to_dst_type(out, img, dtype=dtype)[0]


class UNetWeightMapd(MapTransform):
    """Dictionary twin of :class:`UNetWeightMap`: writes the weight map of ``key`` to ``weight_key``.

    The weight map is a new item (float32, with a copy of the label's metadata), so spatial transforms
    listed after this one warp it when their ``keys`` include it (use bilinear/nearest, never cubic).

    With ``separate=True`` and ``update_label=True`` (default) the label item itself is replaced by the
    separated instance labels: same type, dtype, shape and metadata; the pixels of the 1-px gaps
    (see :func:`separate_instances`) become 0, every other pixel keeps its instance id. The binary
    training target is then ``label > 0`` (e.g. ``monai.transforms.AsDiscreted(threshold=0.5)`` or
    ``Lambdad``), consistent with the weight map, whose border term covers the gap pixels. With
    ``update_label=False`` the label item is left untouched.

    Args:
        keys: instance-label keys.
        weight_key: output key(s), one per key (a single name is allowed for a single key).
        update_label: write the separated labels back to ``key`` (only when ``separate``).
        other args: see :func:`unet_weight_map`.
    """

    backend = UNetWeightMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        weight_key: str | Sequence[str] = "weight",
        w0: float = 10.0,
        sigma: float = 5.0,
        class_weights: Sequence[float] | None = None,
        separate: bool = True,
        connectivity: int | None = None,
        sampling: float | Sequence[float] | None = None,
        tolerance: float = 1e-4,
        update_label: bool = True,
        allow_missing_keys: bool = False,
        gap_width: int = 1,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        weight_keys = (weight_key,) if isinstance(weight_key, str) else tuple(weight_key)
        if len(weight_keys) != len(self.keys):
            raise ValueError(f"need one weight_key per key: keys={self.keys}, weight_key={weight_keys}")
        self.weight_keys = weight_keys
        self.update_label = update_label
        self.transform = UNetWeightMap(
            w0, sigma, class_weights, separate, connectivity, sampling, tolerance, gap_width
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, wkey in self.key_iterator(d, self.weight_keys):
            label = d[key]
            if self.transform.separate:
                label = self.transform.separate_labels(label)
                if self.update_label:
                    d[key] = label
            d[wkey] = self.transform(label, separate=False)
        return d


UNetWeightMapD = UNetWeightMapDict = UNetWeightMapd
