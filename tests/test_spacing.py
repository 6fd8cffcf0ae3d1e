"""Tests of medseg.transforms.SeparableSpacing(d): MONAI ``Spacing(d)`` with separable linear resampling.

The contract: on an axis-aligned voxel map it gives MONAI's values up to rounding with the same metadata
and the same ``Invertd`` inverse; every other case goes through MONAI's own code unchanged.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medseg.transforms import (
    SeparableResample,
    SeparableSpacing,
    SeparableSpacingd,
    separable_is_cheaper,
    separable_linear_resample,
)
from medseg.transforms import spacing as spacing_module
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    Spacing,
    Spacingd,
    SpatialResample,
)

CT = sorted((Path(__file__).resolve().parents[1] / "sample_data" / "ct_3d" / "images").glob("*.nii.gz"))
ANATOMICAL = Path(__import__("nibabel").__file__).parent / "tests" / "data" / "anatomical.nii"


# ----------------------------------------------------------------------------------------- helpers
def _load(path: Path, axcodes: str = "RAS") -> MetaTensor:
    t = Compose(
        [LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), Orientationd("image", axcodes)]
    )
    return t({"image": str(path)})["image"]


@pytest.fixture(scope="module")
def ct() -> MetaTensor:
    return _load(CT[0])


def _grid_sample_reference(
    img: torch.Tensor, scale: list[float], shift: list[float], size: list[int], padding_mode: str
) -> torch.Tensor:
    """``grid_sample`` (align_corners=True) at input voxel ``scale * i + shift`` per axis, float64."""
    n_in = img.shape[1:]
    axes = [
        torch.arange(n, dtype=torch.float64) * s + t for n, s, t in zip(size, scale, shift, strict=True)
    ]  # fmt: skip
    pos = torch.meshgrid(*axes, indexing="ij")
    norm = [2.0 * p / (n - 1) - 1.0 for p, n in zip(pos, n_in, strict=True)]
    grid = torch.stack(norm[::-1], dim=-1)[None]  # grid_sample wants (x, y[, z]) = reversed axes
    out = F.grid_sample(
        img[None].double(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True
    )  # fmt: skip
    return out[0]


def _same_ops(a: Any, b: Any, path: str = "") -> None:
    """Recursive equality of applied_operations / meta entries (tensors and arrays with allclose)."""
    if isinstance(a, (torch.Tensor, np.ndarray)) or isinstance(b, (torch.Tensor, np.ndarray)):
        ta, tb = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
        assert ta.shape == tb.shape, f"{path}: shape {ta.shape} != {tb.shape}"
        assert torch.allclose(ta, tb, rtol=1e-9, atol=1e-9), f"{path}: {ta} != {tb}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            if k == "id":  # the transform object's id(): differs between instances by design
                continue
            if k == "class":  # SeparableResample records itself where MONAI records SpatialResample
                assert {a[k], b[k]} <= {"SeparableResample", "SpatialResample"} or a[k] == b[k], (
                    f"{path}.class"
                )
                continue
            _same_ops(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_ops(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a is None and b is None), f"{path}: {a!r} != {b!r}"


def _assert_same_output(ours: MetaTensor, ref: MetaTensor, rtol: float) -> None:
    assert isinstance(ours, MetaTensor) and isinstance(ref, MetaTensor)
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype == torch.float32
    assert torch.allclose(ours.affine.double(), ref.affine.double(), rtol=0, atol=1e-9)
    if "pixdim" in ref.meta:
        np.testing.assert_allclose(np.asarray(ours.meta["pixdim"]), np.asarray(ref.meta["pixdim"]), atol=1e-9)
    scale = max(ref.abs().max().item(), 1.0)
    diff = (ours.as_tensor().double() - ref.as_tensor().double()).abs().max().item()
    assert diff <= rtol * scale, f"max |ours - MONAI| = {diff} > {rtol} * {scale}"
    _same_ops(ours.applied_operations, ref.applied_operations, "applied_operations")


@pytest.fixture
def no_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any use of the separable path an error: the test then proves MONAI's path ran."""

    def fail(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("separable_linear_resample ran where MONAI's path was expected")

    monkeypatch.setattr(spacing_module, "separable_linear_resample", fail)


@pytest.fixture
def fast_path_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Records the input shape of every call of the separable kernel (to prove the fast path ran)."""
    calls: list[tuple[int, ...]] = []
    real = spacing_module.separable_linear_resample

    def spy(img: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(tuple(img.shape))
        return real(img, *args, **kwargs)

    monkeypatch.setattr(spacing_module, "separable_linear_resample", spy)
    return calls


# ------------------------------------------------------------- 1. the kernel against grid_sample
@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
@pytest.mark.parametrize(
    ("in_shape", "out_shape"),
    [
        ((37, 210), (61, 150)),  # 2D; the 210-long axis (> 192) runs the gather branch, shrinking
        ((23, 17), (9, 40)),  # 2D, dense branch only
        ((11, 200, 9), (17, 260, 5)),  # 3D, gather branch enlarging, dense on the others
        ((13, 14, 15), (20, 9, 15)),
        ((70, 30, 20), (150, 25, 21)),  # 3D, first axis: banded dense blocks (lines of >= 256 voxels)
    ],
)
def test_kernel_matches_grid_sample(padding_mode: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    rng = np.random.default_rng(sum(in_shape) + len(padding_mode))
    img = torch.from_numpy(rng.normal(size=(2, *in_shape)))
    for trial in range(3):
        # random scale (some axes flipped) and shift reaching past both borders, so padding matters
        scale = [
            float(rng.uniform(0.3, 1.8) * (n - 1) / max(m - 1, 1) / 1.2 * (-1 if rng.random() < 0.4 else 1))
            for n, m in zip(in_shape, out_shape, strict=True)
        ]
        shift = [
            float(rng.uniform(-2.0, 2.0) + (n - 1 if s < 0 else 0))
            for n, s in zip(in_shape, scale, strict=True)
        ]
        if trial == 0:  # one exact identity axis: the kernel skips it
            scale[-1], shift[-1] = 1.0, 0.0
            out_shape = (*out_shape[:-1], in_shape[-1])
        got = separable_linear_resample(img, scale, shift, out_shape, padding_mode, torch.float64)
        assert got.dtype == torch.float32 and got.shape == (2, *out_shape)
        # the float32 return is rounding: compare the float64 computation itself through the axis helper
        y = img.clone()
        for ax in spacing_module._axis_order(list(in_shape), list(out_shape)):
            if not (out_shape[ax] == in_shape[ax] and scale[ax] == 1.0 and shift[ax] == 0.0):
                y = spacing_module._resample_axis(y, ax, out_shape[ax], scale[ax], shift[ax], padding_mode)
        ref = _grid_sample_reference(img, scale, shift, list(out_shape), padding_mode)
        assert y.dtype == torch.float64
        assert (y - ref).abs().max().item() < 1e-9
        assert (got.double() - ref).abs().max().item() < 1e-5  # float32 rounding of values ~N(0, 1)


def test_kernel_rejects_bad_arguments():
    img = torch.zeros(1, 4, 5)
    with pytest.raises(ValueError, match="padding_mode"):
        separable_linear_resample(img, [1, 1], [0, 0], [4, 5], "reflection")
    with pytest.raises(ValueError, match="rank"):
        separable_linear_resample(img, [1, 1, 1], [0, 0, 0], [4, 5, 6])


# -------------------------------------------------------------- 2. Spacingd on real CT vs MONAI
@pytest.mark.parametrize("pixdim", [(4.0, 4.0, 5.0), (2.0, 2.5, 3.0), (3.3, 1.7, 6.1)])
@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_spacingd_matches_monai_float64(
    ct: MetaTensor, fast_path_calls: list, pixdim, padding_mode: str, align_corners: bool
):
    kw = dict(
        keys="image", pixdim=pixdim, mode="bilinear", padding_mode=padding_mode, align_corners=align_corners
    )
    ours = SeparableSpacingd(**kw)({"image": ct.clone()})["image"]
    ref = Spacingd(**kw)({"image": ct.clone()})["image"]
    assert ours.shape != ct.shape and fast_path_calls == [tuple(ct.shape)]
    _assert_same_output(ours, ref, rtol=1e-6)


@pytest.mark.parametrize(("pixdim", "padding_mode", "align_corners"), [
    ((4.0, 4.0, 5.0), "border", False), ((1.9, 2.2, 3.0), "zeros", True),
])  # fmt: skip
def test_spacingd_matches_monai_float32(
    ct: MetaTensor, fast_path_calls: list, pixdim, padding_mode: str, align_corners: bool
):
    kw = dict(
        keys="image", pixdim=pixdim, padding_mode=padding_mode, align_corners=align_corners, dtype=np.float32
    )
    ours = SeparableSpacingd(**kw)({"image": ct.clone()})["image"]
    ref = Spacingd(**kw)({"image": ct.clone()})["image"]
    _assert_same_output(ours, ref, rtol=1e-4)
    assert ours.applied_operations[-1]["extra_info"]["dtype"] == "float32" and len(fast_path_calls) == 1


def test_flipped_axes_and_other_files_match_monai(fast_path_calls: list):
    """LPS orientation + ``diagonal=True``: the output grid is RAS, so x and y are flipped (negative scale);
    nibabel's anatomical.nii (a different scanner file, 2 mm, 33x41x25) alike."""
    img = _load(CT[1], "LPS")
    kw = dict(keys="image", pixdim=(2.0, 3.0, 2.5), diagonal=True, padding_mode="zeros")
    ours = SeparableSpacingd(**kw)({"image": img.clone()})["image"]
    ref = Spacingd(**kw)({"image": img.clone()})["image"]
    _assert_same_output(ours, ref, rtol=1e-6)
    assert torch.all(torch.diagonal(img.affine[:2, :2]) < 0)  # source x, y run against the output's
    assert torch.all(torch.diagonal(ours.affine[:3, :3]) > 0)

    ana = _load(ANATOMICAL)
    for pixdim in [(1.3, 1.0, 1.5), (3.0, 2.7, 2.2)]:
        ours = SeparableSpacing(pixdim=pixdim)(ana.clone())
        ref = Spacing(pixdim=pixdim)(ana.clone())
        _assert_same_output(ours, ref, rtol=1e-6)
    assert len(fast_path_calls) == 3


def test_array_transform_and_its_inverse_match_monai(ct: MetaTensor, fast_path_calls: list):
    ours_t, ref_t = SeparableSpacing(pixdim=(2.1, 2.4, 3.3)), Spacing(pixdim=(2.1, 2.4, 3.3))
    ours, ref = ours_t(ct.clone()), ref_t(ct.clone())
    _assert_same_output(ours, ref, rtol=1e-6)
    back, ref_back = ours_t.inverse(ours), ref_t.inverse(ref)
    _assert_same_output(back, ref_back, rtol=1e-6)
    assert back.shape == ct.shape and torch.allclose(back.affine, ct.affine, atol=1e-6)
    assert len(back.applied_operations) == len(ct.applied_operations)
    assert fast_path_calls == [tuple(ct.shape), tuple(ours.shape)]  # forward and inverse both fast


# --------------------------------------------------------------------------- 3. Invertd of a prediction
def _inverted_prediction(
    spacing_cls: type, path: Path, dtype: Any
) -> tuple[MetaTensor, MetaTensor, MetaTensor]:
    """Preprocess (orientation + spacing), make a 2-channel float32 prediction from the preprocessed image
    carrying its meta and applied_operations (as medseg's predict engine does), ``Invertd`` it."""
    pre = Compose([
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        Orientationd("image", "RAS"),
        spacing_cls("image", pixdim=(4.0, 4.0, 5.0), dtype=dtype),
    ])  # fmt: skip
    data = pre({"image": str(path)})
    image = data["image"]
    p = torch.sigmoid((image.as_tensor().float() - 40.0) / 200.0)
    pred = MetaTensor(torch.cat([1.0 - p, p]), meta=copy.deepcopy(dict(image.meta)))
    pred.applied_operations = copy.deepcopy(image.applied_operations)
    post = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)
    out = post({**data, "pred": pred})["pred"]
    return out, image, pred


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_invertd_matches_monai_and_restores_source_grid(fast_path_calls: list, dtype: Any):
    path = CT[2]
    source = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])(
        {"image": str(path)}
    )
    source = source["image"]
    ours, image, pred = _inverted_prediction(SeparableSpacingd, path, dtype)
    assert fast_path_calls[-1] == tuple(pred.shape)  # Invertd resampled the prediction on the fast path
    ref, ref_image, _ = _inverted_prediction(Spacingd, path, dtype)
    assert image.shape == ref_image.shape
    # the inverse runs the fast path: it enlarges a 2-channel volume back to the source grid
    assert separable_is_cheaper(2, list(pred.shape[1:]), list(source.shape[1:]))
    assert ours.shape == ref.shape == (2, *source.shape[1:])
    assert torch.allclose(ours.affine.double(), source.affine.double(), atol=1e-6)
    assert torch.allclose(ref.affine.double(), source.affine.double(), atol=1e-6)
    diff = (ours.as_tensor() - ref.as_tensor()).abs().max().item()
    assert diff <= (1e-6 if dtype is np.float64 else 1e-4)
    assert ours.applied_operations == [] and ref.applied_operations == []
    # probabilities stay probabilities and follow the anatomy of the source scan
    assert torch.allclose(ours.sum(0), torch.ones(source.shape[1:]), atol=1e-5)
    fg = ours[1] > 0.5
    assert 0 < fg.sum() < fg.numel() and source[0][fg].float().mean() > source[0][~fg].float().mean()


