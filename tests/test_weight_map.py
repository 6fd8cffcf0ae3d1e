"""U-Net weight map (paper eq. 2): exactness against a naive reference, gap separation, class weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from medseg.transforms import UNetWeightMap, UNetWeightMapd, separate_instances, unet_weight_map
from monai.data import MetaTensor
from monai.transforms import Compose, Flipd, LoadImage, LoadImaged
from scipy import ndimage


def synthetic_instances(shape: tuple[int, ...], n: int, rmin: float, rmax: float, seed: int) -> np.ndarray:
    """``n`` random disks/balls; where they overlap the pixel goes to the nearest centre (touching cells)."""
    rng = np.random.default_rng(seed)
    pts = np.stack([rng.integers(0, s, n) for s in shape], 1)
    seeds = np.zeros(shape, np.int32)
    seeds[tuple(pts.T)] = np.arange(1, n + 1)
    dist, idx = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    nearest = seeds[tuple(idx)]
    radius = rng.uniform(rmin, rmax, n + 1)
    return np.where(dist < radius[nearest], nearest, 0)


def naive_weight_map(lab: np.ndarray, w0: float, sigma: float, sampling=None) -> np.ndarray:
    """The common recipe: one full distance transform per instance, stacked, sorted."""
    ids = [i for i in np.unique(lab) if i]
    d = np.stack([ndimage.distance_transform_edt(lab != i, sampling=sampling) for i in ids])
    d.sort(axis=0)
    fg = lab > 0
    n_fg, n_bg = fg.sum(), (~fg).sum()
    w_c = np.where(fg, min(n_fg, n_bg) / n_fg, min(n_fg, n_bg) / n_bg)
    return w_c + w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2)) * ~fg


def touching_pairs(lab: np.ndarray, connectivity: int) -> set[tuple[int, int]]:
    """Pairs of different instances that are neighbours (independent check: per-instance dilation)."""
    struct = ndimage.generate_binary_structure(lab.ndim, connectivity)
    pairs = set()
    for i in np.unique(lab[lab > 0]):
        grown = ndimage.binary_dilation(lab == i, struct)
        for j in np.unique(lab[grown & (lab > 0) & (lab != i)]):
            pairs.add((min(i, j), max(i, j)))
    return pairs


@pytest.fixture(scope="module")
def cells_2d() -> np.ndarray:
    return synthetic_instances((320, 320), n=110, rmin=9, rmax=16, seed=1)


def test_synthetic_image_is_a_hard_case(cells_2d: np.ndarray) -> None:
    assert len(np.unique(cells_2d)) - 1 > 100
    assert len(touching_pairs(cells_2d, 2)) > 50


def test_matches_naive_reference_2d(cells_2d: np.ndarray) -> None:
    sep = separate_instances(cells_2d)
    ref = naive_weight_map(sep, 10.0, 5.0)
    fast = unet_weight_map(cells_2d)  # separate=True by default
    assert fast.dtype == np.float32 and fast.shape == cells_2d.shape
    assert np.abs(fast - ref).max() < 1e-3
    # the border term is real here (not an all-w_c map that would match trivially)
    assert (fast - ref).std() < 1e-4 and ref.max() > 8.0


def test_error_stays_below_stated_tolerance(cells_2d: np.ndarray) -> None:
    sep = separate_instances(cells_2d)
    ref = naive_weight_map(sep, 10.0, 3.0)
    for tol in (0.2, 1e-2):
        err = np.abs(unet_weight_map(sep, sigma=3.0, separate=False, tolerance=tol) - ref).max()
        assert err < tol
    # a loose tolerance gives a smaller margin and a visible (but bounded) error: the margin matters
    assert np.abs(unet_weight_map(sep, sigma=3.0, separate=False, tolerance=0.2) - ref).max() > 1e-3


def test_matches_naive_reference_3d_anisotropic() -> None:
    lab = synthetic_instances((24, 48, 48), n=40, rmin=5, rmax=9, seed=2)
    assert len(touching_pairs(lab, 3)) > 5
    sep = separate_instances(lab)
    for sampling in (None, (2.0, 1.0, 0.8)):
        ref = naive_weight_map(sep, 10.0, 4.0, sampling=sampling)
        fast = unet_weight_map(lab, sigma=4.0, sampling=sampling)
        assert np.abs(fast - ref).max() < 1e-3


def test_two_cells_analytic_value() -> None:
    lab = np.zeros((40, 60), np.int32)
    lab[10:30, 10:20] = 1
    lab[10:30, 30:40] = 2  # columns 20..29 are background: x = 25 is 6 px from cell 1 and 5 px from cell 2
    w = unet_weight_map(lab, w0=10.0, sigma=5.0, class_weights=(1.0, 1.0))
    assert w[20, 25] == pytest.approx(1.0 + 10.0 * np.exp(-((6 + 5) ** 2) / 50.0), rel=1e-6)
    assert np.all(w[lab > 0] == 1.0)  # the border term is on background pixels only
    # one cell only: no second-nearest cell, no border term
    assert np.all(unet_weight_map((lab == 1).astype(np.int32), class_weights=(1.0, 1.0)) == 1.0)


def test_separation_leaves_no_touching_instances(cells_2d: np.ndarray) -> None:
    for connectivity in (2, 1):  # 8- (default, as the authors' tool) and 4-neighbourhood
        sep = separate_instances(cells_2d, connectivity)
        assert touching_pairs(sep, connectivity) == set()
        assert set(np.unique(sep)) == set(np.unique(cells_2d))  # no instance vanished
    sep = separate_instances(cells_2d)
    # exactly the pixels having a smaller-id neighbour were removed (1-px gap, lower id kept whole)
    big = int(cells_2d.max()) + 1
    nb_min = ndimage.minimum_filter(np.where(cells_2d > 0, cells_2d, big), footprint=np.ones((3, 3)))
    expected_removed = (cells_2d > 0) & (nb_min < cells_2d)
    assert expected_removed.any()
    np.testing.assert_array_equal(sep, np.where(expected_removed, 0, cells_2d))
    # 4-connectivity removes fewer pixels than 8-connectivity
    assert np.count_nonzero(separate_instances(cells_2d, 1)) > np.count_nonzero(sep)


def test_wider_gap_on_two_touching_rectangles() -> None:
    lab = np.zeros((7, 13), np.int32)
    lab[1:6, 1:6], lab[1:6, 6:12] = 1, 2
    np.testing.assert_array_equal(np.flatnonzero(separate_instances(lab)[3] == 0), [0, 6, 12])
    sep3 = separate_instances(lab, gap_width=3)
    np.testing.assert_array_equal(np.flatnonzero(sep3[3] == 0), [0, 5, 6, 7, 12])  # columns 5-7: 3 px
    sep5 = separate_instances(lab, gap_width=5)
    np.testing.assert_array_equal(np.flatnonzero(sep5[3] == 0), [0, 4, 5, 6, 7, 8, 12])
    # a one-pixel cell between two others, which a 5-px gap would erase, keeps its 1-px separation
    dot = np.zeros((7, 13), np.int32)
    dot[1:6, 1:6], dot[1:6, 7:12], dot[3, 6] = 2, 3, 1
    assert (separate_instances(dot, gap_width=5) == 1).sum() == 1


def test_wider_gap_removes_both_sides_of_the_one_pixel_gap(cells_2d: np.ndarray) -> None:
    one = separate_instances(cells_2d)
    gap = (cells_2d > 0) & (one == 0)
    for width in (3, 5):
        sep = separate_instances(cells_2d, gap_width=width)
        # the removed pixels are the 1-px gap dilated by (width - 1) / 2 steps, within the cells
        grown = ndimage.binary_dilation(gap, np.ones((3, 3), bool), iterations=(width - 1) // 2)
        expected = np.where(grown & (cells_2d > 0), 0, cells_2d)
        erased = np.setdiff1d(np.unique(cells_2d), np.unique(expected))  # small cells inside the gap
        kept_whole = np.isin(one, erased)
        expected[kept_whole] = one[kept_whole]
        np.testing.assert_array_equal(sep, expected)
        assert touching_pairs(sep, 2) == set()
        assert np.count_nonzero(sep) < np.count_nonzero(one)  # wider than the 1-px gap
        assert set(np.unique(sep)) == set(np.unique(cells_2d))  # no instance vanished
    with pytest.raises(ValueError, match="gap_width"):
        separate_instances(cells_2d, gap_width=2)
    for bad in (0, 2, 4, 3.5, "3", True):  # refused when the transform is built, before any sample
        with pytest.raises(ValueError, match="gap_width"):
            UNetWeightMapd(keys="label", gap_width=bad)
    # the weight map's labels follow the same separation
    w = UNetWeightMapd(keys="label", gap_width=3)({"label": cells_2d[None]})
    np.testing.assert_array_equal(np.asarray(w["label"])[0], separate_instances(cells_2d, gap_width=3))


def test_separation_3d() -> None:
    lab = synthetic_instances((20, 32, 32), n=25, rmin=4, rmax=8, seed=3)
    assert touching_pairs(lab, 3)
    sep = separate_instances(lab)
    assert touching_pairs(sep, 3) == set()


def test_class_weights() -> None:
    lab = synthetic_instances((64, 64), n=6, rmin=5, rmax=8, seed=4)
    fg = separate_instances(lab) > 0
    given = unet_weight_map(lab, w0=0.0, class_weights=(0.5, 2.0))
    np.testing.assert_array_equal(given, np.where(fg, 2.0, 0.5).astype(np.float32))
    balanced = unet_weight_map(lab, w0=0.0)
    assert fg.mean() < 0.5  # foreground is the rare class: weight 1, background the frequency ratio
    assert np.all(balanced[fg] == 1.0)
    assert balanced[~fg].sum() == pytest.approx(balanced[fg].sum(), rel=1e-5)  # classes weigh the same
    assert np.all(unet_weight_map(np.zeros((16, 16), np.int32)) == 1.0)  # empty label: no NaN, all ones
    # the border term adds to w_c on the background only
    full = unet_weight_map(lab)
    np.testing.assert_array_equal(full[fg], balanced[fg])
    assert np.all(full[~fg] >= balanced[~fg]) and (full[~fg] > balanced[~fg] + 1).any()


def test_array_transform_types_and_channels(cells_2d: np.ndarray) -> None:
    t = UNetWeightMap()
    expected = unet_weight_map(cells_2d)
    img = cells_2d[None].astype(np.int32)
    out_np = t(img)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == img.shape
    out_t = t(torch.as_tensor(img))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    # float labels (e.g. after nearest resampling) are accepted; two channels are processed separately
    two = np.stack([cells_2d, np.fliplr(cells_2d)]).astype(np.float32)
    out2 = t(two)
    np.testing.assert_allclose(out2[0], expected, atol=1e-6)
    np.testing.assert_allclose(out2[1], unet_weight_map(np.fliplr(cells_2d)), atol=1e-6)


def test_bad_input_gives_clear_errors() -> None:
    t = UNetWeightMap()
    with pytest.raises(ValueError, match="channel-first"):
        t(np.zeros((8, 8), np.int32))
    with pytest.raises(ValueError, match=">= 0"):
        t(-np.ones((1, 8, 8), np.int32))
    with pytest.raises(ValueError, match="integers"):
        t(np.full((1, 8, 8), 0.5, np.float32))
    with pytest.raises(ValueError, match="class_weights"):
        unet_weight_map(np.ones((8, 8), np.int32), class_weights=(1.0,))
    with pytest.raises(ValueError, match="one weight_key per key"):
        UNetWeightMapd(keys=["a", "b"], weight_key="w")


def test_dict_transform_meta_label_update_and_spatial_follow(cells_2d: np.ndarray) -> None:
    affine = torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64))
    data = torch.as_tensor(cells_2d[None], dtype=torch.int32)
    label = MetaTensor(data, affine=affine, meta={"id": "cells"})
    out = UNetWeightMapd(keys="label")({"label": label, "image": torch.zeros(1, 320, 320)})
    weight = out["weight"]
    assert isinstance(weight, MetaTensor) and weight.dtype == torch.float32
    assert torch.equal(weight.affine, affine) and weight.meta["id"] == "cells"
    weight.meta["id"] = "changed"
    assert label.meta["id"] == "cells"  # the weight map has its own copy of the metadata
    np.testing.assert_allclose(weight.numpy()[0], unet_weight_map(cells_2d), atol=1e-6)
    # the label item now holds the separated instances, same type/dtype/meta
    assert isinstance(out["label"], MetaTensor) and out["label"].dtype == torch.int32
    np.testing.assert_array_equal(out["label"].numpy()[0], separate_instances(cells_2d))
    assert torch.equal(out["label"].affine, affine)
    # update_label=False leaves the label alone; the weight map is the same
    kept = UNetWeightMapd(keys="label", weight_key="w", update_label=False)({"label": label})
    assert kept["label"] is label
    np.testing.assert_allclose(kept["w"].numpy(), weight.numpy())
    # a spatial transform after it warps the weight map like the label, and tracks it in its metadata
    flipped = Compose([UNetWeightMapd(keys="label"), Flipd(keys=["label", "weight"], spatial_axis=1)])(
        {"label": label}
    )
    np.testing.assert_allclose(flipped["weight"].numpy(), np.flip(weight.numpy(), axis=2))
    assert len(flipped["weight"].applied_operations) == 1


NUCLEI = Path(__file__).resolve().parents[1] / "sample_data" / "nuclei_2d"


@pytest.mark.skipif(not (NUCLEI / "datalist.json").is_file(), reason="sample_data/nuclei_2d not generated")
def test_on_project_sample_nuclei() -> None:
    """Real pipeline on the project's sample nuclei: LoadImaged -> UNetWeightMapd vs the reference."""
    item = json.loads((NUCLEI / "datalist.json").read_text())["training"][0]
    pipeline = Compose([LoadImaged(keys="label", ensure_channel_first=True), UNetWeightMapd(keys="label")])
    out = pipeline({"label": str(NUCLEI / item["label"])})
    raw = LoadImage(image_only=True)(str(NUCLEI / item["label"])).numpy().astype(np.int64)
    assert len(touching_pairs(raw, 2)) > 3  # the sample has touching nuclei sharing a border
    sep = out["label"].numpy()[0].astype(np.int64)
    assert touching_pairs(sep, 2) == set()
    np.testing.assert_array_equal(sep, separate_instances(raw))
    assert out["weight"].shape == out["label"].shape and out["weight"].meta["filename_or_obj"].endswith(
        ".png"
    )
    assert np.abs(out["weight"].numpy()[0] - naive_weight_map(sep, 10.0, 5.0)).max() < 1e-3
