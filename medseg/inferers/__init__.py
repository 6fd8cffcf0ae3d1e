"""medseg.inferers: overlap-tile inference for valid-convolution and same-padding networks, and any
MONAI inferer in a chosen precision; test-time normalisation of the object size (ScaleNormalisingInferer)."""

from medseg.inferers.mixed_precision import MixedPrecisionInferer
from medseg.inferers.overlap_tile import OverlapTileInferer, mirror_index
from medseg.inferers.scale_normalising import ScaleNormalisingInferer, median_diameter

__all__ = [
    "MixedPrecisionInferer",
    "OverlapTileInferer",
    "ScaleNormalisingInferer",
    "median_diameter",
    "mirror_index",
]
