"""``NiftiReader``: MONAI's ``NibabelReader`` with faster ``.nii.gz`` decoding and C-ordered arrays.

Two costs dominate loading a compressed NIfTI volume with MONAI: gzip inflation through Python's
chunked ``gzip`` module and, in ``LoadImage``, numpy's strided copy of nibabel's Fortran-ordered array
into the C order MONAI keeps. This reader inflates the whole file in one call
(:mod:`medseg.data.gzip_codec`, ISA-L when installed), builds the image with nibabel's own
``from_bytes``, and returns 3-D arrays C-ordered through a tiled copy
(:func:`medseg.data.transpose.transposed_copy`). Everything else (headers, affines, channel handling,
``as_closest_canonical``, ...) is ``NibabelReader``'s; uncompressed files, GPU loading and ``nib.load``
keyword arguments take its own path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.utils import ensure_tuple

from medseg.data.errors import ReadError
from medseg.data.gzip_codec import gzip_decompress
from medseg.data.transpose import transposed_copy

__all__ = ["NiftiReader"]

_SIZEOF_HDR = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


def _load_gz(path: str) -> nib.Nifti1Image:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        data = gzip_decompress(raw)
    except (EOFError, OSError, ValueError) as e:
        reason = "truncated" if isinstance(e, EOFError) else "corrupt"
        raise ReadError(path, f"{reason} gzip stream ({type(e).__name__}: {e})") from None
    size = len(data)
    if size < 4:
        raise ReadError(path, f"not a NIfTI file ({size} bytes after decompression)")
    for order in ("<", ">"):
        cls = _SIZEOF_HDR.get(int(np.frombuffer(data[:4], dtype=f"{order}i4")[0]))
        if cls is not None:
            try:
                return cls.from_bytes(data)
            except Exception as e:
                raise ReadError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
    raise ReadError(path, "not a NIfTI-1/2 file (header size field is neither 348 nor 540)")


class NiftiReader(NibabelReader):
    """MONAI ``NibabelReader`` (same arguments, images and metadata) that inflates ``.nii.gz`` files in
    one call and hands ``LoadImage`` C-ordered 3-D arrays."""

    def read(self, data: Sequence[os.PathLike[str] | str] | os.PathLike[str] | str, **kwargs: Any) -> Any:
        names = ensure_tuple(data)
        if self.to_gpu or self.kwargs or kwargs or not all(str(n).lower().endswith(".nii.gz") for n in names):
            return super().read(data, **kwargs)
        self.filenames = names
        imgs = [correct_nifti_header_if_necessary(_load_gz(os.fspath(n))) for n in names]
        return imgs if len(names) > 1 else imgs[0]

    def _get_array_data(self, img: Any, filename: Any) -> Any:
        arr = super()._get_array_data(img, filename)
        fortran = isinstance(arr, np.ndarray) and arr.flags.f_contiguous and not arr.flags.c_contiguous
        if fortran and arr.ndim == 3:
            return transposed_copy(arr.T)  # Fortran (x, y, z) -> C (x, y, z), tile by tile
        return arr