# ------------------------------------------------------------------------------ 4. fallbacks: MONAI exactly
def _rotated(img: torch.Tensor, degrees: float, spacing: tuple[float, ...]) -> MetaTensor:
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    aff = torch.eye(4, dtype=torch.float64)
    aff[:3, :3] = rot @ torch.diag(torch.tensor(spacing, dtype=torch.float64))
    aff[:3, 3] = torch.tensor([-120.0, 80.0, -30.0])
    return MetaTensor(img, affine=aff)


@pytest.mark.parametrize(
    "kw", [dict(mode="nearest"), dict(padding_mode="reflection"), dict(mode=1), dict(mode=3)], ids=str
)
def test_fallback_modes_equal_monai(ct: MetaTensor, no_fast_path: None, kw: dict):
    img = ct[:, ::2, ::2] if isinstance(kw.get("mode"), int) else ct  # keep scipy's spline paths quick
    ours = SeparableSpacingd("image", pixdim=(3.1, 3.4, 4.2), **kw)({"image": img.clone()})["image"]
    ref = Spacingd("image", pixdim=(3.1, 3.4, 4.2), **kw)({"image": img.clone()})["image"]
    assert torch.equal(ours.as_tensor(), ref.as_tensor())
    assert torch.equal(ours.affine, ref.affine)
    _same_ops(ours.applied_operations, ref.applied_operations)


