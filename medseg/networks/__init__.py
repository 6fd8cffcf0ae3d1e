"""medseg.networks: the U-Net of Ronneberger et al. (2015), its shape arithmetic, and the border-gated
two-network ensemble."""

from medseg.networks import border_gated_ensemble as _ensemble
from medseg.networks import unet as _unet
from medseg.networks.border_gated_ensemble import *
from medseg.networks.unet import *

__all__ = [*_unet.__all__, *_ensemble.__all__]
