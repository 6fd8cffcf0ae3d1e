"""``NiftiReader``: MONAI's ``NibabelReader`` with faster ``.nii.gz`` decoding and C-ordered arrays.

Two costs dominate loading a compressed NIfTI volume with MONAI: gzip inflation through Python's
chunked ``gzip`` module and, in ``LoadImage``, numpy's strided copy of nibabel's Fortran-ordered array
into the C order MONAI keeps. This reader inflates the file streamed
(:mod:`medseg.data.gzip_codec`, ISA-L on a second thread when installed; the file's bytes are never held
whole), a slab of slices at a time copied into a C-ordered 3-D array through a tiled transposing copy
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
from medseg.data.gzip_codec import gzip_open
from medseg.data.transpose import transposed_copy

__all__ = ["NiftiReader"]

_SIZEOF_HDR = {348: nib.Nifti1Image, 540: nib.Nifti2Image}
_HEAD_MIN = 544  # the NIfTI-2 header and its extension flag (NIfTI-1: 352 bytes)
_READ_CHUNK = 1 << 24


def _load_gz(path: str) -> nib.Nifti1Image:
    """Inflate ``path`` streamed and build the image around its voxel array: a 3-D volume is inflated a
    slab of slices at a time, each slab scaled (as nibabel's ``apply_read_scaling``, into float32 where
    nibabel would use float64) and copied transposed into the C-ordered array; no copy of the file's bytes
    or of the volume as stored is ever held. Other ranks are inflated whole into their array, as stored."""
    try:
        with gzip_open(path) as fh:
            head = fh.read(_HEAD_MIN)
            if len(head) < 4:
                raise ReadError(path, f"not a NIfTI file ({len(head)} bytes after decompression)")
            for order in ("<", ">"):
                size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
                cls = _SIZEOF_HDR.get(size)
                if cls is not None:
                    break
            else:
                raise ReadError(path, "not a NIfTI-1/2 file (header size field is neither 348 nor 540)")
            try:  # the fixed header gives the voxel offset; extensions lie between the two
                offset = int(cls.header_class.from_fileobj(io.BytesIO(head[:size])).get_data_offset())
                if offset > len(head):
                    head += fh.read(offset - len(head))
                header = cls.header_class.from_fileobj(io.BytesIO(head[: max(offset, size)]))
                shape = tuple(int(n) for n in header.get_data_shape())
                dtype = header.get_data_dtype()
                slope, inter = header.get_slope_inter()
            except ReadError:
                raise
            except Exception as e:
                raise ReadError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
            count = int(np.prod(shape)) if shape else 0
            stream = _Voxels(fh, head[offset:] if offset < len(head) else b"", offset - len(head))
            if stream.skip and not stream.skip_to_data():
                raise ReadError(path, "truncated NIfTI: the file ends before its voxel data")
            truncated = (
                f"truncated NIfTI: the header declares {count} voxels of {dtype}, the file holds fewer"
            )
            scaled = slope is not None and (slope != 1.0 or (inter or 0.0) != 0.0)
            if len(shape) == 3 and count:
                arr = _read_c_ordered(stream, shape, dtype, slope if scaled else None, inter, path, truncated)
            else:
                buf = np.empty(count * dtype.itemsize, dtype=np.uint8)
                if stream.readinto(memoryview(buf)) < len(buf):
                    raise ReadError(path, truncated)
                arr = buf.view(dtype).reshape(shape, order="F")  # as stored, owned by buf: no copy
                if scaled:
                    arr = np.asarray(
                        apply_read_scaling(arr, slope, inter), dtype=_scaled_dtype(dtype, slope, inter)
                    )
    except ReadError:
        raise
    except (EOFError, OSError, ValueError, RuntimeError) as e:
        reason = "truncated" if isinstance(e, EOFError) else "corrupt"
        raise ReadError(path, f"{reason} gzip stream ({type(e).__name__}: {e})") from None
    return cls(arr, header.get_best_affine(), header)


class _Voxels:
    """The voxel bytes of an open NIfTI stream: what the header read already holds, then the file."""

    def __init__(self, fh: Any, held: bytes, skip: int) -> None:
        self.fh, self.held, self.skip = fh, memoryview(held), max(0, skip)

    def skip_to_data(self) -> bool:
        return len(self.fh.read(self.skip)) == self.skip

    def readinto(self, buf: memoryview) -> int:
        n = min(len(self.held), len(buf))
        buf[:n] = self.held[:n]
        self.held = self.held[n:]
        while n < len(buf):
            k = self.fh.readinto(buf[n : n + _READ_CHUNK])
            if not k:
                break
            n += k
        return n


def _read_c_ordered(
    stream: _Voxels,
    shape: tuple[int, ...],
    dtype: np.dtype,
    slope: float | None,
    inter: float | None,
    path: str,
    truncated: str,
) -> np.ndarray:
    """A 3-D volume stored x-fastest, as a C-ordered ``(x, y, z)`` array, read a slab of z-slices at a
    time (scaled by ``slope``/``inter`` when ``slope`` is given)."""
    nx, ny, nz = shape
    plane = nx * ny * dtype.itemsize
    out_dtype = dtype if slope is None else _scaled_dtype(dtype, slope, inter)
    out = np.empty(shape, dtype=out_dtype)
    k = max(1, _READ_CHUNK // max(1, plane))
    buf = np.empty(k * plane, dtype=np.uint8)
    for z0 in range(0, nz, k):
        kk = min(k, nz - z0)
        if stream.readinto(memoryview(buf)[: kk * plane]) < kk * plane:
            raise ReadError(path, truncated)
        slab = buf[: kk * plane].view(dtype).reshape(kk, ny, nx)  # (z, y, x): the stored order
        if slope is not None:
            slab = np.asarray(apply_read_scaling(slab, slope, inter), dtype=out_dtype)
        transposed_copy(slab, out=out[:, :, z0 : z0 + kk])
    return out


def _scaled_dtype(dtype: np.dtype, slope: float, inter: float | None) -> np.dtype:
    """The dtype of nibabel's ``apply_read_scaling`` of ``dtype`` data, float32 where it would be float64
    (the values MONAI's float32 ``LoadImage`` gives either way)."""
    probe = apply_read_scaling(np.zeros(1, dtype=dtype), slope, inter)
    return np.dtype(np.float32) if probe.dtype == np.float64 else probe.dtype


class NiftiReader(NibabelReader):
    """MONAI ``NibabelReader`` (same arguments, images and metadata) that inflates ``.nii.gz`` files
    streamed and hands ``LoadImage`` C-ordered 3-D arrays."""

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
