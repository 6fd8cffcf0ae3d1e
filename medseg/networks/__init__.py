"""medseg.networks: the U-Net of Ronneberger et al. (2015) and its shape arithmetic."""

from medseg.networks import unet as _unet
from medseg.networks.unet import *

__all__ = list(_unet.__all__)
