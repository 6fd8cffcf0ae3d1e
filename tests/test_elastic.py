"""Tests of the paper's elastic deformation (medseg.transforms.RandElasticGrid / RandElasticGridd)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medseg.transforms import RandElasticGrid, RandElasticGridd, elastic_grid
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, LoadImaged
from monai.utils import set_determinism
from scipy import ndimage

NUCLEI = Path(__file__).resolve().parents[1] / "sample_data" / "nuclei_2d"


def _ramps(shape: tuple[int, ...]) -> torch.Tensor:
    """Channel c holds the pixel index along spatial axis c (float64): a warp of it reads its displacement."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))


def _measured_displacements(shape: tuple[int, ...], sigma, num_points: int, draws: int, seed: int):
    """Warp the coordinate ramps ``draws`` times; return (measured, drawn) displacements at the interior
    control points, each ``(draws, ndim, n_interior_points)``."""
    t = RandElasticGrid(sigma=sigma, num_points=num_points, padding_mode="border").set_random_state(seed)
    ramps = _ramps(shape)
    step = [(n - 1) // (num_points - 1) for n in shape]
    idx = tuple(slice(s, n - 1, s) for s, n in zip(step, shape, strict=True))  # interior control points
    measured, drawn = [], []
    for _ in range(draws):
        out = t(ramps)
        measured.append((out - ramps)[(slice(None), *idx)].reshape(len(shape), -1))
        drawn.append(
            torch.as_tensor(t.displacement)[(slice(None), *[slice(1, -1)] * len(shape))].reshape(
                len(shape), -1
            )
        )
    return torch.stack(measured), torch.stack(drawn)


@pytest.mark.parametrize(
    ("shape", "sigma", "num_points", "draws"),
    # interior control points lie >= 5 sigma from the border, so the border never clips what is measured
    [((65, 65), 3.0, 5, 300), ((65, 97), (2.0, 4.5), 5, 300), ((21, 21, 21), (1.0, 0.8, 0.6), 5, 100)],
)
def test_control_point_displacement_has_requested_std(shape, sigma, num_points, draws) -> None:
    measured, drawn = _measured_displacements(shape, sigma, num_points, draws, seed=123)
    # the dense field passes through the drawn control values, component a along spatial axis a (pixels)
    torch.testing.assert_close(measured, drawn, atol=1e-6, rtol=0)
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (len(shape),))
    std = measured.transpose(0, 1).reshape(len(shape), -1).std(dim=1).numpy()
    np.testing.assert_allclose(std, sig, rtol=0.05)
    assert abs(float(measured.mean())) < 0.1 * sig.max()


def test_sigma_zero_is_identity_and_tiny_sigma_samples_in_place() -> None:
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.normal(size=(2, 40, 50)).astype(np.float32))
    lab = torch.from_numpy(rng.integers(0, 5, size=(1, 40, 50)))
    out = RandElasticGridd(["img", "lab"], sigma=0.0, mode=("bilinear", "nearest"))({"img": img, "lab": lab})
    assert torch.equal(out["img"], img) and torch.equal(out["lab"], lab)
    # the resampling path itself with an (almost) zero field: no half-pixel shift, labels exact
    t = RandElasticGridd(["img", "lab"], sigma=1e-6, mode=("bilinear", "nearest")).set_random_state(0)
    out = t({"img": img, "lab": lab})
    torch.testing.assert_close(out["img"], img, atol=1e-4, rtol=0)
    assert torch.equal(out["lab"], lab)
    img3 = torch.rand(1, 9, 10, 11, dtype=torch.float64)
    out3 = RandElasticGrid(sigma=1e-9, padding_mode="zeros").set_random_state(0)(img3)
    assert out3.dtype == torch.float64
    torch.testing.assert_close(out3, img3, atol=1e-6, rtol=0)


