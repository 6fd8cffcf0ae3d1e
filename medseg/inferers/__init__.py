"""medseg.inferers: overlap-tile inference for valid-convolution and same-padding networks."""

from medseg.inferers.overlap_tile import OverlapTileInferer, mirror_index

__all__ = ["OverlapTileInferer", "mirror_index"]
