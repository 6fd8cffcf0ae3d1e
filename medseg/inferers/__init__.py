"""medseg.inferers: overlap-tile inference for valid-convolution and same-padding networks, and any
MONAI inferer in a chosen precision."""

from medseg.inferers.mixed_precision import MixedPrecisionInferer
from medseg.inferers.overlap_tile import OverlapTileInferer, mirror_index

__all__ = ["MixedPrecisionInferer", "OverlapTileInferer", "mirror_index"]
