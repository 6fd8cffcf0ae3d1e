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

import io
import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.utils import ensure_tuple
from nibabel.volumeutils import apply_read_scaling

from medseg.data.errors import ReadError
from medseg.data.gzip_codec import gzip_decompress
from medseg.data.transpose import transposed_copy

__all__ = ["NiftiReader"]

_SIZEOF_HDR = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


def _load_gz(path: str) -> nib.Nifti1Image:
    """Inflate ``path`` in one call and build the image around its voxel array, made C-ordered (3-D) and
    scaled here: the inflated bytes are viewed, not copied, and released on return, so the peak is the
    inflated file plus one array (nibabel's own route holds a second copy and scales in float64)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        data = gzip_decompress(raw)
    except (EOFError, OSError, ValueError) as e:
        reason = "truncated" if isinstance(e, EOFError) else "corrupt"
        raise ReadError(path, f"{reason} gzip stream ({type(e).__name__}: {e})") from None
    del raw
    size = len(data)
    if size < 4:
        raise ReadError(path, f"not a NIfTI file ({size} bytes after decompression)")
    for order in ("<", ">"):
        cls = _SIZEOF_HDR.get(int(np.frombuffer(data[:4], dtype=f"{order}i4")[0]))
        if cls is not None:
            break
    else:
        raise ReadError(path, "not a NIfTI-1/2 file (header size field is neither 348 nor 540)")
    try:
        header = cls.header_class.from_fileobj(io.BytesIO(data))  # shares the buffer: no copy
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
        slope, inter = header.get_slope_inter()
    except Exception as e:
        raise ReadError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
    count = int(np.prod(shape)) if shape else 0
    if offset + count * dtype.itemsize > size:
        raise ReadError(
            path, f"truncated NIfTI: the header declares {count} voxels of {dtype}, the file holds fewer"
        )
    raw_arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    arr = _c_ordered_scaled(raw_arr, slope, inter)
    del raw_arr, data
    return cls(arr, header.get_best_affine(), header)


def _c_ordered_scaled(raw: np.ndarray, slope: float | None, inter: float | None) -> np.ndarray:
    """``raw`` (Fortran-ordered, as stored) as a C-ordered 3-D array (other ranks: as stored), with the
    header's scaling applied as nibabel applies it (``apply_read_scaling``), slab by slab, into float32
    when nibabel's precision is float64 (the values MONAI's float32 ``LoadImage`` gives either way)."""
    scaled = slope is not None and (slope != 1.0 or (inter or 0.0) != 0.0)
    if not scaled:
        return transposed_copy(raw.T) if raw.ndim == 3 else np.array(raw)
    probe = apply_read_scaling(raw[(slice(0, 1),) * raw.ndim], slope, inter)
    out_dtype = np.float32 if probe.dtype == np.float64 else probe.dtype
    if raw.ndim != 3:
        return np.asarray(apply_read_scaling(raw, slope, inter), dtype=out_dtype)
    out = np.empty(raw.shape, dtype=out_dtype)  # C order
    step = max(1, (1 << 22) // max(1, raw.shape[1] * raw.shape[2]))
    for x0 in range(0, raw.shape[0], step):
        out[x0 : x0 + step] = apply_read_scaling(raw[x0 : x0 + step], slope, inter)
    return out


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
