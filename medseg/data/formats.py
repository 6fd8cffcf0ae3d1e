"""What a path is: the one table of image formats, used by discovery, datalists and readers alike.

Every decision "is this file an image, and which reader reads it" goes through :func:`format_of`:

* a known suffix decides (``.nii.gz`` before ``.gz``; case-insensitive);
* a regular file without a known suffix is DICOM when it carries the Part 10 preamble (PS3.10 Sec. 7.1,
  checked with :func:`pydicom.misc.is_dicom`), as PACS exports name files by UID without a suffix;
* anything that is not a regular file (FIFO, socket, device) is never opened: reading a FIFO blocks.

Import-light (no MONAI, no pydicom until a file is sniffed).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FORMATS",
    "IGNORED_NAMES",
    "IGNORED_SUFFIXES",
    "LIST_SUFFIXES",
    "Format",
    "PathKind",
    "format_by_name",
    "format_of",
    "image_suffixes",
    "is_dicom_file",
    "is_ignored",
    "path_kind",
    "strip_suffix",
    "suffix_of",
]


@dataclass(frozen=True)
class Format:
    """One image format.

    Attributes:
        name: short name (``"dicom"``, ``"nifti"``, ``"mat"``, ...).
        suffixes: lower-case file name endings, longest first where they overlap.
        reader: ``"module:Class"`` of the MONAI ``ImageReader`` that reads it, or ``None`` for the reader
            MONAI's ``LoadImage`` picks itself (ITK / PIL / NumPy).
        volumetric: may hold 3D data (a 2D-only format is never a 3D case).
    """

    name: str
    suffixes: tuple[str, ...]
    reader: str | None = None
    volumetric: bool = True


#: the formats medseg reads; the first matching suffix wins (``.nii.gz`` is listed before any ``.gz``)
FORMATS: tuple[Format, ...] = (
    Format("dicom", (".dcm", ".dicom", ".dic", ".ima"), "medseg.data.dicom.reader:DicomReader"),
    Format("nifti", (".nii.gz", ".nii"), "medseg.data.nifti_reader:NiftiReader"),
    Format("mat", (".mat",), "medseg.data.mat_reader:MatReader"),
    Format("nrrd", (".nrrd", ".nhdr")),
    Format("metaimage", (".mha", ".mhd")),
    Format("png", (".png",), volumetric=False),
    Format("jpeg", (".jpg", ".jpeg"), volumetric=False),
    Format("tiff", (".tif", ".tiff")),
    Format("bmp", (".bmp",), volumetric=False),
    Format("numpy", (".npy", ".npz")),
    Format("hdf5", (".h5", ".hdf5")),
)
#: sidecar / documentation files: never images, skipped silently by discovery
IGNORED_SUFFIXES: tuple[str, ...] = (
    ".json", ".md", ".rst", ".csv", ".yaml", ".yml", ".xml", ".html", ".pdf", ".log", ".raw", ".pt", ".zip",
)  # fmt: skip
IGNORED_NAMES: tuple[str, ...] = ("DICOMDIR", "LICENSE", "Thumbs.db")
#: an ``--input`` file with one of these suffixes is a list of paths, one per line
LIST_SUFFIXES: tuple[str, ...] = (".txt", ".lst", ".list")

_BY_SUFFIX: list[tuple[str, Format]] = sorted(
    ((s, f) for f in FORMATS for s in f.suffixes), key=lambda sf: len(sf[0]), reverse=True
)
_KNOWN = tuple(s for s, _ in _BY_SUFFIX) + IGNORED_SUFFIXES + LIST_SUFFIXES


def image_suffixes(*names: str) -> tuple[str, ...]:
    """The suffixes of the named formats (all formats when none is named)."""
    return tuple(s for f in FORMATS if not names or f.name in names for s in f.suffixes)


def format_by_name(name: str) -> Format:
    for f in FORMATS:
        if f.name == name:
            return f
    raise KeyError(f"unknown format {name!r}; known: {[f.name for f in FORMATS]}")


def suffix_of(name: str | os.PathLike[str]) -> str:
    """Lower-case suffix of a file name: a table suffix when one matches (``.nii.gz``), else the last one."""
    base = os.path.basename(os.fspath(name)).lower()
    for s in sorted(_KNOWN, key=len, reverse=True):
        if base.endswith(s) and len(base) > len(s):
            return s
    return os.path.splitext(base)[1]


def strip_suffix(name: str) -> str:
    """``name`` without its image suffix (``a.nii.gz`` -> ``a``); other names are returned unchanged."""
    low = name.lower()
    for s, _ in _BY_SUFFIX:
        if low.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return name


def is_ignored(name: str) -> bool:
    """Hidden files, ``DICOMDIR`` and sidecar / documentation files."""
    return name.startswith(".") or name in IGNORED_NAMES or suffix_of(name) in IGNORED_SUFFIXES


#: what :func:`path_kind` says a path is ("special": FIFO, socket, device)
PathKind = Literal["file", "folder", "missing", "special"]


def path_kind(path: str | os.PathLike[str]) -> PathKind:
    """``"file"`` (regular file, symlinks followed), ``"folder"``, ``"missing"`` or ``"special"``."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special"


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """A regular file carrying the DICOM Part 10 preamble and ``DICM`` prefix (PS3.10 Sec. 7.1)."""
    if path_kind(path) != "file":
        return False
    from pydicom.misc import is_dicom

    try:
        return bool(is_dicom(os.fspath(path)))
    except OSError:
        return False


def format_of(path: str | os.PathLike[str], sniff: bool = True) -> Format | None:
    """The format of a file: by suffix; a suffix-less (or unknown-suffix) regular file is DICOM when it
    has the Part 10 preamble (``sniff=True``). ``None``: not an image file medseg reads."""
    base = os.path.basename(os.fspath(path)).lower()
    for s, f in _BY_SUFFIX:
        if base.endswith(s) and len(base) > len(s):
            return f
    if suffix_of(base) in IGNORED_SUFFIXES + LIST_SUFFIXES:
        return None
    if sniff and is_dicom_file(path):
        return FORMATS[0]
    return None
