"""medseg.networks: the U-Net of Ronneberger et al. (2015), its shape arithmetic, the border-gated
two-network ensemble, and batch norm folding for inference."""

from medseg.networks import batch_norm_folding as _folding
from medseg.networks import border_gated_ensemble as _ensemble
from medseg.networks import unet as _unet
from medseg.networks.batch_norm_folding import *
from medseg.networks.border_gated_ensemble import *
from medseg.networks.unet import *

__all__ = [*_unet.__all__, *_ensemble.__all__, *_folding.__all__]
