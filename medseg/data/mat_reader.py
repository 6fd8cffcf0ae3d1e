"""MATLAB ``.mat`` files as a MONAI :class:`~monai.data.ImageReader`.

* v4 / v5 / v7 files are read with :func:`scipy.io.loadmat`; v7.3 files (HDF5 with a 512-byte user
  block) with h5py. v7.3 stores arrays column-major with reversed HDF5 dimensions, ``char`` as
  uint16 and ``logical`` as uint8 with a ``MATLAB_class`` attribute; the reader undoes all of it,
  so both versions of the same data give the *same* array: axis 0 is MATLAB's row axis (exactly
  what ``scipy.io.loadmat`` returns), ``logical`` comes back as ``uint8``, ``char`` as ``str``.
* Struct fields are addressed by a path, ``field="cjdata/image"`` (``"cjdata.image"`` works too; a
  numeric segment such as ``"cases/0/image"`` indexes a cell or struct array, 0-based, in MATLAB's
  column-major order).
* Default field (``field=None``): the figshare brain-tumour layout (a struct ``cjdata`` with an
  ``image`` field) gives ``cjdata/image``; otherwise the file must hold exactly one *image-like*
  array (numeric or logical with at least two dimensions larger than 1, found through structs but
  not inside cells), else :class:`~medseg.data.errors.ReadError` lists the candidates.

Image and label from the same file::

    LoadImaged(keys="image", reader=MatReader(field="cjdata/image", pixdim=0.49))
    LoadImaged(keys="label", reader=MatReader(field="cjdata/tumorMask", pixdim=0.49))

with datalist entries ``{"image": "x.mat", "label": "x.mat"}``.

Metadata: ``affine``/``original_affine`` (diagonal from ``pixdim``, identity by default),
``spatial_shape``, ``original_channel_dim`` (NaN, MONAI's "no_channel", unless ``channel_dim`` is
given), ``filename_or_obj``, ``space`` (RAS), ``mat_source_field`` and ``mat_file_version``, and the
small siblings of the chosen field (``char`` rows up to 256 characters and numeric scalars) as
``mat_<name>``, e.g. ``mat_PID`` and ``mat_label`` for the figshare files.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import h5py
import numpy as np
import scipy.io
import scipy.io.matlab
import scipy.sparse
from monai.config import PathLike
from monai.data import ImageReader
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys, ensure_tuple

from medseg.data.errors import ReadError
from medseg.data.formats import format_of

__all__ = ["MatReader", "MatImage", "FIGSHARE_IMAGE_FIELD", "FIGSHARE_MASK_FIELD"]

FIGSHARE_IMAGE_FIELD = "cjdata/image"
FIGSHARE_MASK_FIELD = "cjdata/tumorMask"

_NUMERIC_CLASSES = {
    "double": np.float64,
    "single": np.float32,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "uint64": np.uint64,
    "logical": np.uint8,
}
_MATLAB_NAMES = {np.dtype(v).name: k for k, v in _NUMERIC_CLASSES.items() if k != "logical"}
_MAX_META_CHARS = 256
_H5_HIDDEN = ("#refs#", "#subsystem#")


# --------------------------------------------------------------------------------------------------
# A small lazy tree over both back ends: kind is "struct", "numeric", "logical", "char", "cell" or
# "other"; ``shape`` is MATLAB's shape; ``value()`` reads the data (numpy array or str).
# --------------------------------------------------------------------------------------------------
class _Node:
    kind: str = "other"
    mclass: str = "?"
    shape: tuple[int, ...] = ()

    def children(self) -> dict[str, _Node]:
        return {}

    def value(self) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        dims = "x".join(str(s) for s in self.shape) if self.shape else "?"
        return f"{dims} {self.mclass}"


def _char_rows(arr: np.ndarray) -> list[str]:
    """MATLAB char array (rows x columns of UTF-16 code units) -> one str per row."""
    arr = np.atleast_2d(np.asarray(arr))
    return [row.astype("<u2").tobytes().decode("utf-16-le", errors="replace") for row in arr]


class _PyNode(_Node):
    """A value returned by ``scipy.io.loadmat(squeeze_me=False, struct_as_record=True)``."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        if isinstance(obj, dict):
            self.kind, self.mclass, self.shape = "struct", "struct", (1, 1)
        elif scipy.sparse.issparse(obj):
            name = _MATLAB_NAMES.get(obj.dtype.name, obj.dtype.name)
            self.kind, self.mclass, self.shape = "numeric", f"sparse {name}", tuple(obj.shape)
        elif isinstance(obj, (scipy.io.matlab.MatlabOpaque, scipy.io.matlab.MatlabFunction)):
            self.kind, self.mclass, self.shape = "other", "opaque", tuple(np.shape(obj))
        elif isinstance(obj, np.ndarray):
            self.shape = tuple(obj.shape)
            if obj.dtype.names:
                self.kind, self.mclass = ("struct" if obj.size == 1 else "cell"), "struct"
            elif obj.dtype.kind == "O":
                self.kind, self.mclass = "cell", "cell"
            elif obj.dtype.kind == "U":
                self.kind, self.mclass = "char", "char"
                # loadmat's char arrays lose their column count; report rows x longest row
                self.shape = (max(obj.size, 1), max((len(s) for s in obj.ravel()), default=0))
            elif obj.dtype.kind == "b":
                self.kind, self.mclass = "logical", "logical"
            elif obj.dtype.kind in "iuf":
                self.kind, self.mclass = "numeric", _MATLAB_NAMES.get(obj.dtype.name, obj.dtype.name)
            elif obj.dtype.kind == "c":
                self.kind, self.mclass = "other", f"complex {obj.dtype}"
        else:
            self.shape = tuple(np.shape(obj))

    def children(self) -> dict[str, _Node]:
        if isinstance(self.obj, dict):
            return {k: _PyNode(v) for k, v in self.obj.items() if not k.startswith("__")}
        if self.kind == "struct":
            rec = self.obj.ravel()[0]
            return {name: _PyNode(rec[name]) for name in self.obj.dtype.names}
        if self.kind == "cell":
            flat = self.obj.ravel(order="F")
            if self.obj.dtype.names:  # struct array: element i is a 1x1 struct
                return {str(i): _PyNode(flat[i : i + 1].reshape(1, 1)) for i in range(flat.size)}
            return {str(i): _PyNode(v) for i, v in enumerate(flat)}
        return {}

    def value(self) -> Any:
        if self.kind == "char":
            rows = [str(s) for s in self.obj.ravel()]
            return rows[0] if len(rows) == 1 else rows
        if scipy.sparse.issparse(self.obj):
            return np.asarray(self.obj.toarray())
        if self.kind == "logical":
            return self.obj.astype(np.uint8)
        return np.asarray(self.obj)


