"""Pixel data of DICOM images: decoding, rescale and resampling between slices.

Native (uncompressed) pixel data, i.e. the implicit / explicit VR little endian and explicit VR big
endian transfer syntaxes (PS3.5 Sec. 10), is read straight from the file into the output buffer by a
thread pool, after checking the element header of (7FE0,0010) PixelData (PS3.5 Sec. 7.1). Everything
else goes through pydicom and, when pydicom has no decoder for the transfer syntax, SimpleITK/GDCM
(JPEG, JPEG 2000, JPEG-LS, RLE: PS3.5 Annex A.4). Stored values are sign-extended from BitsStored
(PS3.5 Sec. 8.1.1) and RescaleSlope / RescaleIntercept applied per slice (Modality LUT, PS3.3 C.11.1); the
output is an integer array when the rescale is integral, float32 otherwise. MONOCHROME1 is not
inverted (like ITK and MONAI); DoseGridScaling is not applied (like SimpleITK).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from monai.utils import StrEnum

from medseg.data.dicom.headers import SliceHeader
from medseg.data.errors import ReadError
from medseg.data.transpose import transposed_copy

__all__ = [
    "Decoder",
    "NATIVE_SYNTAXES",
    "decode",
    "read_native",
    "read_pydicom",
    "read_sitk",
    "resample_slices",
]

#: native transfer syntax UID -> (explicit VR, byte order)
NATIVE_SYNTAXES: dict[str, tuple[bool, str]] = {
    "1.2.840.10008.1.2": (False, "<"),  # implicit VR little endian
    "1.2.840.10008.1.2.1": (True, "<"),  # explicit VR little endian
    "1.2.840.10008.1.2.2": (True, ">"),  # explicit VR big endian (retired)
}

_Cache = dict[tuple[str, str], np.ndarray]


class Decoder(StrEnum):
    """How pixel data is decoded (``DicomReader(decoder=...)``)."""

    AUTO = "auto"  # native fast path, then pydicom, then SimpleITK
    SIMPLEITK = "simpleitk"  # every image through SimpleITK/GDCM


def decode(
    path: str, slices: Sequence[SliceHeader], decoder: str, num_workers: int, force_float: bool = False
) -> tuple[np.ndarray, str]:
    """Decode all slices into one C-contiguous ``(x, y, z[, c])`` array, rescale applied.

    Worker threads write the stored values of slice ``k`` into ``raw[k]`` of a ``(z, y, x[, c])``
    buffer (native pixel data is read from the file straight into it); the output dtype is then
    the stored dtype when there is no rescale, the smallest of int16/int32 holding the rescaled
    range when slope and intercept are integers, else float32. A tiled transposed copy writes
    ``(z, y, x) -> (x, y, z)`` (MONAI's layout; MONAI's ``LoadImage`` makes arrays C-contiguous
    anyway) with the dtype conversion fused in, and the rescale is applied in place.
    Returns the array and the name of its dtype.
    """
    first = slices[0]
    n = len(slices)
    frame_shape = (first.rows, first.cols) + ((first.samples,) if first.samples > 1 else ())
    stored = {(s.bits, s.signed) for s in slices}
    if force_float or len(stored) > 1 or first.bits not in (8, 16, 32):
        raw_dtype = np.dtype(np.float32)
    else:
        raw_dtype = np.dtype(f"{'i' if first.signed else 'u'}{first.bits // 8}")
    raw = np.empty((n, *frame_shape), dtype=raw_dtype)
    slopes = np.array([s.slope for s in slices])
    inters = np.array([s.intercept for s in slices])
    mismatch: list[int] = []
    cache: _Cache = {}

    def work(k: int) -> None:
        dst = raw[k]
        arr, rescaled = decode_slice(slices[k], decoder, cache, dst)
        if arr is dst:  # read straight into the buffer
            return
        if arr.shape != frame_shape:
            raise ReadError(slices[k].path, f"pixel data of shape {arr.shape}, expected {frame_shape}")
        if rescaled and raw_dtype.kind != "f":  # SimpleITK applied the rescale itself
            mismatch.append(k)
            return
        if rescaled:
            slopes[k], inters[k] = 1.0, 0.0
        if raw_dtype.kind != "f" and arr.dtype.kind not in "iu":
            mismatch.append(k)
            return
        np.copyto(dst, arr, casting="unsafe")

    with ThreadPoolExecutor(num_workers) as pool:
        if first.n_frames > 1 or n == 1:  # one (multi-frame) file: decode once, frames in order
            for k in range(n):
                work(k)
        else:
            list(pool.map(work, range(n)))
        if not mismatch:
            return _rescale_to_xyz(path, raw, slopes, inters, pool)
    # float pixel data, or values SimpleITK already rescaled: redo in float32
    return decode(path, slices, decoder, num_workers, force_float=True)


def _rescale_to_xyz(
    path: str, raw: np.ndarray, slopes: np.ndarray, inters: np.ndarray, pool: ThreadPoolExecutor
) -> tuple[np.ndarray, str]:
    """Stored values ``raw`` (z, y, x[, c]) -> rescaled C-contiguous (x, y, z[, c]) and its dtype."""
    n = raw.shape[0]
    raw_dtype = raw.dtype
    trivial = bool(np.all(slopes == 1.0) and np.all(inters == 0.0))
    integral = bool(np.all(slopes == np.round(slopes)) and np.all(inters == np.round(inters)))
    uniform = bool(np.all(slopes == slopes[0]) and np.all(inters == inters[0]))
    if raw_dtype.kind == "f" or trivial:
        dtype = raw_dtype
    elif integral:
        if raw.size == 0:
            lo, hi = np.zeros(n), np.zeros(n)
        elif uniform:
            lo, hi = np.full(n, float(raw.min())), np.full(n, float(raw.max()))
        else:
            flat = raw.reshape(n, -1)
            lo, hi = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
        ends = np.concatenate([slopes * lo + inters, slopes * hi + inters])
        lo_all, hi_all = float(ends.min()), float(ends.max())
        if -(2**15) <= lo_all and hi_all < 2**15:
            dtype = np.dtype(np.int16)
        elif -(2**31) <= lo_all and hi_all < 2**31:
            dtype = np.dtype(np.int32)
        else:
            dtype = np.dtype(np.float64)
    else:
        dtype = np.dtype(np.float32)
    out = transposed_copy(raw, dtype, pool)
    if not trivial:  # integer wrap-around in *= cancels out: the final values fit ``dtype``
        if uniform:
            if slopes[0] != 1:
                out *= dtype.type(slopes[0])
            out += dtype.type(inters[0])
        else:  # per-slice rescale along z (axis 2)
            shape = (1, 1, n) + (1,) * (out.ndim - 3)
            out *= slopes.astype(dtype).reshape(shape)
            out += inters.astype(dtype).reshape(shape)
    if dtype.kind == "f" and not np.isfinite(out).all():
        raise ReadError(path, "pixel data contains NaN or infinite values")
    return out, str(dtype)


def decode_slice(
    s: SliceHeader, decoder: str, cache: _Cache | None = None, out: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """Stored values of one frame (rows, cols[, samples]); True if already rescaled (SimpleITK).

    The native fast path reads into ``out`` and returns ``out`` itself when its dtype fits.
    """
    if decoder == Decoder.AUTO:
        fast = read_native(s, out)
        if fast is not None:
            return fast, False
        try:
            return read_pydicom(s, cache), False
        except Exception as e:  # no pydicom decoder for this syntax, or corrupt data
            if s.syntax in NATIVE_SYNTAXES:  # uncompressed (PS3.5 A.1-A.2): SimpleITK would zero-pad a
                # truncated Pixel Data element instead of failing
                raise ReadError(s.path, f"cannot read native pixel data: {_short(e)}") from e
            pyd_err: Exception | None = e
    else:
        pyd_err = None
    try:
        return read_sitk(s, cache), True
    except Exception as e:
        reason = f"cannot decode pixel data (transfer syntax {_syntax_name(s.syntax)})"
        if pyd_err is not None:
            reason += f": pydicom: {_short(pyd_err)}; SimpleITK: {_short(e)}"
        else:
            reason += f": SimpleITK: {_short(e)}"
        raise ReadError(s.path, reason) from e


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def _syntax_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        return f"{UID(uid).name} ({uid})"
    except Exception:
        return uid


def read_native(s: SliceHeader, out: np.ndarray | None = None) -> np.ndarray | None:
    """Read one frame of native (uncompressed) pixel data straight from the file into an array.

    The element header (tag (7FE0,0010) and exact length) is checked right before the last
    ``rows*cols*frames*bytes`` bytes, then at the offset where the header scan stopped (files with
    trailing padding), so anything unusual falls back to pydicom. The frame is read into
    ``out`` (and ``out`` returned) when ``out`` is a C-contiguous ``(rows, cols)`` array of the stored
    dtype, else into a new array. ``None``: not native pixel data, or not where expected.
    """
    native = NATIVE_SYNTAXES.get(s.syntax)
    if native is None or s.bits not in (8, 16, 32) or s.samples != 1:
        return None
    explicit, endian = native
    frame_bytes = s.rows * s.cols * s.bits // 8
    total = frame_bytes * s.n_frames
    length = total + (total & 1)
    tag = b"\xe0\x7f\x10\x00" if endian == "<" else b"\x7f\xe0\x00\x10"
    dtype = np.dtype(f"{endian}{'i' if s.signed else 'u'}{s.bits // 8}")
    length_bytes = length.to_bytes(4, "little" if endian == "<" else "big")
    sigs = (
        [tag + vr + b"\x00\x00" + length_bytes for vr in (b"OW", b"OB")] if explicit else [tag + length_bytes]
    )
    try:
        size = os.path.getsize(s.path)
        with open(s.path, "rb") as fh:
            # common case: PixelData is the last element, or where the header scan stopped ->
            # read only its header and the frame
            starts = [size - length]
            if s.pixel_offset is not None and s.pixel_offset + len(sigs[0]) != starts[0]:
                starts.append(s.pixel_offset + len(sigs[0]))
            for start in starts:
                if start - len(sigs[0]) < 0 or start + length > size:
                    continue
                fh.seek(start - len(sigs[0]))
                if fh.read(len(sigs[0])) in sigs:
                    fh.seek(start + s.frame * frame_bytes)
                    direct = (
                        out is not None
                        and out.dtype == dtype
                        and out.shape == (s.rows, s.cols)
                        and out.flags.c_contiguous
                    )
                    arr = out if direct and out is not None else np.empty((s.rows, s.cols), dtype=dtype)
                    if fh.readinto(memoryview(arr).cast("B")) != frame_bytes:
                        return None
                    return _sign_extend(arr, s)
            if s.n_frames > 1:
                return None  # pydicom decodes the file once for all frames
            # otherwise (trailing padding, ...): find the element header in the file
            fh.seek(0)
            buf = fh.read()
    except OSError:
        return None
    found = [(p, sig) for sig in sigs if (p := buf.find(sig)) >= 0]
    if not found:
        return None
    pos, sig = min(found)
    if pos + len(sig) + length > len(buf):
        return None
    offset = pos + len(sig) + s.frame * frame_bytes
    arr = np.frombuffer(buf, dtype=dtype, count=s.rows * s.cols, offset=offset).reshape(s.rows, s.cols)
    return _sign_extend(arr, s)


def _sign_extend(arr: np.ndarray, s: SliceHeader) -> np.ndarray:
    """Sign-extend from BitsStored (PS3.5 Sec. 8.1.1), in place (``arr`` is a freshly read frame)."""
    if s.signed and s.bits_stored < s.bits:
        shift = arr.dtype.type(s.bits - s.bits_stored)
        if not arr.flags.writeable:
            arr = arr.copy()
        arr <<= shift
        arr >>= shift
    return arr


def read_pydicom(s: SliceHeader, cache: _Cache | None = None) -> np.ndarray:
    """One frame decoded by pydicom (a multi-frame file is decoded once per ``cache``)."""
    import pydicom

    key = ("pydicom", s.path)
    if cache is not None and key in cache:
        arr = cache[key]
    else:
        arr = np.asarray(pydicom.dcmread(s.path).pixel_array)
        if cache is not None and s.n_frames > 1:
            cache[key] = arr
    return arr[s.frame] if s.n_frames > 1 else arr


def read_sitk(s: SliceHeader, cache: _Cache | None = None) -> np.ndarray:
    """One frame decoded by SimpleITK/GDCM, rescale applied (a multi-frame file once per ``cache``)."""
    import SimpleITK as sitk

    key = ("sitk", s.path)
    if cache is not None and key in cache:
        return cache[key][s.frame]
    img = sitk.ReadImage(s.path)
    arr = sitk.GetArrayFromImage(img)  # (frames, rows, cols[, c])
    if arr.ndim == 2 or (
        arr.ndim == 3 and img.GetNumberOfComponentsPerPixel() > 1 and img.GetDimension() == 2
    ):
        arr = arr[None]
    if cache is not None and s.n_frames > 1:
        cache[key] = arr
    return arr[s.frame]


def resample_slices(array: np.ndarray, d: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Linear interpolation of the slices (last spatial axis, positions ``d``) onto ``targets``."""
    idx = np.clip(np.searchsorted(d, targets, side="right") - 1, 0, len(d) - 2)
    w = ((targets - d[idx]) / (d[idx + 1] - d[idx])).astype(np.float32)
    src = np.moveaxis(array, 2, 0).astype(np.float32)
    out = (
        src[idx] * (1 - w)[(...,) + (None,) * (src.ndim - 1)]
        + src[idx + 1] * w[(...,) + (None,) * (src.ndim - 1)]
    )
    return np.moveaxis(out, 0, 2)
