"""Elastic deformation of the U-Net paper (Ronneberger et al. 2015, Sec. 3.1), as MONAI transforms.

Random displacement vectors on a coarse control grid (3 points per axis in the paper), drawn from a
Gaussian with a standard deviation given in pixels (10 px in the paper), are interpolated to a dense
displacement field by a separable cubic spline and the image is resampled along it. The dense field is
built with a few tiny matrix products per axis (one interpolation matrix per axis, cached), so its cost
is one GEMM pass over the output grid; it is computed once per call and shared by all keys, each key being
resampled by one ``torch.nn.functional.grid_sample`` call. In 3D the reflection/border padding is folded
into the grid once (torch's 3D sampler would redo it per key and voxel in scalar code). Everything runs with
torch ops on the data's device (CPU or CUDA).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data.meta_obj import get_track_meta
from monai.data.meta_tensor import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple_rep
from scipy.interpolate import CubicSpline

__all__ = [
    "RandElasticGrid",
    "RandElasticGridd",
    "RandElasticGridD",
    "RandElasticGridDict",
    "elastic_grid",
]

_MODES = ("bilinear", "bicubic", "nearest")
_PADDING_MODES = ("reflection", "border", "zeros")


@functools.lru_cache(maxsize=128)
def _interp_matrix_np(size: int, points: int) -> np.ndarray:
    """Matrix ``(size, points)`` mapping values at ``points`` equally spaced control points (the first on
    pixel 0, the last on pixel ``size - 1``) to every pixel by natural cubic spline interpolation.

    The spline interpolates (its value at a control point is the drawn one) and reproduces constant and
    linear functions, so every row sums to 1.
    """
    if size == 1:
        return np.full((1, points), 1.0 / points)
    knots = np.linspace(0.0, size - 1.0, points)
    if points == 2:
        w = np.arange(size) / (size - 1.0)
        return np.stack([1.0 - w, w], axis=1)
    spline = CubicSpline(knots, np.eye(points), axis=0, bc_type="natural")
    return spline(np.arange(size, dtype=np.float64))


@functools.lru_cache(maxsize=128)
def _lebesgue(size: int, points: int) -> float:
    """Largest factor by which the interpolation can amplify the control values (max row sum of |M|)."""
    return float(np.abs(_interp_matrix_np(size, points)).sum(1).max())


@functools.lru_cache(maxsize=128)
def _interp_matrix(size: int, points: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(_interp_matrix_np(size, points), dtype=dtype, device=device)


@functools.lru_cache(maxsize=128)
def _final_matrix(size: int, points: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Interpolation matrix of the first spatial axis with one extra column: that axis' identity grid."""
    m = np.concatenate([_interp_matrix_np(size, points), np.linspace(-1.0, 1.0, size)[:, None]], axis=1)
    return torch.as_tensor(m, dtype=dtype, device=device)


