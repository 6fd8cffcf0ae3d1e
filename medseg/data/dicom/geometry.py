"""Slice order, spacing checks and the affine of a DICOM series.

Slices are ordered by their position along the slice normal, ``d = ImagePositionPatient . (row x
column)`` with the direction cosines of ImageOrientationPatient (PS3.3 C.7.6.2.1.1), never by file name
or InstanceNumber. A missing slice or non-uniform spacing is reported by the ``on_gap`` mode (see
:class:`GapMode`); images sharing a position (multi-echo, temporal, 4D) are rejected. The affine maps
``(column, row, slice)`` indices to patient coordinates (LPS, mm), PS3.3 C.7.6.2.1.1 eq. C.7.6.2.1-1
extended by the step between slices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from monai.utils import StrEnum

from medseg.data.dicom.headers import SliceHeader, normal
from medseg.data.errors import ReadError

__all__ = ["GapMode", "Plan", "ResamplePlan", "lps_affine", "plan_slices"]

# the logger name of the single-module reader, kept so that logging configurations keep working
logger = logging.getLogger("medseg.data.dicom_reader")


class GapMode(StrEnum):
    """What to do about a missing slice or non-uniform spacing (``DicomReader(on_gap=...)``)."""

    ERROR = "error"  # raise ReadError naming the expected and found steps
    ACCEPT = "accept"  # keep the slices with their average step (what MONAI does silently)
    RESAMPLE = "resample"  # linear interpolation onto a uniform grid with the median step


@dataclass(frozen=True)
class ResamplePlan:
    """Positions ``d`` of the slices along the normal, the uniform ``targets``, and for each target the
    index of the nearest slice."""

    d: np.ndarray
    targets: np.ndarray
    nearest: np.ndarray


@dataclass(frozen=True)
class Plan:
    """Slices sorted along the normal, the step vector between output slices (LPS, mm), the number of
    output slices, and the resampling to do (``None``: the slices are the output slices)."""

    slices: list[SliceHeader]
    step: np.ndarray
    n_out: int
    resample: ResamplePlan | None = None


def plan_slices(path: str, slices: list[SliceHeader], on_gap: str, gap_tolerance: float) -> Plan:
    """Sort ``slices`` along the normal and check their spacing (``gap_tolerance``: relative to the
    median step). ``path`` names the input in errors and warnings."""
    first = slices[0]
    if len(slices) == 1:
        if first.orientation is None:
            return Plan(slices, np.array([0.0, 0.0, first.thickness or 1.0]), 1)
        return Plan(slices, normal(first.orientation) * (first.thickness or 1.0), 1)
    if first.orientation is None or any(s.position is None for s in slices):
        raise ReadError(
            path, "several images without ImagePositionPatient/ImageOrientationPatient: cannot order them"
        )
    n = normal(first.orientation)
    d = np.array([float(s.position @ n) for s in slices])  # type: ignore[operator]
    order = np.argsort(d, kind="stable")
    slices = [slices[i] for i in order]
    d = d[order]
    diffs = np.diff(d)
    step_len = float(np.median(diffs))
    if step_len <= 1e-6 or np.min(diffs) <= 1e-3 * max(step_len, 1e-3):
        n_dup = int(np.sum(diffs <= 1e-3 * max(step_len, 1e-3)))
        raise ReadError(
            path,
            f"{n_dup + 1} images share a slice position (multi-echo, temporal or 4D series?); "
            "cannot build one 3D volume",
        )
    positions = np.stack([s.position for s in slices])  # type: ignore[misc]
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    expected = positions[0] + np.arange(len(slices))[:, None] * step
    off = np.abs(positions - expected).max()
    uniform = off <= gap_tolerance * step_len + 1e-4 and np.ptp(diffs) <= gap_tolerance * step_len + 1e-4
    if uniform:
        return Plan(slices, step, len(slices))
    found = ", ".join(f"{v:g}" for v in np.unique(np.round(diffs, 4))[:8])
    msg = (
        f"non-uniform slice spacing (missing slices?): expected a step of {step_len:g} mm "
        f"(median) along the slice normal, found steps {found} mm over {len(slices)} slices"
    )
    if on_gap == GapMode.ERROR:
        raise ReadError(path, msg + "; pass on_gap='accept' or on_gap='resample' to load it anyway")
    logger.warning("DicomReader: %s: %s (on_gap=%r)", path, msg, str(on_gap))
    if on_gap == GapMode.ACCEPT:
        return Plan(slices, step, len(slices))
    n_out = int(round((d[-1] - d[0]) / step_len)) + 1
    targets = d[0] + np.arange(n_out) * step_len
    nearest = np.abs(d[None, :] - targets[:, None]).argmin(axis=1)
    unit = (positions[-1] - positions[0]) / (d[-1] - d[0])
    return Plan(slices, unit * step_len, n_out, ResamplePlan(d, targets, nearest))


def lps_affine(first: SliceHeader, step: np.ndarray) -> np.ndarray:
    """The 4x4 affine from ``(column, row, slice)`` indices to LPS mm: columns of the direction cosines
    times the pixel spacing, the ``step`` between slices, and the position of the first slice."""
    lps = np.eye(4)
    if first.orientation is not None:
        row, col = first.orientation[:3], first.orientation[3:]
        lps[:3, 0] = row * first.spacing[1]
        lps[:3, 1] = col * first.spacing[0]
        lps[:3, 2] = step
    else:
        lps[0, 0], lps[1, 1], lps[2, 2] = first.spacing[1], first.spacing[0], float(np.linalg.norm(step))
    if first.position is not None:
        lps[:3, 3] = first.position
    return lps
