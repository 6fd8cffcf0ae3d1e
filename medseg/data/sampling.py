"""Sampling weights for tile-based training: images drawn in proportion to their pixel count.

The U-Net is trained on random tiles (Ronneberger et al. 2015, Sec. 3), one or a few per image drawn.
With one draw per image a 256x256 field and a 1040x1388 one give the same number of tiles, so the
pixels (and the nuclei) of the large images are seen several times less often. Weighting each image
by its pixel count in a ``torch.utils.data.WeightedRandomSampler`` (``replacement=True``) gives each
image tiles in proportion to its area (where in the image a tile lies is up to the crop transform).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["area_weights"]


def area_weights(items: Sequence[Mapping[str, Any]], key: str = "image") -> list[float]:
    """Pixel (voxel) count of each item's ``key`` image, as sampling weights.

    Images are read with :class:`medseg.data.StrictLoadImage`, so an unreadable file fails here with
    its path and reason, before training starts.
    """
    from medseg.data.loading import StrictLoadImage

    load = StrictLoadImage(image_only=True, ensure_channel_first=True)
    weights = []
    for item in items:
        if key not in item:
            raise KeyError(f"datalist item {dict(item)!r} has no {key!r} entry")
        image = load(item[key])
        weights.append(float(math.prod(image.shape[1:])))
    if not weights:
        raise ValueError("area_weights: the datalist is empty")
    return weights