class _H5Node(_Node):
    """A dataset or group of a v7.3 (HDF5) MAT-file; reads data only in ``value()``."""

    def __init__(self, obj: h5py.Group | h5py.Dataset, file: h5py.File) -> None:
        self.obj, self.file = obj, file
        attrs = obj.attrs
        mclass = attrs.get("MATLAB_class", b"struct" if isinstance(obj, h5py.Group) else b"")
        self.mclass = mclass.decode() if isinstance(mclass, bytes) else str(mclass)
        self.empty = bool(attrs.get("MATLAB_empty", 0))
        if isinstance(obj, h5py.Group):
            if "MATLAB_sparse" in attrs and self.mclass in _NUMERIC_CLASSES:
                self.kind = "numeric"
                nrows = int(attrs["MATLAB_sparse"])
                self.shape = (nrows, int(obj["jc"].shape[0]) - 1)
                self.mclass = f"sparse {self.mclass}"
            elif self.mclass == "struct":
                self.kind, self.shape = "struct", (1, 1)
            return
        if self.empty:
            self.shape = tuple(int(d) for d in np.asarray(obj[()]).ravel())
        else:
            self.shape = tuple(reversed(obj.shape))
        if h5py.check_dtype(ref=obj.dtype) is not None:
            self.kind = "cell"  # cell array, or one field of a struct array
        elif self.mclass == "char":
            self.kind = "char"
        elif self.mclass == "logical":
            self.kind = "logical"
        elif self.mclass in _NUMERIC_CLASSES:
            self.kind = "other" if obj.dtype.names else "numeric"  # compound = complex
            if obj.dtype.names:
                self.mclass = f"complex {self.mclass}"

    def children(self) -> dict[str, _Node]:
        if self.kind == "struct":
            return {k: _H5Node(v, self.file) for k, v in self.obj.items() if k not in _H5_HIDDEN}
        if self.kind == "cell" and not self.empty:
            refs = np.asarray(self.obj[()]).ravel()  # C order of the HDF5 array = MATLAB's column order
            return {str(i): _H5Node(self.file[r], self.file) for i, r in enumerate(refs)}
        return {}

    def value(self) -> Any:
        if self.kind == "char":
            if self.empty:
                return ""
            rows = _char_rows(np.asarray(self.obj[()]).T)
            return rows[0] if len(rows) == 1 else rows
        dtype = _NUMERIC_CLASSES.get(self.mclass.replace("sparse ", ""), None)
        if self.empty:
            return np.zeros(self.shape, dtype=dtype or np.float64)
        if isinstance(self.obj, h5py.Group):  # sparse: CSC triplets
            g = self.obj
            jc = np.asarray(g["jc"][()]).ravel().astype(np.int64)
            ir = np.asarray(g["ir"][()]).ravel().astype(np.int64) if "ir" in g else np.zeros(0, np.int64)
            data = np.asarray(g["data"][()]).ravel() if "data" in g else np.zeros(0)
            return scipy.sparse.csc_matrix((data.astype(dtype), ir, jc), shape=self.shape).toarray()
        arr = np.asarray(self.obj[()])
        arr = np.ascontiguousarray(arr.T)  # undo MATLAB's column-major / reversed-dimension storage
        return arr.astype(dtype, copy=False) if dtype is not None else arr