def elastic_grid(
    displacement: torch.Tensor,
    spatial_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    padding_mode: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampling grid for ``grid_sample`` (``align_corners=True``) of an elastic deformation.

    Args:
        displacement: control-point displacements in pixels, shape ``(ndim, p_0, ..., p_{ndim-1})``;
            component ``a`` moves along spatial axis ``a``; the control points of axis ``a`` are ``p_a``
            equally spaced points from the first to the last pixel.
        spatial_shape: output spatial shape ``(S_0, ..., S_{ndim-1})``.
        dtype: floating dtype of the grid.
        padding_mode: ``"reflection"`` folds the coordinates back into the image (mirroring about the
            first/last pixel centre, periodically as ``grid_sample`` does), ``"border"`` clamps
            them; the grid can then be sampled with ``padding_mode="border"``, which is much cheaper than
            ``grid_sample``'s own reflection (done per key and per voxel). ``None``/``"zeros"``: unchanged.
        out: optional preallocated ``(1, *spatial_shape, ndim)`` tensor to write into.

    Returns:
        ``(1, S_0, ..., S_{ndim-1}, ndim)`` grid in normalised coordinates, last axis ordered
        ``(x, y[, z])`` = reversed spatial axes as ``grid_sample`` expects: identity + dense displacement,
        the dense displacement being the separable natural cubic spline through the control values.
    """
    nd = len(spatial_shape)
    if displacement.ndim != nd + 1 or displacement.shape[0] != nd:
        raise ValueError(
            f"displacement must have shape (ndim, *points) with ndim={nd}, got {tuple(displacement.shape)}."
        )
    device = displacement.device
    shape = [int(s) for s in spatial_shape]
    points = list(displacement.shape[1:])
    # pixels -> normalised units, components reordered to grid_sample's (x, y, z)
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], dtype=dtype, device=device)
    t = displacement.to(dtype) * scale.view(-1, *([1] * nd))
    t = torch.flip(torch.movedim(t, 0, -1), dims=(-1,))  # (p_0, ..., p_{nd-1}, nd)
    # Reflection about the first/last pixel centres (-1 and +1 with align_corners=True) is folded into the
    # grid in place: a few cheap passes instead of grid_sample's reflection, redone per key and per voxel.
    # If no displacement can reach past a whole image width (bound: max |control value| times the
    # interpolation's Lebesgue constants), one fold at each end suffices: 1 - ||g + 1| - 2|; otherwise the
    # periodic form |((g + 3) mod 4) - 2| - 1. The constant is added here, to the tiny control tensor (every
    # interpolation row sums to one, so it becomes a constant in the field).
    periodic = False
    if padding_mode == "reflection":
        lebesgue = math.prod(_lebesgue(n, p) for n, p in zip(shape, points, strict=True))
        reach = displacement.detach().abs().amax(dim=tuple(range(1, nd + 1))).cpu().double() * lebesgue
        periodic = bool((reach >= torch.tensor([max(n - 1, 1) for n in shape], dtype=torch.float64)).any())
        t = t + (3.0 if periodic else 1.0)
    # contract the control axes from the last to the second: tiny tensors
    for a in range(nd - 1, 0, -1):
        m = _interp_matrix(shape[a], points[a], device, dtype)
        t = torch.movedim(torch.tensordot(m, t, dims=([1], [a])), 0, a)
        # identity grid of axis a; adding it before interpolating the remaining axes is exact because
        # their interpolation rows sum to one
        ident = torch.linspace(-1.0, 1.0, shape[a], dtype=dtype, device=device)
        t[..., nd - 1 - a] += ident.view(*([1] * a), shape[a], *([1] * (nd - 1 - a)))
    # last contraction (axis 0) is the only one that touches the full output: one GEMM whose extra
    # row/column adds the identity grid of axis 0 to its component
    rest = t.shape[1:]
    t = t.reshape(points[0], -1)
    extra = torch.zeros(1, t.shape[1], dtype=dtype, device=device)
    extra.view(-1, nd)[:, nd - 1] = 1.0
    m0 = _final_matrix(shape[0], points[0], device, dtype)
    t = torch.cat([t, extra], dim=0)
    if out is None:
        grid = torch.mm(m0, t).view(1, shape[0], *rest)
    else:
        grid = out
        torch.mm(m0, t, out=out.view(shape[0], -1))
    if padding_mode == "reflection":
        if periodic:
            grid.remainder_(4.0).sub_(2.0).abs_().sub_(1.0)
        else:
            # 1 - x as one pass: x + 2 * (0.5 - x)
            grid.abs_().sub_(2.0).abs_().lerp_(torch.tensor(0.5, dtype=dtype, device=device), 2.0)
    elif padding_mode == "border":
        grid.clamp_(-1.0, 1.0)
    return grid


def _num_points(
    spatial_shape: Sequence[int], num_points: int | Sequence[int], spacing: float | Sequence[float] | None
) -> tuple[int, ...]:
    nd = len(spatial_shape)
    if spacing is not None:
        sp = ensure_tuple_rep(spacing, nd)
        if any(s <= 0 for s in sp):
            raise ValueError(f"spacing must be positive, got {spacing}.")
        return tuple(max(2, math.ceil((n - 1) / s) + 1) for n, s in zip(spatial_shape, sp, strict=True))
    pts = tuple(int(p) for p in ensure_tuple_rep(num_points, nd))
    if any(p < 2 for p in pts):
        raise ValueError(f"num_points must be >= 2 per axis, got {num_points}.")
    return pts


def _check_mode(mode: str, nd: int) -> str:
    mode = str(getattr(mode, "value", mode)).lower()
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if mode == "bicubic" and nd != 2:
        raise ValueError(
            "mode='bicubic' is only available for 2D images (torch grid_sample); use 'bilinear'."
        )
    return mode


def _check_padding(padding_mode: str) -> str:
    padding_mode = str(getattr(padding_mode, "value", padding_mode)).lower()
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}.")
    return padding_mode


_WORKSPACE = threading.local()


def _workspace(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: int
) -> torch.Tensor | None:
    """Per-thread reusable grid buffer on CPU: a fresh multi-MB tensor costs page faults on every call
    (about as much as building the grid); CUDA's caching allocator already avoids that."""
    if device.type != "cpu":
        return None
    bufs: dict = getattr(_WORKSPACE, "bufs", None) or {}
    key = (shape, dtype, slot)
    buf = bufs.get(key)
    if buf is None:
        if len(bufs) >= 4:
            bufs.clear()
        buf = bufs[key] = torch.empty(shape, dtype=dtype, device=device)
        _WORKSPACE.bufs = bufs
    return buf


def _folds(nd: int, padding_mode: str) -> bool:
    """Whether to fold the padding into the grid: torch's 3D sampler computes reflection/border per key and
    per voxel in scalar code (about as costly as the interpolation), its 2D sampler in vectorised code
    (cheaper than extra passes over the grid)."""
    return nd == 3 and padding_mode != "zeros"


def _warp(img: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """Resample a channel-first tensor ``(C, *spatial)`` along a grid made by :func:`elastic_grid` (with
    the padding folded in when :func:`_folds`); dtype kept where it can be (nearest), float otherwise."""
    src = img if img.dtype == grid.dtype else img.to(grid.dtype)
    # folded reflection/border: "border" only guards against rounding at the edges
    pad = "border" if _folds(img.ndim - 1, padding_mode) else padding_mode
    out = F.grid_sample(src.unsqueeze(0), grid, mode=mode, padding_mode=pad, align_corners=True)[0]
    if mode == "nearest" or img.dtype.is_floating_point:
        out = out.to(img.dtype)
    return out


def _as_raw(img: NdarrayOrTensor) -> torch.Tensor:
    """Plain tensor of the input, without copying (an intermediate MetaTensor costs about as much as a 2D
    warp)."""
    return img.as_tensor() if isinstance(img, MetaTensor) else convert_to_tensor(img, track_meta=False)


def _wrap(out: torch.Tensor, src: NdarrayOrTensor) -> torch.Tensor:
    """MONAI's output convention: the input's metadata on a MetaTensor input, a MetaTensor when tracking."""
    if isinstance(src, MetaTensor):
        return convert_to_dst_type(out, dst=src, dtype=out.dtype)[0]
    return MetaTensor(out) if get_track_meta() else out


def _compute_dtype(img: torch.Tensor, default: torch.dtype) -> torch.dtype:
    return torch.float64 if img.dtype == torch.float64 else default


class RandElasticGrid(RandomizableTransform):
    """Random elastic deformation of the U-Net paper (Sec. 3.1) for channel-first 2D/3D images.

    Displacements on a coarse grid of control points (``num_points`` per axis, or one every ``spacing``
    pixels as in the authors' tool) are drawn i.i.d. from N(0, ``sigma``^2) in pixels per axis, interpolated
    to every pixel by a natural cubic spline (exact at the control points) and the image is resampled with
    ``grid_sample`` (``align_corners=True``). Runs on the image's device.

    Args:
        sigma: standard deviation of the control-point displacements in pixels (per axis or one value);
            0 leaves the image unchanged.
        num_points: control points per spatial axis, the first on the first pixel and the last on the last
            (>= 2; the paper uses 3).
        spacing: alternatively the largest distance between control points in pixels (the authors' tool
            uses 150); overrides ``num_points`` when given.
        prob: probability of applying the transform.
        mode: ``"bilinear"``, ``"bicubic"`` (2D only) or ``"nearest"`` (labels: keeps the values).
        padding_mode: ``"reflection"`` (mirroring, default), ``"border"`` or ``"zeros"`` (the latter brings
            the value 0 into a label that may not contain it).
        dtype: computation dtype of the grid (``torch.float64`` inputs are always warped in float64).

    The output is a torch tensor (a ``MetaTensor`` with the input's metadata when meta tracking is on);
    nearest mode keeps the input dtype, the other modes return a floating tensor. Not invertible (train
    time augmentation, as MONAI's ``Rand2DElastic``).
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        sigma: float | Sequence[float] = 10.0,
        num_points: int | Sequence[int] = 3,
        spacing: float | Sequence[float] | None = None,
        prob: float = 1.0,
        mode: str = "bilinear",
        padding_mode: str = "reflection",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        sig = tuple(float(s) for s in np.atleast_1d(np.asarray(sigma, dtype=np.float64)).ravel())
        if not sig or any(s < 0 or not math.isfinite(s) for s in sig):
            raise ValueError(f"sigma must be finite and >= 0, got {sigma}.")
        self.sigma = sig
        self.num_points = num_points
        self.spacing = spacing
        self.mode = _check_mode(mode, 2)
        self.padding_mode = _check_padding(padding_mode)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
        self.dtype = dtype
        if spacing is None and min(np.atleast_1d(np.asarray(num_points))) < 2:
            raise ValueError(f"num_points must be >= 2 per axis, got {num_points}.")
        if spacing is not None and min(np.atleast_1d(np.asarray(spacing, dtype=float))) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing}.")
        self.displacement: np.ndarray | None = None

    def _sigmas(self, nd: int) -> tuple[float, ...]:
        if len(self.sigma) not in (1, nd):
            raise ValueError(f"sigma must have 1 or {nd} values for a {nd}D image, got {self.sigma}.")
        return ensure_tuple_rep(self.sigma[0], nd) if len(self.sigma) == 1 else self.sigma

    def randomize(self, spatial_shape: Sequence[int]) -> None:  # type: ignore[override]
        """Draw whether to apply the transform and the control-point displacements (pixels) for an image
        of ``spatial_shape``; they are kept in ``self.displacement``, shape ``(ndim, *num_points)``."""
        super().randomize(None)
        if not self._do_transform:
            self.displacement = None
            return
        nd = len(spatial_shape)
        pts = _num_points(spatial_shape, self.num_points, self.spacing)
        sig = np.asarray(self._sigmas(nd), dtype=np.float64).reshape(nd, *([1] * nd))
        self.displacement = self.R.standard_normal(size=(nd, *pts)) * sig

    def grid(
        self,
        spatial_shape: Sequence[int],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        padding_mode: str | None = None,
        _slot: int | None = None,
    ) -> torch.Tensor | None:
        """Sampling grid (``grid_sample`` convention, ``align_corners=True``) of the last draw, ``None``
        when there is nothing to do (not drawn, or all displacements zero)."""
        if self.displacement is None or not np.any(self.displacement):
            return None
        dtype = dtype or self.dtype
        device = torch.device(device or "cpu")
        disp = torch.as_tensor(self.displacement, dtype=torch.float64).to(device=device, non_blocking=True)
        shape = (1, *(int(s) for s in spatial_shape), len(spatial_shape))
        out = None if _slot is None else _workspace(shape, dtype, device, _slot)
        return elastic_grid(disp, spatial_shape, dtype, padding_mode=padding_mode, out=out)

    def __call__(  # type: ignore[override]
        self,
        img: NdarrayOrTensor,
        mode: str | None = None,
        padding_mode: str | None = None,
        randomize: bool = True,
    ) -> torch.Tensor:
        """Warp ``img`` (channel-first ``(C, H, W)`` or ``(C, D, H, W)``)."""
        img_t = _as_raw(img)
        spatial = tuple(img_t.shape[1:])
        if len(spatial) not in (2, 3):
            raise ValueError(f"expected a channel-first 2D or 3D image, got shape {tuple(img_t.shape)}.")
        if randomize:
            self.randomize(spatial)
        mode_ = _check_mode(mode or self.mode, len(spatial))
        pad_ = _check_padding(padding_mode or self.padding_mode)
        fold = pad_ if _folds(len(spatial), pad_) else None
        grid = self.grid(spatial, img_t.device, _compute_dtype(img_t, self.dtype), fold, _slot=0)
        if grid is None:
            return convert_to_tensor(img, track_meta=get_track_meta())
        return _wrap(_warp(img_t, grid, mode_, pad_), img)


class RandElasticGridd(RandomizableTransform, MapTransform):
    """Dictionary twin of :class:`RandElasticGrid`: every key is warped by the SAME random field.

    Args:
        keys: keys to warp (channel-first arrays with the same spatial shape).
        sigma, num_points, spacing, prob, dtype: as :class:`RandElasticGrid`.
        mode: per key or one for all, e.g. ``("bilinear", "nearest")`` for image and label.
        padding_mode: per key or one for all (``"reflection"`` by default).
        allow_missing_keys: do not raise for missing keys.
    """

    backend = RandElasticGrid.backend

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float | Sequence[float] = 10.0,
        num_points: int | Sequence[int] = 3,
        spacing: float | Sequence[float] | None = None,
        prob: float = 1.0,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "reflection",
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.elastic = RandElasticGrid(
            sigma=sigma, num_points=num_points, spacing=spacing, prob=1.0, dtype=dtype
        )
        self.mode = tuple(_check_mode(m, 2) for m in ensure_tuple_rep(mode, len(self.keys)))
        self.padding_mode = tuple(_check_padding(p) for p in ensure_tuple_rep(padding_mode, len(self.keys)))

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandElasticGridd:
        self.elastic.set_random_state(seed, state)
        super().set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        first_key = self.first_key(d)
        if first_key == ():
            return d
        self.randomize(None)
        tensors = {key: _as_raw(d[key]) for key in self.key_iterator(d)}
        spatial = tuple(tensors[first_key].shape[1:])
        for key, img in tensors.items():
            if len(img.shape) - 1 not in (2, 3):
                raise ValueError(
                    f"key {key!r}: expected a channel-first 2D or 3D image, got {tuple(img.shape)}."
                )
            if tuple(img.shape[1:]) != spatial:
                raise ValueError(
                    f"key {key!r}: spatial shape {tuple(img.shape[1:])} != {spatial} of key {first_key!r}."
                )
        if not self._do_transform:
            for key in tensors:
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
            return d
        self.elastic.randomize(spatial)
        grids: dict[tuple, torch.Tensor | None] = {}  # one field for all keys; one folded grid per padding
        for key, mode, pad in self.key_iterator(d, self.mode, self.padding_mode):
            img = tensors[key]
            gkey = (
                _compute_dtype(img, self.elastic.dtype),
                img.device,
                pad if _folds(len(spatial), pad) else None,
            )
            if gkey not in grids:
                grids[gkey] = self.elastic.grid(spatial, img.device, gkey[0], gkey[2], _slot=len(grids))
            grid = grids[gkey]
            if grid is None:
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
                continue
            d[key] = _wrap(_warp(img, grid, _check_mode(mode, len(spatial)), pad), d[key])
        return d


RandElasticGridD = RandElasticGridDict = RandElasticGridd
