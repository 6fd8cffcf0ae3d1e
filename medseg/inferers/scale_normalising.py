"""Test-time size normalisation of objects (Cellpose's "diameter", Stringer et al. 2021) as an inferer.

A network trained on nuclei of one typical size resolves neither much smaller ones (their 1-2 px gaps
are below its resolution) nor much larger ones (beyond its receptive field). :class:`ScaleNormalisingInferer`
wraps another inferer: a first pass at the native scale gives instances, their median diameter is
estimated, and when it is far from the diameter the network was trained on the image is resized by
``target / estimate`` (bilinear), the network runs again, and its output is resized back to the input's
size (bilinear), so that post-processing and writers see an output of the usual size. That output replaces
the first pass's or is averaged with it (a two-scale ensemble).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.meta_tensor import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

__all__ = ["ScaleNormalisingInferer", "median_diameter"]

logger = logging.getLogger(__name__)


def median_diameter(labels: np.ndarray | torch.Tensor, min_size: int = 25) -> float:
    """Median equivalent diameter of the instances of ``labels`` (no channel axis; 0 = background).

    2D: the diameter of the disc of the same area, ``2 * sqrt(area / pi)``; 3D: of the ball of the same
    volume. Instances under ``min_size`` pixels (voxels) are left out; ``nan`` when none is left.
    """
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    sizes = np.bincount(arr.astype(np.int64, copy=False).ravel())[1:]
    sizes = sizes[sizes >= max(1, int(min_size))]
    if sizes.size == 0:
        return math.nan
    size = float(np.median(sizes))
    if arr.ndim == 3:
        return float(2.0 * (3.0 * size / (4.0 * np.pi)) ** (1.0 / 3.0))
    return float(2.0 * np.sqrt(size / np.pi))


class ScaleNormalisingInferer(Inferer):
    """Runs ``inferer`` again on the image resized so that its objects have ``target_diameter`` pixels.

    Args:
        inferer: the inferer of one pass (e.g. :class:`~medseg.inferers.OverlapTileInferer`), returning
            class scores (logits or probabilities, not ``output="labels"``: they are interpolated); its
            ``precision`` and ``roi_size`` are exposed as this inferer's.
        target_diameter: the median object diameter (px) the network does best on, e.g. the median over
            its training labels (``benchmarks/nuclei_diameter.py``). ``None``: one pass, no rescaling.
        min_size: instances of the first pass under this many pixels are not counted in the estimate.
        split_h: ``split_h`` of :func:`medseg.transforms.label_instances` for the first-pass instances.
        tolerance: no second pass while ``target / estimate`` lies within ``[1 / (1 + tolerance),
            1 + tolerance]``.
        min_scale, max_scale: bounds of the scale factor ``target / estimate``.
        upscale_only: rescale only images whose objects are smaller than the target.
        flip_tta: test-time flips in the rescaled pass (``None``: as ``inferer``).
        combine: ``"replace"``: the rescaled pass's output (resized back) replaces the first pass's;
            ``"mean"``: the two are averaged (a two-scale ensemble).
        foreground_channel: the output channel of the objects (one channel: logit > 0 is foreground).
        interior_channel: for a three-class network (background 0, interior, contour; see
            :class:`medseg.transforms.ContourClasses`): the interior's channel. Every class but 0 is then
            foreground and the first-pass instances are its interiors grown back (``split_h`` unused).

    The output has the size, dtype and batch of the first pass; every batch item gets its own scale.
    ``last_scales`` holds the factors of the last call (1.0: not rescaled).
    """

    def __init__(
        self,
        inferer: Callable[..., Any],
        target_diameter: float | None = None,
        min_size: int = 25,
        split_h: float | None = 1.0,
        tolerance: float = 0.25,
        min_scale: float = 0.5,
        max_scale: float = 4.0,
        upscale_only: bool = False,
        flip_tta: bool | None = None,
        combine: str = "replace",
        foreground_channel: int = 1,
        interior_channel: int | None = None,
    ) -> None:
        super().__init__()
        if target_diameter is not None and target_diameter <= 0:
            raise ValueError(f"target_diameter must be > 0, got {target_diameter}")
        if not 0 < min_scale <= 1 <= max_scale:
            raise ValueError(f"need 0 < min_scale <= 1 <= max_scale, got {min_scale}, {max_scale}")
        if getattr(inferer, "output", "logits") == "labels":
            raise ValueError("the inner inferer must return class scores (output='logits'), not labels")
        if combine not in ("replace", "mean"):
            raise ValueError(f"combine must be 'replace' or 'mean', got {combine!r}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.inferer = inferer
        self.target_diameter = None if target_diameter is None else float(target_diameter)
        self.min_size = int(min_size)
        self.split_h = None if split_h is None else float(split_h)
        self.tolerance = float(tolerance)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.upscale_only = bool(upscale_only)
        self.flip_tta = flip_tta
        self.combine = combine
        self.foreground_channel = int(foreground_channel)
        self.interior_channel = None if interior_channel is None else int(interior_channel)
        self.last_scales: list[float] = []

    # the predict engine sets the precision of a copy of the bundle's inferer and reads its tile size
    @property
    def precision(self) -> Any:
        return getattr(self.inferer, "precision", None)

    @precision.setter
    def precision(self, value: Any) -> None:
        self.inferer = copy.copy(self.inferer)  # a copy of this inferer must not change the original's
        self.inferer.precision = value

    @property
    def roi_size(self) -> Any:
        return getattr(self.inferer, "roi_size", None)

    def scale_for(self, diameter: float) -> float:
        """The factor the image is resized by for an estimated ``diameter`` (1.0: left as it is)."""
        if self.target_diameter is None or not math.isfinite(diameter) or diameter <= 0:
            return 1.0
        scale = self.target_diameter / diameter
        if 1.0 / (1.0 + self.tolerance) <= scale <= 1.0 + self.tolerance:
            return 1.0
        if self.upscale_only and scale < 1.0:
            return 1.0
        return float(min(self.max_scale, max(self.min_scale, scale)))

    def estimate_diameter(self, pred: torch.Tensor) -> float:
        """Median instance diameter of one first-pass output ``(C, *spatial)``."""
        from medseg.transforms import label_instances

        raw = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
        interior = None
        if raw.shape[0] == 1:
            fg = raw[0] > 0
        elif self.interior_channel is not None:
            classes = raw.argmax(0)
            fg, interior = classes != 0, (classes == self.interior_channel).cpu().numpy()
        else:
            fg = raw.argmax(0) == self.foreground_channel
        fg = fg.cpu().numpy()
        labels = label_instances(fg, min_size=self.min_size, split_h=self.split_h, interior=interior)
        return median_diameter(labels, self.min_size)

    def _rescaled_pass(
        self, x: torch.Tensor, scale: float, network: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        spatial = tuple(int(n) for n in x.shape[2:])
        size = tuple(max(1, round(n * scale)) for n in spatial)
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        xs = F.interpolate(x.float(), size=size, mode=mode, align_corners=False).to(x.dtype)
        inner = self.inferer
        if self.flip_tta is not None and hasattr(inner, "flip_tta") and inner.flip_tta != self.flip_tta:
            inner = copy.copy(inner)
            inner.flip_tta = self.flip_tta
        y = inner(xs, network, *args, **kwargs)
        y = y.as_tensor() if isinstance(y, MetaTensor) else y
        return F.interpolate(y.float(), size=spatial, mode=mode, align_corners=False)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
        """First pass, then per batch item a rescaled pass where the estimate is off the target."""
        first = self.inferer(inputs, network, *args, **kwargs)
        self.last_scales = [1.0] * int(first.shape[0])
        if self.target_diameter is None:
            return first
        raw_in = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        raw_out = first.as_tensor() if isinstance(first, MetaTensor) else first
        out = None
        for b in range(raw_out.shape[0]):
            diameter = self.estimate_diameter(raw_out[b])
            scale = self.scale_for(diameter)
            self.last_scales[b] = scale
            logger.debug("median object diameter %.1f px: image resized by %.3f", diameter, scale)
            if scale == 1.0:
                continue
            y = self._rescaled_pass(raw_in[b : b + 1], scale, network, *args, **kwargs)
            if out is None:
                out = raw_out.clone()
            y = y[0].to(device=out.device, dtype=out.dtype)
            out[b] = y if self.combine == "replace" else (out[b] + y) / 2
        if out is None:
            return first
        if isinstance(first, MetaTensor):
            out = convert_to_dst_type(out, first)[0]
        return out
