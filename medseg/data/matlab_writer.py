"""Write MATLAB ``.mat`` files the way MATLAB itself does: v7.3 (HDF5) and v5 (via SciPy).

MATLAB v7.3 files are HDF5 files with a 512-byte user block that holds a MATLAB text header
(``MATLAB 7.3 MAT-file, Platform: ..., Created on: ... HDF5 schema 1.00 .``, the version
``0x0200`` and the endian indicator ``IM``). Every variable carries a ``MATLAB_class`` attribute;
a struct is a group (with a ``MATLAB_fields`` attribute listing its fields); ``char`` is stored as
``uint16`` code units and ``logical`` as ``uint8``, each with ``MATLAB_int_decode``; arrays are
stored column-major, i.e. the HDF5 dataset holds the transpose of the MATLAB array (a MATLAB
``m x n`` array is an HDF5 ``n x m`` dataset). Datasets are deflate-compressed as MATLAB does.

The output is deterministic: no time stamps in the HDF5 objects and a fixed creation date in the
header (``created``), so the same variables give the same bytes.

v5 files are written with :func:`scipy.io.savemat`; its time-stamped header text is replaced by a
fixed one for the same reason. Both are written next to the target and renamed into place
(:func:`medseg.io.atomic_target`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io

from medseg.io import atomic_target

__all__ = ["MATLAB_CREATED", "write_mat_v5", "write_mat_v73"]

#: fixed "Created on" text (``ctime`` format, as MATLAB writes it) used unless one is given
MATLAB_CREATED = "Thu Jan  1 00:00:00 2015"

_USERBLOCK = 512
_H5_CLASSES: dict[np.dtype, str] = {
    np.dtype(np.float64): "double",
    np.dtype(np.float32): "single",
    np.dtype(np.int8): "int8",
    np.dtype(np.int16): "int16",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.uint64): "uint64",
}


def _v73_header(platform: str, created: str) -> bytes:
    """The 512-byte MATLAB user block: 116 bytes of text, 8 bytes subsystem offset, version, 'IM'."""
    text = f"MATLAB 7.3 MAT-file, Platform: {platform}, Created on: {created} HDF5 schema 1.00 ."
    raw = text.encode("ascii")
    if len(raw) > 116:
        raise ValueError(f"MATLAB header text too long ({len(raw)} > 116 bytes): {text!r}")
    head = raw.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    return head.ljust(_USERBLOCK, b"\x00")


def _as_matlab_array(value: Any) -> np.ndarray:
    """A value as the >= 2-D array MATLAB would hold (scalars are 1x1, 1-D arrays are rows)."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(1, -1)
    return arr


def _set_class(obj: h5py.HLObject, matlab_class: str, int_decode: int | None = None) -> None:
    obj.attrs.create("MATLAB_class", np.bytes_(matlab_class))
    if int_decode is not None:
        obj.attrs.create("MATLAB_int_decode", np.int32(int_decode))


def _create_group(parent: h5py.Group, name: str) -> h5py.Group:
    """A group without modification-time stamps (h5py's ``create_group`` cannot switch them off)."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    gid = h5py.h5g.create(parent.id, name.encode("utf-8"), gcpl=gcpl)
    return h5py.Group(gid)


def _write_dataset(parent: h5py.Group, name: str, data: np.ndarray) -> h5py.Dataset:
    # MATLAB stores column-major: the HDF5 dataset is the transpose of the MATLAB array
    stored = np.ascontiguousarray(data.T)
    kwargs: dict[str, Any] = {}
    if stored.size > 1:
        kwargs = {"chunks": stored.shape, "compression": "gzip", "compression_opts": 3}
    return parent.create_dataset(name, data=stored, track_times=False, **kwargs)


def _write_value(parent: h5py.Group, name: str, value: Any) -> None:
    if isinstance(value, Mapping):
        group = _create_group(parent, name)
        _set_class(group, "struct")
        fields = np.empty(len(value), dtype=h5py.vlen_dtype(np.dtype("S1")))
        for i, key in enumerate(value):
            fields[i] = np.frombuffer(str(key).encode("ascii"), dtype="S1")
        group.attrs.create("MATLAB_fields", fields)
        for key, sub in value.items():
            _write_value(group, str(key), sub)
        return
    if isinstance(value, str):
        codes = np.frombuffer(value.encode("utf-16-le"), dtype="<u2").reshape(1, -1)
        _set_class(_write_dataset(parent, name, codes), "char", 2)
        return
    arr = _as_matlab_array(value)
    if arr.dtype == np.bool_:
        _set_class(_write_dataset(parent, name, arr.astype(np.uint8)), "logical", 1)
        return
    matlab_class = _H5_CLASSES.get(arr.dtype.newbyteorder("="))
    if matlab_class is None:
        raise TypeError(f"cannot write {name!r} of dtype {arr.dtype} as a MATLAB array")
    _set_class(_write_dataset(parent, name, arr.astype(arr.dtype.newbyteorder("<"))), matlab_class)


def write_mat_v73(
    path: str | os.PathLike[str],
    variables: Mapping[str, Any],
    *,
    platform: str = "GLNXA64",
    created: str = MATLAB_CREATED,
) -> Path:
    """Write ``variables`` to a MATLAB v7.3 (HDF5) file, laid out as MATLAB writes it.

    Values: a mapping (struct, written as a group), ``str`` (char), a bool array (logical), a
    numeric scalar or array (double/single/intN/uintN). Arrays are given in MATLAB orientation
    (``a[r, c]`` is ``a(r+1, c+1)``); 0-D values become 1x1 and 1-D values rows, as in
    :func:`scipy.io.savemat`.
    """
    path = Path(path)
    with atomic_target(path, ".mat") as tmp:
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK, libver="earliest", track_order=False) as f:
            for name, value in variables.items():
                _write_value(f, name, value)
        with open(tmp, "r+b") as fh:
            fh.write(_v73_header(platform, created))
    return path


def write_mat_v5(
    path: str | os.PathLike[str],
    variables: Mapping[str, Any],
    *,
    platform: str = "GLNXA64",
    created: str = MATLAB_CREATED,
) -> Path:
    """Write ``variables`` to a MATLAB v5 file with :func:`scipy.io.savemat` (compressed).

    Mappings become structs, ``str`` char, bool arrays logical; 1-D arrays are rows. SciPy's
    time-stamped header text is replaced by a fixed one so that the bytes are reproducible.
    """
    path = Path(path)
    buf = io.BytesIO()
    scipy.io.savemat(buf, dict(variables), format="5", do_compression=True, oned_as="row")
    raw = bytearray(buf.getvalue())
    text = f"MATLAB 5.0 MAT-file, Platform: {platform}, Created on: {created}".encode("ascii")
    raw[:116] = text.ljust(116, b" ")
    with atomic_target(path, ".mat") as tmp:
        Path(tmp).write_bytes(bytes(raw))
    return path
