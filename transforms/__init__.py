"""MONAI transforms from the U-Net paper (Ronneberger et al. 2015), installed as ``medseg.transforms``.

Each transform comes as an array transform and its dictionary twin (suffix ``d``). Besides the paper's
transforms: :class:`LabelInstances(d)` (instances from the gap-separated foreground),
:class:`ContourClasses(d)` (a background / interior / contour target from instance labels),
:class:`SeparateCells(d)` (cell maps whose membranes close, from a membrane network's probabilities) and
:class:`SeparableSpacing(d)`, MONAI's ``Spacing(d)`` with a faster resampler, and
:class:`InvertToLabelsd` (``Invertd`` + ``AsDiscreted`` without a full-size score map).
"""

from . import contour_classes as _contour_classes
from . import elastic as _elastic
from . import instances as _instances
from . import intensity as _intensity
from . import inverse_labels as _inverse_labels
from . import membranes as _membranes
from . import spacing as _spacing
from . import weight_map as _weight_map
from .contour_classes import *
from .elastic import *
from .instances import *
from .intensity import *
from .inverse_labels import *
from .membranes import *
from .spacing import *
from .weight_map import *

__all__ = [
    *_contour_classes.__all__,
    *_elastic.__all__,
    *_instances.__all__,
    *_intensity.__all__,
    *_inverse_labels.__all__,
    *_membranes.__all__,
    *_spacing.__all__,
    *_weight_map.__all__,
]