def test_oblique_map_falls_back(ct: MetaTensor, no_fast_path: None):
    """Source rotated by 20 degrees, output on the world axes (``diagonal=True``): an oblique voxel map."""
    img = _rotated(ct.as_tensor()[:, :96, :96, :40], 20.0, (2.8, 2.8, 5.0))
    ours = SeparableSpacing(pixdim=(3.0, 3.0, 4.0), diagonal=True)(img.clone())
    ref = Spacing(pixdim=(3.0, 3.0, 4.0), diagonal=True)(img.clone())
    assert torch.equal(ours.as_tensor(), ref.as_tensor()) and torch.equal(ours.affine, ref.affine)


def test_rotated_source_keeping_its_axes_takes_fast_path(ct: MetaTensor):
    """The same rotated source with ``diagonal=False``: the output grid keeps the source's directions, so the
    voxel map is axis-aligned again and the separable path must (and does) match MONAI."""
    img = _rotated(ct.as_tensor()[:, :96, :96, :40], 20.0, (2.8, 2.8, 5.0))
    ours = SeparableSpacing(pixdim=(2.0, 2.2, 3.5), diagonal=False, padding_mode="zeros")(img.clone())
    ref = Spacing(pixdim=(2.0, 2.2, 3.5), diagonal=False, padding_mode="zeros")(img.clone())
    _assert_same_output(ours, ref, rtol=1e-6)
    # different arithmetic, so not bit-equal: proves the fast path ran
    assert not torch.equal(ours.as_tensor(), ref.as_tensor())


