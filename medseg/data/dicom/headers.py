"""The per-file DICOM header scan, done once: what :class:`SliceHeader` records of each 2D image.

:func:`scan_file` parses one file's header with pydicom (``stop_before_pixels``, only the tags of
:data:`HEADER_TAGS`) and returns one :class:`SliceHeader` per 2D image it holds: a single-frame file
gives one, a multi-frame file one per frame. Positions and orientations are taken from
ImagePositionPatient / ImageOrientationPatient (PS3.3 C.7.6.2.1.1); enhanced multi-frame objects from
their per-frame / shared functional groups (PS3.3 C.7.6.16), RT Dose from GridFrameOffsetVector
(PS3.3 C.8.8.3.2), legacy multi-frame files from one position plus SpacingBetweenSlices.

A caller that has scanned the files already (case discovery) hands the headers to
:class:`~medseg.data.dicom.reader.DicomReader` (``headers=``), which then reads pixel data only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.data import formats

__all__ = ["DEFAULT_SYNTAX", "HEADER_TAGS", "KEPT_TAGS", "SliceHeader", "normal", "scan_file"]

#: DICOM tags (keywords) copied into the metadata, for writing DICOM SEG / provenance. None of them
#: identifies the patient.
KEPT_TAGS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "SOPClassUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "Manufacturer",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
)
#: every tag the header scan reads (``pydicom.dcmread(specific_tags=...)``)
HEADER_TAGS: tuple[str, ...] = (
    *KEPT_TAGS,
    "SOPInstanceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PlanarConfiguration",
    "BitsAllocated",
    "RescaleSlope",
    "RescaleIntercept",
    "GridFrameOffsetVector",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "FloatPixelData",
    "DoubleFloatPixelData",
)
#: transfer syntax of a file without file meta information: implicit VR little endian (PS3.5 Sec. 10.1)
DEFAULT_SYNTAX = "1.2.840.10008.1.2"


@dataclass(frozen=True, eq=False)
class SliceHeader:
    """Header facts of one 2D image: a single-frame file or one frame of a multi-frame file.

    Attributes:
        path: the file, as given to :func:`scan_file`.
        frame: 0-based frame index in the file.
        n_frames: NumberOfFrames of the file (1 for a single-frame file).
        series_uid: SeriesInstanceUID (``""`` when absent).
        rows, cols: Rows and Columns.
        position: ImagePositionPatient (LPS, mm), ``None`` when absent.
        orientation: ImageOrientationPatient (row then column direction cosines, shape (6,)), or ``None``.
        spacing: (row spacing, column spacing) = PixelSpacing (ImagerPixelSpacing, else (1, 1)).
        slope, intercept: RescaleSlope and RescaleIntercept of this frame.
        thickness: SpacingBetweenSlices, else SliceThickness, or ``None``.
        tags: the :data:`KEPT_TAGS` present (UIDs and text as ``str``, integers as ``int``).
        syntax: TransferSyntaxUID.
        samples: SamplesPerPixel.
        bits: BitsAllocated.
        signed: PixelRepresentation is 1 (two's complement).
        bits_stored: BitsStored.
        pixel_offset: file offset where the header scan stopped (the pixel data element), if known.
    """

    path: str
    frame: int
    n_frames: int
    series_uid: str
    rows: int
    cols: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    spacing: tuple[float, float]
    slope: float
    intercept: float
    thickness: float | None
    tags: dict[str, Any]
    syntax: str
    samples: int
    bits: int
    signed: bool
    bits_stored: int
    pixel_offset: int | None = None


def normal(iop: np.ndarray) -> np.ndarray:
    """The slice normal ``row x column`` of an ImageOrientationPatient (PS3.3 C.7.6.2.1.1)."""
    return np.cross(iop[:3], iop[3:])


def _floats(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if np.isfinite(arr).all() else None


def _float(value: Any, default: float | None) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if np.isfinite(v) else default


def _fg(ds: Any, frame: int, seq: str, attr: str) -> Any:
    """An attribute from the per-frame functional group of ``frame``, else from the shared group."""
    for group_seq, idx in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(group_seq)
        if groups is None or len(groups) <= idx:
            continue
        item = groups[idx].get(seq)
        if item is not None and len(item) > 0 and attr in item[0]:
            return item[0].get(attr)
    return None


def _slices_from_header(path: str, ds: Any, pixel_offset: int | None = None) -> list[SliceHeader]:
    """All 2D images (frames) described by one header."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or DEFAULT_SYNTAX)
    v = {elem.keyword: elem.value for elem in ds}  # each element converted once (Dataset.get is slow)
    n_frames = int(_float(v.get("NumberOfFrames"), 1) or 1)
    tags = {k: str(v[k]) if k.endswith("UID") else v[k] for k in KEPT_TAGS if v.get(k) is not None}
    tags = {k: (int(x) if isinstance(x, int) else str(x)) for k, x in tags.items()}
    common: dict[str, Any] = dict(
        path=path,
        n_frames=n_frames,
        series_uid=str(v.get("SeriesInstanceUID", "")),
        rows=int(v["Rows"]),
        cols=int(v["Columns"]),
        tags=tags,
        syntax=syntax,
        samples=int(v.get("SamplesPerPixel", 1) or 1),
        bits=int(v.get("BitsAllocated", 16) or 16),
        signed=int(v.get("PixelRepresentation", 0) or 0) == 1,
        bits_stored=int(v.get("BitsStored", v.get("BitsAllocated", 16)) or 16),
        pixel_offset=pixel_offset,
    )
    iop = _floats(v.get("ImageOrientationPatient"))
    ipp = _floats(v.get("ImagePositionPatient"))
    spacing = _floats(v.get("PixelSpacing"))
    if spacing is None:
        spacing = _floats(v.get("ImagerPixelSpacing"))
    sp = (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else (1.0, 1.0)
    slope = _float(v.get("RescaleSlope"), 1.0) or 1.0
    intercept = _float(v.get("RescaleIntercept"), 0.0) or 0.0
    thick = _float(v.get("SpacingBetweenSlices"), None) or _float(v.get("SliceThickness"), None)

    enhanced = "PerFrameFunctionalGroupsSequence" in v or "SharedFunctionalGroupsSequence" in v
    offsets = _floats(v.get("GridFrameOffsetVector"))
    out = []
    for k in range(n_frames):
        f_iop, f_ipp, f_sp, f_slope, f_int, f_thick = iop, ipp, sp, slope, intercept, thick
        if enhanced:
            f_iop = _floats(_fg(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient"))
            if f_iop is None:
                f_iop = iop
            f_ipp = _floats(_fg(ds, k, "PlanePositionSequence", "ImagePositionPatient"))
            ps = _floats(_fg(ds, k, "PixelMeasuresSequence", "PixelSpacing"))
            if ps is not None and len(ps) == 2:
                f_sp = (float(ps[0]), float(ps[1]))
            f_thick = _float(_fg(ds, k, "PixelMeasuresSequence", "SpacingBetweenSlices"), None) or _float(
                _fg(ds, k, "PixelMeasuresSequence", "SliceThickness"), thick
            )
            f_slope = _float(_fg(ds, k, "PixelValueTransformationSequence", "RescaleSlope"), slope) or 1.0
            f_int = (
                _float(_fg(ds, k, "PixelValueTransformationSequence", "RescaleIntercept"), intercept) or 0.0
            )
        elif n_frames > 1 and ipp is not None and iop is not None:
            if offsets is not None and len(offsets) == n_frames:  # RT Dose (PS3.3 C.8.8.3.2)
                f_ipp = ipp + offsets[k] * normal(iop)
            elif thick is not None:  # legacy multi-frame (e.g. NM): equally spaced along the normal
                f_ipp = ipp + k * thick * normal(iop)
            else:
                f_ipp = None
        out.append(
            SliceHeader(
                frame=k,
                position=f_ipp if f_ipp is not None and len(f_ipp) == 3 else None,
                orientation=f_iop if f_iop is not None and len(f_iop) == 6 else None,
                spacing=f_sp,
                slope=f_slope,
                intercept=f_int,
                thickness=f_thick,
                **common,
            )
        )
    return out


def scan_file(path: str | os.PathLike[str]) -> tuple[list[SliceHeader], str | None]:
    """Parse one file's header (no pixel data): ``(slices, None)``, or ``([], reason)`` when unusable.

    ``slices`` holds one :class:`SliceHeader` per frame. The reason is one short sentence ("not a DICOM
    file", "unreadable DICOM header (...)", ...). FIFOs, sockets and devices are never opened.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = os.fspath(path)
    if formats.path_kind(path) == "special":
        return [], "not a regular file (FIFO, socket or device)"
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
            pixel_offset = fh.tell()  # pydicom rewinds to the start of the (Float)PixelData element
    except InvalidDicomError:
        return [], "not a DICOM file"
    except Exception as e:  # truncated / corrupt header
        return [], f"unreadable DICOM header ({type(e).__name__}: {e})"
    if "Rows" not in ds or "Columns" not in ds:
        return [], "DICOM object without an image (no Rows/Columns)"
    try:
        return _slices_from_header(path, ds, pixel_offset), None
    except Exception as e:
        return [], f"unusable DICOM header ({type(e).__name__}: {e})"
