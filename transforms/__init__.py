"""MONAI transforms from the U-Net paper (Ronneberger et al. 2015), installed as ``medseg.transforms``.

Each transform comes as an array transform and its dictionary twin (suffix ``d``).
"""

from .elastic import *
from .intensity import *
from .weight_map import *
