"""Three-class training target of instance labels: background, nucleus interior, nucleus contour.

The paper's two-class target separates touching cells by a 1-px background gap (Ronneberger et al. 2015,
Sec. 3). A third class for each instance's contour (the pixels within ``width`` px, chessboard distance,
of a pixel outside that instance) widens what separates two touching interiors to the gap plus two
contours, so the interiors stay apart where a 1-px gap is not predicted; the instances are then the
interior components grown back over the contours (:func:`medseg.transforms.label_instances` with
``interior``, :class:`medseg.transforms.LabelInstances` with ``interior_label``). This is the "boundary"
class of Caicedo et al. (2019, Cytometry A 95: 952-965).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type
from scipy import ndimage

from .weight_map import _as_label_array

__all__ = ["BACKGROUND", "INTERIOR", "CONTOUR", "contour_classes", "ContourClasses", "ContourClassesd"]

BACKGROUND, INTERIOR, CONTOUR = 0, 1, 2


def contour_classes(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Classes of an instance-label image (no channel axis): 0 background, 1 interior, 2 contour (uint8).

    A pixel of instance ``i`` is contour when a pixel within ``width`` px (chessboard distance; the image
    edge excluded) is not ``i``: background, or another instance touching it.
    """
    arr = _as_label_array(labels)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    footprint = np.ones((2 * int(width) + 1,) * arr.ndim, dtype=bool)
    high = ndimage.maximum_filter(arr, footprint=footprint, mode="nearest")
    low = ndimage.minimum_filter(arr, footprint=footprint, mode="nearest")
    fg = arr > 0
    out = np.zeros(arr.shape, dtype=np.uint8)
    out[fg] = INTERIOR
    out[fg & ((high != arr) | (low != arr))] = CONTOUR
    return out


class ContourClasses(Transform):
    """Channel-first instance labels ``(C, *spatial)`` -> classes 0/1/2 of :func:`contour_classes`.

    Same type, device and metadata as the input; dtype float32 for tensors (a target for spatial
    transforms and the cross-entropy), uint8 for numpy arrays.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, width: int = 1) -> None:
        self.width = int(width)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        arr = convert_data_type(img, np.ndarray)[0]
        if arr.ndim < 3:
            raise ValueError(f"expected channel-first instance labels (C, H, W[, D]), got shape {arr.shape}")
        out = np.stack([contour_classes(ch, self.width) for ch in arr])
        dtype = torch.float32 if isinstance(img, torch.Tensor) else np.uint8
        return convert_to_dst_type(out, img, dtype=dtype)[0]


class ContourClassesd(MapTransform):
    """Dictionary twin of :class:`ContourClasses` (replaces each key's instance labels by the classes)."""

    backend = ContourClasses.backend

    def __init__(self, keys: KeysCollection, width: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ContourClasses(width)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
