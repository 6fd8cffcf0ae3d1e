"""``Invertd`` then ``AsDiscreted`` in one step: labels on the source grid without a full-size score map.

A bundle's post-processing typically brings class scores back to the scan's grid (``Invertd``: the
inverse ``Spacing`` enlarges them to every source voxel, in float32, per channel) and then thresholds or
takes the argmax (``AsDiscreted``). For a whole-body CT that is a float32 array per channel the size of
the scan, and a full pass over it per step. :class:`InvertToLabelsd` runs the same inverse while asking
the resampler for labels instead: :class:`~medseg.transforms.SeparableResample` then interpolates and
discretises a block of planes at a time (tens of MB of scores, not the scan's size) when the voxel map
is axis-aligned and only exact index maps (flips, axis permutations, crops, pads) remain to be inverted
after it, which commute with a per-voxel threshold or argmax. Otherwise ``Invertd`` and ``AsDiscreted``
run as given. The labels are the same either way, up to float rounding of scores that lie at the
threshold (or of tied channels).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import AsDiscreted, Invertd, MapTransform
from monai.utils import TraceKeys

__all__ = ["InvertToLabelsd", "LabelRule", "LabelRequest", "label_request", "pending_label_request"]

# transforms whose inverse maps voxels to voxels exactly (no interpolation, zero fill): a threshold or an
# argmax gives the same labels before or after them
_INDEX_MAPS = frozenset(
    {
        "Orientation",
        "Flip",
        "Rotate90",
        "Transpose",
        "SpatialPad",
        "BorderPad",
        "DivisiblePad",
        "SpatialCrop",
        "CenterSpatialCrop",
        "CropForeground",
        "ResizeWithPadOrCrop",
    }
)


@dataclass(frozen=True)
class LabelRule:
    """How class scores become labels, as MONAI's ``AsDiscrete`` does it: ``scores >= threshold`` per
    channel, or the index of the first maximal channel (``argmax``, one channel out), as ``dtype``."""

    threshold: float | None = None
    argmax: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if (self.threshold is None) == (not self.argmax):
            raise ValueError("a LabelRule needs exactly one of threshold and argmax")

    def channels(self, n: int) -> int:
        """Output channels for ``n`` score channels."""
        return 1 if self.argmax else n

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Labels of channel-first ``scores``."""
        if not self.argmax:
            return torch.ge(scores, float(self.threshold)).to(self.dtype)  # type: ignore[arg-type]
        if scores.shape[0] == 2:  # strict > keeps the first maximum on ties, as torch.argmax
            return torch.gt(scores[1:2], scores[0:1]).to(self.dtype)
        return scores.max(dim=0, keepdim=True).indices.to(self.dtype)

    def write(self, scores: torch.Tensor, out: torch.Tensor) -> None:
        """``out[...] = self(scores)``; a threshold into 1-byte integers is written in place."""
        if not self.argmax and out.dtype in (torch.uint8, torch.int8, torch.bool):
            flags = out.view(torch.bool)
            if scores.device.type == "cpu":  # NumPy's vectorised comparison: several times torch's here
                np.greater_equal(scores.numpy(), self.threshold, out=flags.numpy())
            else:
                torch.ge(scores, float(self.threshold), out=flags)  # type: ignore[arg-type]
        else:
            out.copy_(self(scores))

    @classmethod
    def of(cls, discretise: AsDiscreted) -> LabelRule | None:
        """The rule of a one-key ``AsDiscreted`` that thresholds or takes the argmax over channel 0
        (``None`` for one-hot output, rounding, or other settings)."""
        if len(discretise.keys) != 1:
            return None
        argmax, onehot = bool(discretise.argmax[0]), discretise.to_onehot[0]
        threshold, rounding = discretise.threshold[0], discretise.rounding[0]
        kwargs = dict(getattr(discretise.converter, "kwargs", {}) or {})
        dtype = kwargs.pop("dtype", torch.float32)
        if onehot is not None or rounding is not None or kwargs.pop("dim", 0) != 0:
            return None
        if not kwargs.pop("keepdim", True) or kwargs or (threshold is not None and argmax):
            return None
        if not isinstance(dtype, torch.dtype):
            return None
        if argmax:
            return cls(argmax=True, dtype=dtype)
        return cls(threshold=float(threshold), dtype=dtype) if threshold is not None else None


@dataclass
class LabelRequest:
    """An open request for labels (see :func:`label_request`); ``done`` once a resampler produced them."""

    rule: LabelRule
    done: bool = False


_REQUEST: contextvars.ContextVar[LabelRequest | None] = contextvars.ContextVar("label_request", default=None)


@contextlib.contextmanager
def label_request(rule: LabelRule) -> Iterator[LabelRequest]:
    """Within the block, the first resampler that can (see :func:`pending_label_request`) outputs labels
    by ``rule`` instead of scores and marks the request done."""
    request = LabelRequest(rule)
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


def pending_label_request(remaining: Sequence[Mapping[str, Any]]) -> LabelRequest | None:
    """The open label request, if the inverse operations still to run after this one (``remaining``, a
    MetaTensor's ``applied_operations``) are all exact index maps; else ``None``."""
    request = _REQUEST.get()
    if request is None or request.done:
        return None
    if any(op.get(TraceKeys.CLASS_NAME) not in _INDEX_MAPS for op in remaining):
        return None
    return request


def _is_identity(func: Any) -> bool:
    if func is None:
        return True
    marker = object()
    try:
        return func(marker) is marker
    except Exception:
        return False


class InvertToLabelsd(MapTransform):
    """``invert`` (MONAI ``Invertd``) followed by ``discretise`` (``AsDiscreted``), fused when possible
    (module docstring). Both act on one and the same key."""

    def __init__(self, invert: Invertd, discretise: AsDiscreted) -> None:
        if not self.fusable(invert, discretise):
            raise ValueError(
                "InvertToLabelsd needs a one-key Invertd and a threshold/argmax AsDiscreted on it"
            )
        super().__init__(invert.keys)
        self.invert, self.discretise = invert, discretise
        self.rule = LabelRule.of(discretise)

    @staticmethod
    def fusable(invert: Any, discretise: Any) -> bool:
        """Whether ``invert`` then ``discretise`` can run as one :class:`InvertToLabelsd`."""
        if not (isinstance(invert, Invertd) and isinstance(discretise, AsDiscreted)):
            return False
        if len(invert.keys) != 1 or tuple(invert.keys) != tuple(discretise.keys):
            return False
        if not all(_is_identity(f) for f in invert.post_func):
            return False
        return LabelRule.of(discretise) is not None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        assert self.rule is not None
        with label_request(self.rule) as request:
            d = dict(self.invert(data))
        return d if request.done else dict(self.discretise(d))
