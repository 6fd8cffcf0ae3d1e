"""Which images of a folder make the one series to load.

A folder (scanned recursively: PACS exports nest ``patient/study/series``) may hold several series.
They are never merged: images are grouped by SeriesInstanceUID (PS3.3 C.7.3.1), each series is split
into stacks of one orientation and matrix size (ImageOrientationPatient, PS3.3 C.7.6.2.1.1), and one
series is chosen: the one asked for (``series_uid``; absent or not volumetric raises
:class:`~medseg.data.errors.ReadError`, never another series is loaded) or else the largest volumetric
one. Localizers (every image with its own orientation) are never volumetric. The choice is logged at
INFO with UIDs, modality, description and counts only: no patient-identifying tag.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medseg.data import formats
from medseg.data.dicom import headers
from medseg.data.dicom.headers import SliceHeader
from medseg.data.errors import ReadError

__all__ = [
    "describe",
    "file_slices",
    "group_by_orientation",
    "group_by_series",
    "list_files",
    "choose_series",
    "scan_files",
]

# the logger name of the single-module reader, kept so that logging configurations keep working
logger = logging.getLogger("medseg.data.dicom_reader")

ORIENT_TOL = 1e-3  # direction-cosine tolerance for "same orientation"


def list_files(folder: str, recursive: bool) -> list[str]:
    """Regular files of ``folder`` (sorted; hidden ones and ``DICOMDIR`` left out); FIFOs and other
    special files are left out too, as opening them could block."""
    files = []
    if recursive:
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
    else:
        files = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if not n.startswith(".")]
    return [f for f in files if os.path.basename(f).upper() != "DICOMDIR" and formats.path_kind(f) == "file"]


def scan_files(files: Sequence[str], num_workers: int) -> list[tuple[list[SliceHeader], str | None]]:
    """:func:`~medseg.data.dicom.headers.scan_file` of each file, in order, on a thread pool."""
    with ThreadPoolExecutor(num_workers) as pool:
        return list(pool.map(headers.scan_file, files))


def _same_orientation(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.max(np.abs(a - b)) < ORIENT_TOL)


def group_by_orientation(slices: Sequence[SliceHeader]) -> list[list[SliceHeader]]:
    """Split one series into stacks of equal orientation and matrix size (multi-frame files apart),
    largest first."""
    groups: list[list[SliceHeader]] = []
    for s in slices:
        for g in groups:
            r = g[0]
            if ((r.n_frames > 1 or s.n_frames > 1) and r.path != s.path) or (r.rows, r.cols, r.samples) != (
                s.rows,
                s.cols,
                s.samples,
            ):
                continue
            if _same_orientation(r.orientation, s.orientation):
                g.append(s)
                break
        else:
            groups.append([s])
    return sorted(groups, key=len, reverse=True)


def describe(uid: str, slices: Sequence[SliceHeader], note: str = "") -> str:
    """``UID (modality 'description', n image(s)note)``: no patient-identifying tag."""
    t = slices[0].tags
    desc = f" '{t['SeriesDescription']}'" if "SeriesDescription" in t else ""
    return f"{uid} ({t.get('Modality', '?')}{desc}, {len(slices)} image(s){note})"


def group_by_series(
    folder: str, files: Sequence[str], scanned: Sequence[tuple[list[SliceHeader], str | None]]
) -> dict[str, list[SliceHeader]]:
    """The scanned images of ``files`` by SeriesInstanceUID; files without an image are counted (and
    unreadable ones logged). Raises ``ReadError`` when no file holds an image."""
    by_series: dict[str, list[SliceHeader]] = {}
    skipped: dict[str, int] = {}
    for f, (slices, reason) in zip(files, scanned, strict=True):
        if reason:
            skipped[reason.split(" (")[0]] = skipped.get(reason.split(" (")[0], 0) + 1
            if reason.startswith("unreadable"):
                logger.warning("DicomReader: skipping %s: %s", f, reason)
            continue
        by_series.setdefault(slices[0].series_uid, []).extend(slices)
    if not by_series:
        detail = ", ".join(f"{n} {r}" for r, n in skipped.items())
        raise ReadError(folder, f"no DICOM image series found ({len(files)} file(s): {detail})")
    return by_series


def choose_series(
    folder: str, by_series: dict[str, list[SliceHeader]], series_uid: str | None
) -> tuple[list[SliceHeader], str]:
    """The images of the series to load (one orientation) and its description.

    ``series_uid`` given: exactly that series, else ``ReadError`` naming the folder, the UID asked for
    and the series found. Otherwise the largest volumetric series (a folder holding one single image
    loads that image).
    """
    candidates: list[tuple[str, list[SliceHeader]]] = []
    listing = []
    for uid, slices in sorted(by_series.items()):
        groups = group_by_orientation(slices)
        n_files = len({s.path for s in slices})
        if len(groups[0]) >= 2 or n_files == 1:
            note = (
                f"; {len(slices) - len(groups[0])} excluded (other orientation/size)"
                if len(groups) > 1
                else ""
            )
            candidates.append((uid, groups[0]))
            listing.append(describe(uid, slices, note))
        else:
            listing.append(describe(uid, slices, "; localizer: every image has its own orientation"))
    if series_uid is not None:
        chosen = [c for c in candidates if c[0] == series_uid]
        if not chosen:
            why = "is not volumetric" if series_uid in by_series else "is not in the folder"
            raise ReadError(folder, f"series {series_uid} {why}; series found: " + "; ".join(listing))
        uid, slices = chosen[0]
    else:
        volumetric = [c for c in candidates if len(c[1]) >= 2]
        if not volumetric and len(candidates) == 1 and len(by_series) == 1:
            volumetric = candidates  # the folder holds one single image: load it as is
        if not volumetric:
            raise ReadError(
                folder,
                "no volumetric series (only localizers or single images); pass series_uid= to load "
                "a single image; series found: " + "; ".join(listing),
            )
        uid, slices = max(volumetric, key=lambda c: (len(c[1]), c[0]))
    if len(by_series) > 1 or len(slices) < len(by_series[uid]):
        logger.info(
            "DicomReader: %s: picked series %s (%d slices) out of %d series: %s",
            folder, uid, len(slices), len(by_series), "; ".join(listing),
        )  # fmt: skip
    return slices, describe(uid, slices)


def file_slices(path: str, slices: list[SliceHeader], series_uid: str | None) -> list[SliceHeader]:
    """The images of one file, checked: of the series asked for, frames of one orientation only."""
    if series_uid is not None and slices[0].series_uid != series_uid:
        raise ReadError(
            path,
            f"series {series_uid} is not in the file; series found: {describe(slices[0].series_uid, slices)}",
        )
    if len(slices) > 1:
        groups = group_by_orientation(slices)
        if len(groups) > 1:
            raise ReadError(path, f"multi-frame file with {len(groups)} different frame orientations")
    return slices