def test_strong_downsampling_falls_back(no_fast_path: None):
    rng = torch.Generator().manual_seed(0)
    img = MetaTensor(
        torch.rand(1, 512, 512, 64, generator=rng) * 1000,
        affine=torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0], dtype=torch.float64)),
    )
    ours = SeparableSpacing(pixdim=(8.0, 8.0, 8.0))(img)
    ref = Spacing(pixdim=(8.0, 8.0, 8.0))(img)
    assert not separable_is_cheaper(1, list(img.shape[1:]), list(ref.shape[1:]))
    assert torch.equal(ours.as_tensor(), ref.as_tensor()) and torch.equal(ours.affine, ref.affine)


def test_unchanged_grid_falls_back(ct: MetaTensor, no_fast_path: None):
    """Target spacing equal to the source's: MONAI returns the image unresampled, and so must we."""
    pixdim = [float(x) for x in ct.pixdim]
    ours = SeparableSpacing(pixdim=pixdim)(ct.clone())
    ref = Spacing(pixdim=pixdim)(ct.clone())
    assert torch.equal(ours.as_tensor(), ref.as_tensor()) and torch.equal(ours.affine, ref.affine)


# ------------------------------------------------------------------------------------------ 5. lazy mode
def test_lazy_compose_equals_monai(ct: MetaTensor, no_fast_path: None):
    def run(cls: type) -> MetaTensor:
        t = Compose([Orientationd("image", "LPS"), cls("image", pixdim=(2.3, 3.1, 4.4))], lazy=True)
        return t({"image": ct.clone()})["image"]

    ours, ref = run(SeparableSpacingd), run(Spacingd)
    assert torch.equal(ours.as_tensor(), ref.as_tensor()) and torch.equal(ours.affine, ref.affine)
    _same_ops(ours.applied_operations, ref.applied_operations)