# --------------------------------------------------------------------------------------------------
@dataclass
class MatImage:
    """What :meth:`MatReader.read` returns for one file: the chosen array and its metadata."""

    filename: str
    array: np.ndarray
    field: str
    version: str
    extra: dict[str, Any] = dc_field(default_factory=dict)


def _split_path(path: str) -> list[str]:
    return [p for p in re.split(r"[/.]", path.strip()) if p]


def _walk(node: _Node, prefix: str = "") -> Iterator[tuple[str, _Node]]:
    """Every field reachable through structs (cells are listed but not entered)."""
    for name, child in node.children().items():
        path = f"{prefix}{name}"
        yield path, child
        if child.kind == "struct":
            yield from _walk(child, path + "/")


def _is_image_like(node: _Node) -> bool:
    return node.kind in ("numeric", "logical") and sum(s > 1 for s in node.shape) >= 2


def _listing(root: _Node, limit: int = 40) -> str:
    items = [f"{p} ({n.describe()})" for p, n in _walk(root)]
    if not items:
        return "the file holds no variables"
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return "available fields: " + ", ".join(items[:limit]) + more


def _scalar_or_str(node: _Node) -> Any:
    """A small sibling as a metadata value, or None when it is not small."""
    if node.kind == "char" and node.shape and node.shape[0] <= 1:
        if len(node.shape) < 2 or node.shape[-1] <= _MAX_META_CHARS:
            val = node.value()
            return val if isinstance(val, str) else None
    if node.kind in ("numeric", "logical") and math.prod(node.shape) == 1:
        val = np.asarray(node.value()).ravel()[0]
        return val.item()
    return None


