"""Cell maps from a membrane network's cell probability, with gaps in the predicted membranes closed.

A membrane (boundary) map is judged by whether its membranes separate the cells (Rand error of the
ISBI 2012 challenge; Ronneberger et al. 2015, Sec. 4): one faint spot in a membrane merges two cells.
:func:`separate_cells` thresholds the cell probability as usual, then grows the confident cell cores
(probability above ``seed_threshold``) over the thresholded cells by a watershed on the probability and
turns the 1-px watershed lines where two cores meet into membrane. Pixels elsewhere keep the thresholded
class, so the map changes only along those lines.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from scipy import ndimage

__all__ = ["SeparateCells", "SeparateCellsd", "separate_cells"]


def separate_cells(
    cell_prob: np.ndarray, threshold: float = 0.5, seed_threshold: float | None = 0.9
) -> np.ndarray:
    """Boolean cell map (``True`` = cell interior) of a 2D / 3D cell-probability array (no channel axis).

    ``cell_prob > threshold``, with the watershed lines between the regions grown from the connected
    components of ``cell_prob > seed_threshold`` set to membrane (within the connected parts of the
    thresholded map that hold a core; 4-/6-connected cores). ``seed_threshold=None``: the plain threshold.
    """
    from skimage.segmentation import watershed

    prob = np.asarray(cell_prob, dtype=np.float32)
    cells = prob > threshold
    if seed_threshold is None:
        return cells
    if seed_threshold < threshold:
        raise ValueError(f"seed_threshold {seed_threshold} must not be below threshold {threshold}")
    cores, n = ndimage.label(prob > seed_threshold)
    if n < 2:
        return cells
    basins = watershed(-prob, markers=cores, mask=cells, watershed_line=True)
    parts, _ = ndimage.label(cells)
    with_core = np.zeros(parts.max() + 1, dtype=bool)
    with_core[np.unique(parts[cores > 0])] = True
    with_core[0] = False
    return cells & ~((basins == 0) & with_core[parts])


class SeparateCells(Transform):
    """Channel-first probabilities ``(2, *spatial)`` (membrane, cell; e.g. after softmax) or the cell
    probability ``(1, *spatial)`` -> cell map ``(1, *spatial)`` (uint8: 1 = cell, 0 = membrane).

    See :func:`separate_cells`. Metadata of a ``MetaTensor`` input is kept.
    """

    def __init__(self, threshold: float = 0.5, seed_threshold: float | None = 0.9) -> None:
        self.threshold = float(threshold)
        self.seed_threshold = None if seed_threshold is None else float(seed_threshold)

    def __call__(self, prob: NdarrayOrTensor) -> NdarrayOrTensor:
        raw = prob.as_tensor() if isinstance(prob, MetaTensor) else prob
        arr = raw.detach().float().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
        if arr.ndim < 3 or arr.shape[0] not in (1, 2):
            raise ValueError(f"expected (1 or 2, *spatial) probabilities, got shape {arr.shape}")
        out = separate_cells(arr[-1], self.threshold, self.seed_threshold)[None].astype(np.uint8)
        if isinstance(prob, MetaTensor):
            return MetaTensor(torch.from_numpy(out), meta=dict(prob.meta))
        if isinstance(prob, torch.Tensor):
            return torch.from_numpy(out).to(prob.device)
        return out


class SeparateCellsd(MapTransform):
    """Dictionary version of :class:`SeparateCells`, in place on ``keys``.

    E.g. in a membrane bundle's post-processing after ``Activationsd(softmax=True)``:
    ``{"_target_": "medseg.transforms.SeparateCellsd", "keys": "pred", "seed_threshold": 0.9}``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float = 0.5,
        seed_threshold: float | None = 0.9,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = SeparateCells(threshold, seed_threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
