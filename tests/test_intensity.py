"""Tests of the intensity normalisation transforms (medseg.transforms.ZScoreNormalize(d), CTWindow(d))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from medseg.transforms import CT_WINDOWS, CTWindow, CTWindowd, ZScoreNormalize, ZScoreNormalized
from monai.data import MetaTensor
from monai.transforms import (
    LoadImaged,
    NormalizeIntensity,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)
from pydicom.data import get_testdata_file

CT3D = Path(__file__).resolve().parents[1] / "sample_data" / "ct_3d"


def _ct_small_hu() -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu[None].astype(np.float32)


def test_zscore_matches_monai_whole_and_nonzero() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(50, 20, (3, 20, 30)).astype(np.float32)
    img[:, :5] = 0
    for nonzero in (False, True):
        for cw in (True, False):
            ours = ZScoreNormalize(nonzero=nonzero, channel_wise=cw)(img)
            ref = NormalizeIntensity(nonzero=nonzero, channel_wise=cw)(img)
            torch.testing.assert_close(torch.as_tensor(ours), torch.as_tensor(ref), atol=1e-4, rtol=1e-4)


def test_zscore_over_mask_on_sample_ct() -> None:
    if not (CT3D / "datalist.json").is_file():
        pytest.skip("sample_data/ct_3d not generated")
    data = {"image": str(CT3D / "images/case_000.nii.gz"), "label": str(CT3D / "labels/case_000.nii.gz")}
    d = LoadImaged(["image", "label"], ensure_channel_first=True)(data)
    hu = d["image"].numpy().astype(np.float64)
    mask = d["label"].numpy() > 0
    assert 0 < mask.mean() < 0.5
    out = ZScoreNormalized("image", mask_key="label")(d)
    res = out["image"]
    assert isinstance(res, MetaTensor) and res.dtype == torch.float32
    torch.testing.assert_close(res.affine, d["image"].affine)
    r = res.numpy()
    inside = hu[mask]
    np.testing.assert_allclose(r[mask], (inside - inside.mean()) / inside.std(), atol=1e-4, rtol=1e-4)
    assert np.all(r[~mask] == 0)
    kept = ZScoreNormalized("image", mask_key="label", outside=None)(d)["image"].numpy()
    np.testing.assert_array_equal(kept[~mask], hu[~mask].astype(np.float32))
    with pytest.raises(KeyError, match="body"):
        ZScoreNormalized("image", mask_key="body")(d)


def test_zscore_constant_empty_and_integer_inputs_give_no_nan() -> None:
    const = torch.full((2, 8, 9), 7.0)
    out = ZScoreNormalize()(const)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(const))
    zeros = torch.zeros(1, 5, 5)
    assert torch.equal(ZScoreNormalize(nonzero=True)(zeros), zeros)
    img = torch.rand(1, 6, 6) + 1
    out = ZScoreNormalize()(img, mask=torch.zeros(1, 6, 6))  # empty region: unchanged
    assert torch.equal(out, img)
    single = torch.zeros(1, 4, 4)
    single[0, 1, 1] = 5.0
    out = ZScoreNormalize(nonzero=True)(single)
    assert torch.isfinite(out).all() and out.abs().max() == 0
    ints = torch.arange(12, dtype=torch.int16).reshape(1, 3, 4)
    out = ZScoreNormalize()(ints)
    assert out.dtype == torch.float32 and abs(float(out.mean())) < 1e-6
    with pytest.raises(ValueError, match="broadcast"):
        ZScoreNormalize()(torch.rand(1, 4, 4), mask=torch.ones(1, 5, 5))


def test_ct_window_on_real_ct_equals_monai_scale_range() -> None:
    hu = _ct_small_hu()
    assert hu.min() < -100 and hu.max() > 300  # CT_small spans several windows
    for name in ("abdomen", "bone", "lung"):
        c, w = CT_WINDOWS[name]
        ours = CTWindow(name)(hu)
        ref = ScaleIntensityRange(c - w / 2, c + w / 2, 0.0, 1.0, clip=True)(hu)
        torch.testing.assert_close(torch.as_tensor(ours), torch.as_tensor(ref), atol=1e-6, rtol=0)
        torch.testing.assert_close(CTWindow(center=c, width=w)(hu), ours)
        torch.testing.assert_close(CTWindow(a_min=c - w / 2, a_max=c + w / 2)(hu), ours)
        r = ours.numpy()
        assert r.min() >= 0.0 and r.max() <= 1.0
        assert (r[hu <= c - w / 2] == 0).all() and (r[hu >= c + w / 2] == 1).all()
        inside = (hu > c - w / 2) & (hu < c + w / 2)
        assert inside.any() and ((r[inside] > 0) & (r[inside] < 1)).all()


def test_ct_window_multi_window_dict_meta_and_dtypes() -> None:
    hu = _ct_small_hu()
    meta = MetaTensor(torch.from_numpy(hu.astype(np.int16)), meta={"k": "v"})
    out = CTWindowd("image", window=["brain", (400.0, 1800.0), "lung"])({"image": meta})["image"]
    assert isinstance(out, MetaTensor) and out.meta["k"] == "v"
    assert out.shape == (3, *hu.shape[1:]) and out.dtype == torch.float32
    torch.testing.assert_close(out[1:2], CTWindow("bone")(hu))
    const = CTWindow("brain")(torch.full((1, 4, 4), 40.0))
    assert torch.isfinite(const).all() and torch.allclose(const, torch.full_like(const, 0.5))
    assert CTWindow("brain")(torch.zeros(1, 2, 2, dtype=torch.float64)).dtype == torch.float64
    assert float(CTWindow("brain", clip=False)(torch.tensor([[200.0]]))) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="unknown CT window"):
        CTWindow("kidneyish")
    with pytest.raises(ValueError, match="exactly one"):
        CTWindow("brain", center=40.0, width=80.0)
    with pytest.raises(ValueError, match="positive width"):
        CTWindow(center=40.0, width=0.0)
    with pytest.raises(ValueError, match="together"):
        CTWindow(a_min=0.0)


def test_monai_percentile_scaling_as_recommended_is_nan_free() -> None:
    """The module defers percentile clipping + scaling to MONAI; guard the behaviour we rely on."""
    t = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True, channel_wise=True)
    hu = _ct_small_hu()
    out = torch.as_tensor(t(hu))
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    const = torch.as_tensor(t(np.full((2, 5, 5), 3.0, np.float32)))
    assert torch.isfinite(const).all()
