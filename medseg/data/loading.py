"""Strict loading: a file is read by the reader meant for it, or the load fails with that reader's reason.

MONAI's ``LoadImage(reader=R)`` tries every other registered reader when ``R`` raises, and reports only
"cannot find a suitable reader" (or, worse, returns what another reader made of the file: another series
of a DICOM folder, another field of a ``.mat`` file). A reader given *at call time*,
``LoadImage()(path, reader=R)``, is used alone. :class:`StrictLoadImage` always calls that way:

* a designated reader (``reader=``) that claims the path (``verify_suffix``) reads it; its error is the
  error;
* a path no designated reader claims (or with none designated) gets the one reader MONAI's
  auto-selection picks by suffix (medseg registers its DICOM and ``.mat`` readers there, by the format
  table of :mod:`medseg.data.formats`), and its error is the error.

Before any reader runs, :func:`preflight` refuses what must never be read: a missing path, a FIFO /
socket / device (reading blocks or never ends), an empty file, and a file whose header declares more
voxel data than the file can hold (a corrupt or hostile header would otherwise make the reader allocate
gigabytes). In your own MONAI code use ``medseg.data.StrictLoadImage(d)`` in place of ``LoadImage(d)``
(same arguments), or pass the reader at call time: ``LoadImage()(path, reader=MatReader(field=...))``.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from typing import Any

from monai.config import PathLike
from monai.data import ImageReader
from monai.transforms import LoadImage, LoadImaged
from monai.utils import ensure_tuple

from medseg.data.errors import ReadError
from medseg.data.formats import format_of, path_kind

__all__ = ["StrictLoadImage", "StrictLoadImaged", "declared_nifti_bytes", "preflight"]

#: deflate cannot compress better than about 1032:1 (RFC 1951: a 258-byte match per ~2 bits)
_MAX_DEFLATE_RATIO = 1032
_NIFTI_DTYPES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                 1536: 16, 1792: 16, 2048: 32, 2304: 4}  # fmt: skip


def declared_nifti_bytes(path: str) -> int | None:
    """Voxel bytes a NIfTI-1/2 header (``.nii`` / ``.nii.gz``) declares, from its first bytes only;
    ``None`` when the header cannot be parsed (the reader will say why)."""
    try:
        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(540)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", head[40:56])
            code = struct.unpack(endian + "h", head[70:72])[0]
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:  # NIfTI-2
            dims = struct.unpack(endian + "8q", head[16:80])
            code = struct.unpack(endian + "h", head[12:14])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or code not in _NIFTI_DTYPES:
        return None
    n = 1
    for d in dims[1 : ndim + 1]:
        n *= max(int(d), 1)
    return n * _NIFTI_DTYPES[code]


def preflight(path: PathLike) -> None:
    """Refuse a path before any reader opens it (see the module docstring); raises :class:`ReadError`."""
    p = os.fspath(path)
    kind = path_kind(p)
    if kind == "missing":
        raise ReadError(p, "no such file or folder")
    if kind == "special":
        raise ReadError(p, "not a regular file (a FIFO, socket or device); not read")
    if kind == "folder":
        return
    size = os.path.getsize(p)
    if size == 0:
        raise ReadError(p, "empty file (0 bytes)")
    fmt = format_of(p, sniff=False)
    if fmt is not None and fmt.name == "nifti":
        declared = declared_nifti_bytes(p)
        limit = size * (_MAX_DEFLATE_RATIO if p.lower().endswith(".gz") else 1)
        if declared is not None and declared > limit:
            raise ReadError(
                p,
                f"the header declares {declared / 2**20:.0f} MiB of voxel data but the file is only {size} "
                "bytes (truncated or corrupt); not read",
            )


class StrictLoadImage(LoadImage):
    """MONAI's ``LoadImage`` without the silent fallback to other readers (see the module docstring).

    Same arguments as ``LoadImage``. ``reader=`` at init designates the reader(s); a failure of the chosen
    reader is raised as is (medseg's readers raise :class:`ReadError` naming the file and the reason).
    """

    def __init__(self, reader: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(reader, *args, **kwargs)
        self.designated: list[ImageReader] = _designated(self.readers, reader)

    @classmethod
    def from_loader(cls, loader: LoadImage, reader: Any = None) -> StrictLoadImage:
        """A strict loader with the settings and readers of an existing ``LoadImage`` built with
        ``reader`` (the readers are shared, not rebuilt)."""
        out = cls.__new__(cls)
        out.__dict__.update(loader.__dict__)
        out.readers = list(loader.readers)
        out.designated = _designated(out.readers, reader)
        return out

    def choose_reader(self, filename: Sequence[PathLike] | PathLike) -> ImageReader:
        """The one reader for ``filename``, chosen before reading: the last designated reader that claims
        it (``verify_suffix``), else the last registered reader that claims it (MONAI's auto-selection,
        medseg's DICOM and ``.mat`` readers included); a path no reader claims is an error."""
        names = ensure_tuple(filename)
        for r in [*reversed(self.designated), *reversed(self.readers)]:
            if r.verify_suffix(names):
                return r
        first = os.fspath(names[0]) if names else "<none>"
        raise ReadError(first, "not an image format medseg reads (unknown suffix, no DICOM preamble)")

    def __call__(self, filename: Sequence[PathLike] | PathLike, reader: ImageReader | None = None) -> Any:
        for name in ensure_tuple(filename):
            if isinstance(name, (str, os.PathLike)):
                preflight(name)
        chosen = reader if reader is not None else self.choose_reader(filename)
        return super().__call__(filename, reader=chosen)


class StrictLoadImaged(LoadImaged):
    """Dictionary twin of :class:`StrictLoadImage`: ``LoadImaged`` (same arguments) with a strict loader."""

    def __init__(self, keys: Any, reader: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(keys, reader, *args, **kwargs)
        self._loader = StrictLoadImage.from_loader(self._loader, reader)


def _designated(readers: list[ImageReader], reader: Any) -> list[ImageReader]:
    """The readers ``LoadImage`` registered from its ``reader`` argument : one per entry, the last ones."""
    n = len(ensure_tuple(reader)) if reader is not None else 0
    return readers[len(readers) - n :] if n else []