def _shapes_label(shape: tuple[int, ...]) -> np.ndarray:
    """Label 0/1/2 with a disk (ball) and a box, plus thin structures that a misaligned warp would move."""
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    lab = np.zeros(shape, np.int64)
    lab[sum((g - n * 0.35) ** 2 for g, n in zip(grids, shape, strict=True)) < (min(shape) * 0.2) ** 2] = 1
    box = tuple(slice(int(n * 0.6), int(n * 0.85)) for n in shape)
    lab[box] = 2
    lab[(slice(None),) * (len(shape) - 1) + (slice(int(shape[-1] * 0.1), int(shape[-1] * 0.1) + 2),)] = 1
    return lab


@pytest.mark.parametrize("shape", [(96, 120), (40, 44, 48)])
@pytest.mark.parametrize("padding_mode", ["reflection", "border", "zeros"])
def test_image_and_label_stay_aligned(shape, padding_mode) -> None:
    lab = _shapes_label(shape)
    fg = (lab > 0).astype(np.float32)[None]
    data = {"img": fg, "img_nn": fg.copy(), "lab": lab[None]}
    t = RandElasticGridd(
        ["img", "img_nn", "lab"],
        sigma=6.0,
        mode=("bilinear", "nearest", "nearest"),
        padding_mode=padding_mode,
    ).set_random_state(7)
    out = t(data)
    warped_fg = out["lab"][0].numpy() > 0
    assert (warped_fg != (lab > 0)).mean() > 0.01  # it did deform
    # same field for every key: nearest warps of equal arrays are equal
    np.testing.assert_array_equal(out["img_nn"][0].numpy() > 0.5, warped_fg)
    # bilinear > 0.5 vs nearest may differ only where a pixel's sample point sits within one pixel of a
    # label border (the 2x2 neighbourhood is mixed); the field is smooth, so such pixels lie next to the
    # warped border: any disagreement must touch a pixel of the other class
    disagree = (out["img"][0].numpy() > 0.5) != warped_fg
    near_border = ndimage.binary_dilation(warped_fg) & ndimage.binary_dilation(~warped_fg)
    assert not (disagree & ~near_border).any()
    assert disagree.sum() <= 0.25 * near_border.sum()


def test_labels_keep_their_values_and_dtype_on_sample_nuclei() -> None:
    if not (NUCLEI / "datalist.json").is_file():
        pytest.skip("sample_data/nuclei_2d not generated")
    item = json.loads((NUCLEI / "datalist.json").read_text())
    item = (
        (item.get("training") or item.get("train") or next(iter(item.values())))[0]
        if isinstance(item, dict)
        else item[0]
    )
    data = {k: str(NUCLEI / item[k]) for k in ("image", "label")}
    load = LoadImaged(["image", "label"], ensure_channel_first=True)
    d = load(data)
    lab_in = d["label"].clone().long()
    d["label"] = lab_in
    pipeline = Compose([RandElasticGridd(["image", "label"], sigma=10.0, mode=("bilinear", "nearest"))])
    pipeline.set_random_state(3)
    out = pipeline(d)
    assert isinstance(out["label"], MetaTensor) and out["label"].dtype == torch.int64
    assert out["label"].meta["filename_or_obj"] == d["label"].meta["filename_or_obj"]
    assert out["image"].shape == d["image"].shape
    vals_in = set(lab_in.unique().tolist())
    vals_out = set(out["label"].unique().tolist())
    assert len(vals_in) > 10 and vals_out <= vals_in
    assert len(vals_out) >= 0.9 * len(vals_in)  # instances survive a 10 px deformation
    assert not torch.equal(out["label"].as_tensor(), lab_in.as_tensor())