class MatReader(ImageReader):
    """Read one array of a MATLAB ``.mat`` file (v4, v5, v7, v7.3) as a MONAI image.

    Args:
        field: path of the array inside the file, e.g. ``"cjdata/image"``; ``None`` picks the
            default described in the module docstring (figshare ``cjdata/image``, else the only
            image-like array).
        pixdim: pixel size, a number (all spatial axes) or one value per axis (up to 3; a third
            value for a 2D image, e.g. the slice thickness, is kept in the affine's z scale).
            ``None`` gives an identity affine. The figshare brain-tumour set has 0.49 mm pixels.
        channel_dim: axis of the array that holds channels; ``None`` means no channel axis.
        allow_nonfinite: accept float arrays with NaN/inf (by default they raise ``ReadError``).
        meta_siblings: store the small siblings (char rows, numeric scalars) of the chosen field
            in the metadata as ``mat_<name>``.
    """

    def __init__(
        self,
        field: str | None = None,
        pixdim: float | Sequence[float] | None = None,
        channel_dim: int | None = None,
        allow_nonfinite: bool = False,
        meta_siblings: bool = True,
    ) -> None:
        super().__init__()
        self.field = field
        self.pixdim = None if pixdim is None else tuple(float(p) for p in ensure_tuple(pixdim))
        if self.pixdim is not None and not all(p > 0 and math.isfinite(p) for p in self.pixdim):
            raise ValueError(f"pixdim must hold positive finite numbers, got {pixdim!r}")
        self.channel_dim = channel_dim
        self.allow_nonfinite = allow_nonfinite
        self.meta_siblings = meta_siblings

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True for ``.mat`` files (:mod:`medseg.data.formats`)."""
        names = ensure_tuple(filename)
        kinds = [getattr(format_of(n, sniff=False), "name", None) for n in names]
        return len(kinds) > 0 and all(k == "mat" for k in kinds)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> MatImage | list[MatImage]:
        """Read the chosen field of each file (``field=`` in ``kwargs`` overrides the constructor's)."""
        field = kwargs.pop("field", self.field)
        images = [self._read_one(os.fspath(name), field) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: MatImage | Sequence[MatImage]) -> tuple[np.ndarray, dict]:
        """Array and MONAI metadata; several files are stacked on a new first (channel) axis."""
        images = [img] if isinstance(img, MatImage) else list(img)
        arrays, metas = [], []
        for im in images:
            arrays.append(im.array)
            metas.append(self._meta(im))
        meta = metas[0]
        if len(arrays) == 1:
            return arrays[0], meta
        for m, im in zip(metas[1:], images[1:], strict=True):
            if tuple(m[MetaKeys.SPATIAL_SHAPE]) != tuple(meta[MetaKeys.SPATIAL_SHAPE]):
                raise ReadError(
                    im.filename,
                    f"spatial shape {tuple(m[MetaKeys.SPATIAL_SHAPE])} differs from "
                    f"{images[0].filename}'s {tuple(meta[MetaKeys.SPATIAL_SHAPE])}; cannot stack",
                )
        if self.channel_dim is None:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays, axis=0), meta
        return np.concatenate(arrays, axis=self.channel_dim), meta

    # ----------------------------------------------------------------------------------------------
    def _meta(self, im: MatImage) -> dict[str, Any]:
        shape = list(im.array.shape)
        if self.channel_dim is not None:
            del shape[self.channel_dim]
        affine = np.eye(4, dtype=np.float64)
        if self.pixdim is not None:
            spacing = self.pixdim * min(3, len(shape)) if len(self.pixdim) == 1 else self.pixdim[:3]
            affine[np.arange(len(spacing)), np.arange(len(spacing))] = spacing
        meta: dict[str, Any] = dict(im.extra)
        meta.update(
            {
                MetaKeys.AFFINE: affine,
                MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                MetaKeys.SPATIAL_SHAPE: np.asarray(shape),
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if self.channel_dim is None else self.channel_dim,
                MetaKeys.SPACE: SpaceKeys.RAS,
                ImageMetaKey.FILENAME_OR_OBJ: im.filename,
                "mat_source_field": im.field,
                "mat_file_version": im.version,
            }
        )
        return meta

    def _read_one(self, path: str, field: str | None) -> MatImage:
        if not os.path.isfile(path):
            raise ReadError(path, "no such file" if not os.path.exists(path) else "not a file")
        try:
            major, minor = scipy.io.matlab.matfile_version(path)
        except Exception as e:  # MatReadError, ValueError, OSError ... from a non-MAT file
            raise ReadError(path, f"not a MATLAB .mat file ({e})") from None
        if major == 2 or h5py.is_hdf5(path):
            version = "7.3"
            try:
                with h5py.File(path, "r") as f:
                    return self._extract(path, _H5Node(f, f), field, version)
            except ReadError:
                raise
            except Exception as e:  # truncated or corrupt HDF5
                reason = (
                    f"cannot read MATLAB v7.3 (HDF5) file (truncated or corrupt?): {type(e).__name__}: {e}"
                )
                raise ReadError(path, reason) from None
        version = "4" if major == 0 else "5"
        try:
            contents = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=True, chars_as_strings=True)
        except NotImplementedError as e:
            raise ReadError(path, f"unsupported MAT-file: {e}") from None
        except (ValueError, OSError, TypeError, IndexError, KeyError, EOFError, zlib.error) as e:
            if version == "4":  # v4 files have no header: anything without a v5/v7.3 header lands here
                reason = f"not a MATLAB .mat file (no v5/v7.3 header; as v4: {type(e).__name__}: {e})"
            else:
                reason = f"cannot read MATLAB v5 file (truncated or corrupt?): {type(e).__name__}: {e}"
            raise ReadError(path, reason) from None
        return self._extract(path, _PyNode(contents), field, version)

    def _extract(self, path: str, root: _Node, field: str | None, version: str) -> MatImage:
        if field is None:
            field = self._default_field(path, root)
        parts = _split_path(field)
        if not parts:
            raise ReadError(path, f"empty field path {field!r}; {_listing(root)}")
        parent, node = root, root
        for i, part in enumerate(parts):
            kids = node.children()
            if part not in kids:
                where = "/".join(parts[:i]) or "the top level"
                reason = f"no field {field!r} ({part!r} missing under {where}); {_listing(root)}"
                raise ReadError(path, reason)
            parent, node = node, kids[part]
        if node.kind not in ("numeric", "logical"):
            numeric = [p for p, n in _walk(root) if n.kind in ("numeric", "logical")]
            raise ReadError(
                path,
                f"field {field!r} is {node.describe()}"
                f"{'' if node.kind in node.mclass else f' ({node.kind})'}, not a numeric array; "
                f"numeric fields: {', '.join(numeric) if numeric else 'none'}",
            )
        arr = node.value()
        if arr.size == 0:
            raise ReadError(path, f"field {field!r} is empty ({node.describe()})")
        if arr.dtype.kind == "f" and not self.allow_nonfinite and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise ReadError(
                path,
                f"field {field!r} has {bad} NaN/inf values (MatReader(allow_nonfinite=True) accepts them)",
            )
        extra: dict[str, Any] = {}
        if self.meta_siblings:
            for name, sib in parent.children().items():
                if sib is node or name == parts[-1] or sib.kind not in ("char", "numeric", "logical"):
                    continue
                val = _scalar_or_str(sib)
                if val is not None:
                    extra[f"mat_{name}"] = val
        return MatImage(filename=path, array=arr, field="/".join(parts), version=version, extra=extra)

    @staticmethod
    def _default_field(path: str, root: _Node) -> str:
        top = root.children()
        cj = top.get("cjdata")
        if cj is not None and cj.kind == "struct":
            img = cj.children().get("image")
            if img is not None and img.kind in ("numeric", "logical"):
                return FIGSHARE_IMAGE_FIELD
        candidates = [p for p, n in _walk(root) if _is_image_like(n)]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ReadError(path, f"no image-like numeric array in the file; {_listing(root)}")
        raise ReadError(
            path,
            f"{len(candidates)} image-like arrays ({', '.join(candidates)}); choose one with "
            "MatReader(field=...)",
        )
