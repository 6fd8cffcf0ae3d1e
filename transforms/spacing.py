"""``Spacing(d)`` with separable resampling: MONAI's transform, ~10x faster on axis-aligned grids.

MONAI resamples every ``Spacing`` (and, in ``Invertd``, its inverse) with ``affine_grid`` +
``grid_sample``: a dense coordinate grid and a gather per output voxel. When the voxel-to-voxel map is
axis-aligned (a scale, a shift and possibly a flip per axis: ``Spacing`` after ``Orientation``, or on any
scan without oblique direction cosines), linear interpolation is separable: one small ``(n_out, n_in)``
interpolation matrix per axis, applied with matrix products. :class:`SeparableResample` does that and
gives the values ``grid_sample`` gives (bilinear/trilinear, ``border`` or ``zeros`` padding) up to
rounding, with the same metadata and the same inverse; every other case (rotations, ``nearest``, spline
orders, ``reflection`` padding, lazy mode, MONAI's compiled backend, strong shrinking where
``grid_sample`` is cheaper, NaN/inf voxels, unit-size axes with ``align_corners``) goes to MONAI's own
path unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any

import numpy as np
import torch
from monai.config import USE_COMPILED, DtypeLike
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.data.utils import compute_shape_offset, to_affine_nd
from monai.transforms import Spacing, Spacingd, SpatialResample
from monai.transforms.inverse import TraceableTransform
from monai.utils import TraceKeys, convert_to_tensor, ensure_tuple, fall_back_tuple
from monai.utils.type_conversion import convert_to_dst_type, get_equivalent_dtype, get_torch_dtype_from_string

from .inverse_labels import LabelRule, pending_label_request

__all__ = [
    "SeparableResample",
    "SeparableSpacing",
    "SeparableSpacingd",
    "separable_is_cheaper",
    "separable_linear_resample",
    "separable_resample_to_labels",
]

# largest position error (in voxels) tolerated from ignoring off-diagonal terms of the voxel map
_POSITION_TOL = 1e-4
_AFFINE_TOL = 1e-3  # MONAI's AFFINE_TOL: below it the image is returned without resampling


_DENSE_MAX = 192  # axes up to this input length use a dense interpolation matrix, longer ones two gathers
_BAND_ROWS, _BAND_MIN_POST = 32, 256  # dense matrix in blocks of rows when the lines are this long
# the banded pass slices the lines per block of rows: worth it for a few batches of lines only (a volume's
# middle axis, ``pre`` in the hundreds, runs 5-8x faster with the gathers)
_BAND_MAX_PRE = 8
_GATHER_BLOCK = 1 << 24  # elements per block of the two-gather pass
_SLAB_ELEMENTS = 1 << 22  # elements per slab: of an input converted slab by slab, of labels' score planes
# rough CPU costs (ns) behind the choice between this path and grid_sample: per multiply-add of a dense
# pass, per output element of a gather pass, per output voxel and channel of grid_sample
_NS_MAC, _NS_GATHER, _NS_GRID = 0.01, 6.0, 20.0


def _axis_taps(
    n_in: int, n_out: int, scale: float, shift: float, padding_mode: str
) -> tuple[np.ndarray, ...]:
    """Per output position along one axis: both input taps and their linear weights.

    Output ``i`` samples input position ``scale * i + shift``; ``border`` clamps positions to
    ``[0, n_in - 1]`` and ``zeros`` gives taps outside the image weight 0, exactly as
    ``torch.nn.functional.grid_sample`` treats out-of-range corners.
    """
    pos = np.arange(n_out, dtype=np.float64) * scale + shift
    if padding_mode == "border":
        pos = np.clip(pos, 0.0, n_in - 1.0)
    lo = np.floor(pos)
    w_hi = pos - lo
    lo = lo.astype(np.int64)
    hi = lo + 1
    w_lo = np.where((lo >= 0) & (lo < n_in), 1.0 - w_hi, 0.0)
    w_hi = np.where((hi >= 0) & (hi < n_in), w_hi, 0.0)
    return np.clip(lo, 0, n_in - 1), np.clip(hi, 0, n_in - 1), w_lo, w_hi


def _dense(n_in: int, pre: int, post: int) -> bool:
    """Whether an axis is resampled with the interpolation matrix (else with two gathers)."""
    return n_in <= _DENSE_MAX and (post < _BAND_MIN_POST or pre <= _BAND_MAX_PRE)


def _resample_axis(
    y: torch.Tensor, ax: int, n_out: int, scale: float, shift: float, padding_mode: str
) -> torch.Tensor:
    """Linear resampling of spatial axis ``ax`` of channel-first ``y`` (see :func:`_axis_taps`)."""
    shape = list(y.shape)
    n_in = shape[ax + 1]
    pre, post = int(np.prod(shape[: ax + 1])), int(np.prod(shape[ax + 2 :]))
    lo, hi, w_lo, w_hi = _axis_taps(n_in, n_out, scale, shift, padding_mode)
    shape[ax + 1] = n_out
    if _dense(n_in, pre, post):  # one (n_out, n_in) matrix with two non-zeros per row: a GEMM
        mat = np.zeros((n_out, n_in), dtype=np.float64)
        np.add.at(mat, (np.arange(n_out), lo), w_lo)
        np.add.at(mat, (np.arange(n_out), hi), w_hi)
        if post == 1:
            m = torch.as_tensor(mat, dtype=y.dtype, device=y.device)
            return (y.reshape(pre, n_in) @ m.T).reshape(shape)
        y3 = y.reshape(pre, n_in, post)
        if post < _BAND_MIN_POST:
            return (torch.as_tensor(mat, dtype=y.dtype, device=y.device) @ y3).reshape(shape)
        # banded: each block of output rows only needs the input rows between its taps (the matrix
        # is zero elsewhere), e.g. ~18 of 95 rows when enlarging 2x: 2-3x fewer multiply-adds
        out = torch.empty((pre, n_out, post), dtype=y.dtype, device=y.device)
        for o0 in range(0, n_out, _BAND_ROWS):
            o1 = min(o0 + _BAND_ROWS, n_out)
            i0, i1 = int(lo[o0:o1].min()), int(hi[o0:o1].max()) + 1
            block = torch.as_tensor(mat[o0:o1, i0:i1], dtype=y.dtype, device=y.device)
            torch.matmul(block, y3[:, i0:i1, :], out=out[:, o0:o1, :])
        return out.reshape(shape)
    y3 = y.reshape(pre, n_in, post)
    dev = y.device
    w = [torch.as_tensor(v, dtype=y.dtype, device=dev).view(1, n_out, 1) for v in (w_lo, w_hi)]
    lo_t, hi_t = torch.as_tensor(lo, device=dev), torch.as_tensor(hi, device=dev)
    out = torch.empty((pre, n_out, post), dtype=y.dtype, device=dev)
    step = max(1, _GATHER_BLOCK // max(1, n_out * post))  # the second gather's temporary stays small
    for p0 in range(0, pre, step):
        o = out[p0 : p0 + step]
        torch.index_select(y3[p0 : p0 + step], 1, lo_t, out=o)
        o.mul_(w[0]).addcmul_(y3[p0 : p0 + step].index_select(1, hi_t), w[1])
    return out.reshape(shape)


def separable_linear_resample(
    img: torch.Tensor,
    scale: Sequence[float],
    shift: Sequence[float],
    spatial_size: Sequence[int],
    padding_mode: str = "border",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Resample channel-first ``img`` so that output voxel ``i`` samples input position ``scale * i + shift``
    per axis, with (bi/tri)linear interpolation: ``grid_sample``'s result for a diagonal voxel map, computed
    one axis at a time (a small matrix product, or two gathers along long axes; no coordinate grid).
    Returns ``float32`` on ``img``'s device.
    """
    if padding_mode not in ("border", "zeros"):
        raise ValueError(f"padding_mode must be 'border' or 'zeros', got {padding_mode!r}")
    n_in = [int(s) for s in img.shape[1:]]
    n_out = [int(s) for s in spatial_size]
    if len(n_out) != len(n_in) or len(scale) != len(n_in) or len(shift) != len(n_in):
        raise ValueError(
            f"spatial rank mismatch: image {tuple(img.shape)}, size {n_out}, scale {list(scale)}"
        )
    todo = [
        ax
        for ax in _axis_order(n_in, n_out)
        if not (n_out[ax] == n_in[ax] and scale[ax] == 1.0 and shift[ax] == 0.0)
    ]

    def passes(y: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
        for ax in axes:
            y = _resample_axis(y, ax, n_out[ax], float(scale[ax]), float(shift[ax]), padding_mode)
        return y

    if img.dtype == dtype or len(n_in) < 2 or not todo:
        return passes(img.to(dtype), todo).to(torch.float32)
    # another dtype (e.g. int16 as stored): convert one slab at a time along the outermost axis in
    # memory, resample the other axes per slab, that axis last: no full-size converted copy
    s = max(range(len(n_in)), key=lambda a: (img.stride(a + 1), a))
    inner = [ax for ax in todo if ax != s]
    mid = [n_out[a] if a in inner else n_in[a] for a in range(len(n_in))]
    y = torch.empty((img.shape[0], *mid), dtype=dtype, device=img.device)
    per_slab = img.shape[0] * int(np.prod([n for a, n in enumerate(n_in) if a != s]))
    step = max(1, _SLAB_ELEMENTS // max(1, per_slab))
    for i0 in range(0, n_in[s], step):
        n = min(step, n_in[s] - i0)
        y.narrow(s + 1, i0, n).copy_(passes(img.narrow(s + 1, i0, n).to(dtype), inner))
    return passes(y, [s] if s in todo else []).to(torch.float32)


def separable_resample_to_labels(
    img: torch.Tensor,
    scale: Sequence[float],
    shift: Sequence[float],
    spatial_size: Sequence[int],
    rule: LabelRule,
    padding_mode: str = "border",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``rule(separable_linear_resample(img, ...))`` without the full-size scores: the other axes are
    resampled for a block of input planes along the last spatial axis at a time, then each output plane is
    the weighted sum of its two input planes, discretised at once. The labels are laid out with the first
    spatial axis fastest (NIfTI's voxel order: the writer needs no transposing copy)."""
    n_in = [int(s) for s in img.shape[1:]]
    n_out = [int(s) for s in spatial_size]
    if len(n_out) != len(n_in) or len(scale) != len(n_in) or len(shift) != len(n_in):
        raise ValueError(
            f"spatial rank mismatch: image {tuple(img.shape)}, size {n_out}, scale {list(scale)}"
        )
    rank, channels = len(n_in), int(img.shape[0])
    rev = [0, *range(rank, 0, -1)]  # (C, x, y, z) <-> (C, z, y, x)
    src = img.permute(rev)  # a view: planes along the last spatial axis come first
    out_rev = torch.empty((rule.channels(channels), *n_out[::-1]), dtype=rule.dtype, device=img.device)
    inner_scale, inner_shift = [1.0, *scale[:-1][::-1]], [0.0, *shift[:-1][::-1]]
    lo, hi, w_lo, w_hi = _axis_taps(n_in[-1], n_out[-1], float(scale[-1]), float(shift[-1]), padding_mode)
    plane = channels * int(np.prod(n_out[:-1]))
    ratio = max(1.0, n_out[-1] / max(1, n_in[-1]))  # output planes per input plane
    workers = torch.get_num_threads() if img.device.type == "cpu" else 1
    # output planes per block: their input planes (resampled in-plane at once) hold ~4 slabs' worth, and
    # on the CPU there are a few blocks per thread, run in parallel (each single-threaded)
    step = max(1, int(4 * _SLAB_ELEMENTS * ratio) // max(1, plane))
    if workers > 1:
        step = max(1, min(step, -(-n_out[-1] // (4 * workers))))

    def block(o0: int) -> None:
        o1 = min(o0 + step, n_out[-1])
        i0, i1 = int(lo[o0:o1].min()), int(hi[o0:o1].max()) + 1  # the input planes these outputs use
        planes = separable_linear_resample(
            src.narrow(1, i0, i1 - i0),
            inner_scale,
            inner_shift,
            [i1 - i0, *n_out[:-1][::-1]],
            padding_mode,
            dtype,
        )
        scores = torch.empty((channels, *n_out[:-1][::-1]), dtype=dtype, device=img.device)
        for o in range(o0, o1):
            a, b, wa, wb = planes[:, lo[o] - i0], planes[:, hi[o] - i0], float(w_lo[o]), float(w_hi[o])
            if wa + wb == 1.0:
                torch.lerp(a, b, wb, out=scores)
            else:  # a tap outside the image with zeros padding
                torch.mul(a, wa, out=scores).add_(b, alpha=wb)
            rule.write(scores, out_rev[:, o])

    starts = range(0, n_out[-1], step)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(block, starts))  # torch and NumPy release the GIL in these kernels
    else:
        for o0 in starts:
            block(o0)
    return out_rev.permute(rev)


def _axis_order(n_in: Sequence[int], n_out: Sequence[int]) -> list[int]:
    """Shrinking axes first: keeps the intermediate arrays small."""
    return sorted(range(len(n_in)), key=lambda a: n_out[a] / n_in[a])


def separable_is_cheaper(channels: int, n_in: Sequence[int], n_out: Sequence[int]) -> bool:
    """Whether :func:`separable_linear_resample` should beat ``grid_sample`` for this resize. It does for
    enlarging and moderate shrinking; ``grid_sample`` wins when the output is far smaller than the input
    (it only visits output voxels)."""
    shape, cost = [channels, *n_in], 0.0
    for ax in _axis_order(n_in, n_out):
        total = float(np.prod(shape))
        shape[ax + 1] = n_out[ax]
        pre, post = int(np.prod(shape[: ax + 1])), int(np.prod(shape[ax + 2 :]))
        dense = _dense(n_in[ax], pre, post)
        cost += total * n_out[ax] * _NS_MAC if dense else float(np.prod(shape)) * _NS_GATHER
    return cost < channels * float(np.prod(n_out)) * _NS_GRID


def _mode_name(mode: Any) -> Any:
    return mode.value if isinstance(mode, Enum) else mode


class SeparableResample(SpatialResample):
    """MONAI ``SpatialResample`` that resamples axis-aligned voxel maps with
    :func:`separable_linear_resample` (same arguments, values equal up to rounding, same metadata)."""

    def _plan(
        self,
        img: torch.Tensor,
        dst_affine: Any,
        spatial_size: Any,
        mode: Any,
        padding_mode: Any,
        align_corners: bool,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, np.ndarray, list[int]] | None:
        """(source affine, voxel map, output size) when the fast path applies, else ``None``. An integer
        input (e.g. int16 as stored) always takes the fast path, which converts it slab by slab to the
        floating ``dtype`` (``grid_sample`` would need a converted copy of the whole volume)."""
        if USE_COMPILED or isinstance(mode, int) or _mode_name(mode) != "bilinear":
            return None
        if _mode_name(padding_mode) not in ("border", "zeros") or not isinstance(img, MetaTensor):
            return None
        if img.pending_operations or not 1 <= img.ndim - 1 <= 3 or dst_affine is None:
            return None
        rank = img.ndim - 1
        in_size = [int(s) for s in img.shape[1:]]
        src = to_affine_nd(rank, img.affine).to(torch.float64)
        dst = convert_to_dst_type(to_affine_nd(rank, dst_affine), src)[0]
        if isinstance(spatial_size, int) and spatial_size == -1:
            size = in_size
        elif spatial_size is None:
            size = [int(s) for s in compute_shape_offset(in_size, src, dst)[0]]
        else:
            given = ensure_tuple(spatial_size)
            if len(given) != rank:
                return None
            size = [int(s) for s in fall_back_tuple(given, in_size, lambda x: x >= 0)]
        try:
            xform = np.linalg.solve(src.numpy(), dst.numpy())
        except np.linalg.LinAlgError:
            return None
        lin = xform[:rank, :rank]
        off = lin - np.diag(np.diag(lin))
        if np.any(np.abs(off) @ np.maximum(np.asarray(size) - 1, 0) > _POSITION_TOL):
            return None
        if size == in_size and (
            np.allclose(xform, np.eye(rank + 1), atol=_AFFINE_TOL)
            or np.allclose(src.numpy(), dst.numpy(), atol=_AFFINE_TOL)
        ):
            return None  # MONAI returns the image unresampled: let it
        if align_corners and 1 in (*in_size, *size):
            return None  # grid_sample's normalisation of unit-size axes is special-cased: keep MONAI's
        converts = dtype is not None and dtype.is_floating_point and not img.is_floating_point() and rank >= 2
        if not converts and not separable_is_cheaper(int(img.shape[0]), in_size, size):
            return None
        if img.is_floating_point() and not bool(torch.isfinite(img.as_tensor().sum())):
            return None  # NaN/inf: a matrix product spreads them along whole lines, grid_sample does not
        return src, xform, size

    def __call__(  # type: ignore[override]
        self,
        img: torch.Tensor,
        dst_affine: torch.Tensor | None = None,
        spatial_size: Sequence[int] | torch.Tensor | int | None = None,
        mode: str | int | None = None,
        padding_mode: str | None = None,
        align_corners: bool | None = None,
        dtype: DtypeLike = None,
        lazy: bool | None = None,
        labels: LabelRule | None = None,
    ) -> torch.Tensor:
        """MONAI's ``SpatialResample.__call__``; with ``labels``, when the fast path applies, the result is
        ``labels`` applied to the resampled image (computed slab by slab), else ``None``."""
        mode = self.mode if mode is None else mode
        padding_mode = self.padding_mode if padding_mode is None else padding_mode
        align_corners = self.align_corners if align_corners is None else align_corners
        lazy_ = self.lazy if lazy is None else lazy
        dtype_pt = get_equivalent_dtype(dtype or self.dtype or img.dtype, torch.Tensor)
        plan = None
        if not lazy_:
            plan = self._plan(
                img, dst_affine, spatial_size, mode, padding_mode, bool(align_corners), dtype_pt
            )
        if plan is None:
            if labels is not None:
                return None  # type: ignore[return-value]
            return super().__call__(
                img, dst_affine, spatial_size, mode, padding_mode, align_corners, dtype, lazy
            )  # fmt: skip
        src, xform, size = plan
        rank = len(size)
        extra_info = {  # what MONAI's spatial_resample records, so that inverse() and Invertd work alike
            "dtype": str(dtype_pt)[6:],
            "mode": _mode_name(mode),
            "padding_mode": _mode_name(padding_mode),
            "align_corners": align_corners if align_corners is not None else TraceKeys.NONE,
            "src_affine": src,
        }
        xform_t = torch.as_tensor(xform, dtype=torch.float64)
        meta_info = TraceableTransform.track_transform_meta(
            img,
            sp_size=torch.tensor(size),
            affine=xform_t,
            extra_info=extra_info,
            orig_size=img.peek_pending_shape(),
            transform_info=self.get_transform_info(),
            lazy=False,
        )
        args = (
            img.as_tensor(),
            [float(xform[a, a]) for a in range(rank)],
            [float(xform[a, rank]) for a in range(rank)],
            size,
        )
        if labels is not None:
            out = separable_resample_to_labels(*args, labels, _mode_name(padding_mode), dtype_pt)
        else:
            out = separable_linear_resample(*args, _mode_name(padding_mode), dtype_pt)
        out = convert_to_tensor(out, track_meta=get_track_meta())
        return out.copy_meta_from(meta_info) if isinstance(out, MetaTensor) else out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """MONAI's ``SpatialResample.inverse`` through this class's fast ``__call__``."""
        transform = self.pop_transform(data)
        kw_args = dict(transform[TraceKeys.EXTRA_INFO])
        kw_args["dtype"] = get_torch_dtype_from_string(kw_args["dtype"])
        kw_args["dst_affine"] = kw_args.pop("src_affine")
        kw_args["spatial_size"] = transform[TraceKeys.ORIG_SIZE]
        if kw_args.get("align_corners") == TraceKeys.NONE:
            kw_args["align_corners"] = False
        with self.trace_transform(False):
            # labels wanted, and only exact index maps left to invert: interpolate and discretise at once
            request = pending_label_request(data.applied_operations) if isinstance(data, MetaTensor) else None
            if request is not None:
                out = self.__call__(data, **kw_args, labels=request.rule)
                if out is not None:
                    request.done = True
                    return out
            return self.__call__(data, **kw_args)


def _separable(sp: SpatialResample) -> SeparableResample:
    return SeparableResample(
        mode=sp.mode,
        padding_mode=sp.padding_mode,
        align_corners=sp.align_corners,
        dtype=sp.dtype,
        lazy=sp.lazy,
    )


class SeparableSpacing(Spacing):
    """MONAI ``Spacing`` (same arguments and outputs) resampling through :class:`SeparableResample`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sp_resample = _separable(self.sp_resample)


class SeparableSpacingd(Spacingd):
    """Dictionary twin of :class:`SeparableSpacing`: MONAI ``Spacingd``, inverted alike by ``Invertd``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spacing_transform.sp_resample = _separable(self.spacing_transform.sp_resample)