# ------------------------------ fall back to MONAI: size-1 axes with align_corners, tiny spacings, NaN/inf
@pytest.mark.parametrize("case", ["output depth 1", "input depth 1, zeros"])
def test_size_one_axis_align_corners_matches_monai(case: str):
    if case == "output depth 1":
        img = MetaTensor(
            torch.arange(4.0).view(1, 1, 1, 4).expand(1, 3, 3, 4).contiguous(), affine=torch.eye(4)
        )
        dst, size, pad = torch.eye(4, dtype=torch.float64), (3, 3, 1), "border"
        dst[2, 3] = 1.5
    else:
        img = MetaTensor(torch.full((1, 3, 3, 1), 10.0), affine=torch.eye(4))
        dst, size, pad = (
            torch.diag(torch.tensor([1.0, 1.0, 0.5, 1.0], dtype=torch.float64)),
            (3, 3, 3),
            "zeros",
        )
    ours = SeparableResample(padding_mode=pad, align_corners=True)(
        img.clone(), dst_affine=dst, spatial_size=size
    )
    ref = SpatialResample(padding_mode=pad, align_corners=True)(
        img.clone(), dst_affine=dst, spatial_size=size
    )
    assert torch.allclose(ours.as_tensor(), ref.as_tensor(), atol=1e-5)


def test_tiny_spacing_unchanged_like_monai():
    img = MetaTensor(torch.rand(1, 20, 20, 20), affine=torch.diag(torch.tensor([1e-4, 1e-4, 1e-4, 1.0])))
    dst = torch.diag(torch.tensor([2e-4, 2e-4, 2e-4, 1.0], dtype=torch.float64))
    ours = SeparableResample()(img.clone(), dst_affine=dst, spatial_size=(20, 20, 20))
    ref = SpatialResample()(img.clone(), dst_affine=dst, spatial_size=(20, 20, 20))
    assert torch.equal(ours.affine, ref.affine) and torch.allclose(ours.as_tensor(), ref.as_tensor())


def test_non_finite_voxel_stays_local_like_monai(ct: MetaTensor):
    img = ct[:, :64, :64, :24].clone()
    img[0, 30, 30, 10] = float("nan")
    img[0, 5, 50, 3] = float("inf")
    ours = SeparableSpacing(pixdim=(2.0, 2.0, 3.0))(img.clone())
    ref = Spacing(pixdim=(2.0, 2.0, 3.0))(img.clone())
    assert 0 < int((~ref.isfinite()).sum()) < 100
    assert torch.equal(ours.isfinite(), ref.isfinite())


# --------------------------------------------------------------------------------------------- 6. CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_fast_path_matches_cpu(ct: MetaTensor, dtype: Any):
    kw = dict(keys="image", pixdim=(1.7, 2.2, 3.1), padding_mode="zeros", dtype=dtype)
    cpu = SeparableSpacingd(**kw)({"image": ct.clone()})["image"]
    gpu = SeparableSpacingd(**kw)({"image": ct.clone().to("cuda")})["image"]
    assert gpu.device.type == "cuda" and isinstance(gpu, MetaTensor)
    assert gpu.shape == cpu.shape and torch.allclose(gpu.affine.cpu(), cpu.affine)
    scale = max(cpu.abs().max().item(), 1.0)
    tol = 1e-6 if dtype is np.float64 else 1e-4  # TF32 matmuls would exceed this: the path must not use them
    assert (gpu.cpu().as_tensor() - cpu.as_tensor()).abs().max().item() <= tol * scale
    ref = Spacingd(**kw)({"image": ct.clone().to("cuda")})["image"]
    _assert_same_output(gpu.cpu(), ref.cpu(), rtol=tol)