def test_same_seed_same_output_and_set_determinism() -> None:
    img = torch.rand(1, 64, 80)
    a = RandElasticGrid(sigma=5.0).set_random_state(42)(img)
    b = RandElasticGrid(sigma=5.0).set_random_state(42)(img)
    c = RandElasticGrid(sigma=5.0).set_random_state(43)(img)
    assert torch.equal(a, b) and not torch.equal(a, c)

    def run() -> torch.Tensor:
        set_determinism(seed=0)
        ds = Dataset([{"img": img}], transform=RandElasticGridd("img", sigma=5.0))
        return next(iter(DataLoader(ds, batch_size=1, num_workers=0)))["img"]

    try:
        r1, r2 = run(), run()
    finally:
        set_determinism(seed=None)
    assert torch.equal(r1, r2) and not torch.equal(r1[0], img)


def test_prob_numpy_meta_and_spacing() -> None:
    img = np.random.default_rng(1).random((1, 30, 40)).astype(np.float32)
    assert torch.equal(RandElasticGrid(prob=0.0)(img), torch.from_numpy(img))
    out = RandElasticGrid(sigma=3.0).set_random_state(0)(img)
    assert isinstance(out, torch.Tensor) and out.shape == img.shape and out.dtype == torch.float32
    meta = MetaTensor(
        torch.from_numpy(img), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])), meta={"k": 1}
    )
    out = RandElasticGrid(sigma=3.0).set_random_state(0)(meta)
    assert isinstance(out, MetaTensor) and out.meta["k"] == 1
    torch.testing.assert_close(out.affine, meta.affine)
    # grid by spacing (the authors' tool: 150 px): 572 px -> control points every <= 150 px
    t = RandElasticGrid(spacing=150.0).set_random_state(0)
    t.randomize((572, 300))
    assert t.displacement.shape == (2, 5, 3)
    t = RandElasticGrid(num_points=(3, 4, 5)).set_random_state(0)
    t.randomize((10, 11, 12))
    assert t.displacement.shape == (3, 3, 4, 5)


def test_folded_padding_equals_grid_sample_padding() -> None:
    torch.manual_seed(0)
    for shape, sig in [((40, 50), 5.0), ((12, 14, 16), 30.0)]:  # the second needs several reflections
        disp = torch.randn(len(shape), 3, *([3] * (len(shape) - 1)), dtype=torch.float64) * sig
        x = torch.rand(1, 2, *shape, dtype=torch.float64)
        plain = elastic_grid(disp, shape, torch.float64)
        for pad in ("reflection", "border"):
            ref = F.grid_sample(x, plain, mode="bilinear", padding_mode=pad, align_corners=True)
            folded = elastic_grid(disp, shape, torch.float64, padding_mode=pad)
            assert folded.abs().max() <= 1.0 + 1e-12
            out = F.grid_sample(x, folded, mode="bilinear", padding_mode="border", align_corners=True)
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bicubic"):
        RandElasticGrid(mode="bicubic")(torch.rand(1, 8, 8, 8))
    with pytest.raises(ValueError, match="mode"):
        RandElasticGrid(mode="cubic")
    with pytest.raises(ValueError, match="sigma"):
        RandElasticGrid(sigma=-1.0)
    with pytest.raises(ValueError, match="num_points"):
        RandElasticGrid(num_points=1)
    with pytest.raises(ValueError, match="'lab'"):
        RandElasticGridd(["img", "lab"])({"img": torch.rand(1, 8, 8), "lab": torch.rand(1, 8, 9)})
    with pytest.raises(ValueError, match="2D or 3D"):
        RandElasticGrid()(torch.rand(8, 8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    img = torch.rand(1, 32, 40, 48)
    lab = (img > 0.5).to(torch.uint8)
    t = RandElasticGridd(["img", "lab"], sigma=4.0, mode=("bilinear", "nearest"))
    cpu = t.set_random_state(5)({"img": img, "lab": lab})
    gpu = t.set_random_state(5)({"img": img.cuda(), "lab": lab.cuda()})
    assert gpu["img"].device.type == "cuda" and gpu["lab"].dtype == torch.uint8
    torch.testing.assert_close(gpu["img"].cpu(), cpu["img"], atol=1e-4, rtol=0)
    assert (gpu["lab"].cpu() != cpu["lab"]).float().mean() < 1e-3  # rounding ties only
