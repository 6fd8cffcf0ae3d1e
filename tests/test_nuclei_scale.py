"""Test-time size normalisation of nuclei (``medseg.inferers.ScaleNormalisingInferer``): the diameter
estimate, the rescaled pass (size, dtype, a no-op near the target), and the nuclei bundle's instances
with it switched on."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from medseg.data.datalist import load_datalist
from medseg.inferers import OverlapTileInferer, ScaleNormalisingInferer, median_diameter

REPO = Path(__file__).resolve().parent.parent
NUCLEI = REPO / "sample_data" / "nuclei_2d"
BUNDLE = REPO / "bundles" / "unet_nuclei_2d"


def _discs(shape: tuple[int, int], radius: float, spacing: int) -> np.ndarray:
    """Instance labels: discs of ``radius`` px on a grid of ``spacing`` px, ids 1..N."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, dtype=np.int64)
    n = 0
    for cy in range(spacing // 2, shape[0] - spacing // 2 + 1, spacing):
        for cx in range(spacing // 2, shape[1] - spacing // 2 + 1, spacing):
            n += 1
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = n
    return labels


class _Threshold(torch.nn.Module):
    """A stand-in segmentation network: logits (background, foreground) of ``image > 0.5``; counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.sizes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.sizes.append(tuple(x.shape[2:]))
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20.0


def _image(radius: float, spacing: int, shape: tuple[int, int] = (120, 150)) -> torch.Tensor:
    return torch.from_numpy((_discs(shape, radius, spacing) > 0).astype(np.float32))[None, None]


# ------------------------------------------------------------------------------------ the estimate
@pytest.mark.parametrize("radius", [4.0, 8.0, 20.0])
def test_median_diameter_of_discs_of_known_radius(radius: float) -> None:
    labels = _discs((400, 400), radius, spacing=int(3 * radius) + 4)
    assert labels.max() >= 4
    assert median_diameter(labels, min_size=10) == pytest.approx(2 * radius, rel=0.05)


def test_median_diameter_3d_balls_and_specks_left_out() -> None:
    zz, yy, xx = np.mgrid[:40, :40, :40]
    ball = ((zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2).astype(np.int64)
    assert median_diameter(ball, min_size=1) == pytest.approx(20.0, rel=0.05)
    labels = _discs((200, 200), 10.0, spacing=40)
    labels[0, :3] = labels.max() + 1  # a 3-px speck, and more specks than nuclei would pull the median
    labels[199, :3] = labels.max() + 1
    assert median_diameter(labels, min_size=25) == pytest.approx(20.0, rel=0.05)
    assert math.isnan(median_diameter(np.zeros((20, 20), dtype=np.int64)))
    assert math.isnan(median_diameter(labels == labels.max(), min_size=25))  # only a speck


def test_scale_for_tolerance_bounds_and_upscale_only() -> None:
    inner = OverlapTileInferer(roi_size=64)
    s = ScaleNormalisingInferer(inner, target_diameter=20.0, tolerance=0.25, min_scale=0.5, max_scale=4.0)
    assert s.scale_for(20.0) == 1.0 and s.scale_for(17.0) == 1.0 and s.scale_for(24.0) == 1.0
    assert s.scale_for(10.0) == pytest.approx(2.0)
    assert s.scale_for(2.0) == 4.0 and s.scale_for(200.0) == 0.5  # bounded
    assert s.scale_for(math.nan) == 1.0  # nothing found: left as it is
    up = ScaleNormalisingInferer(inner, target_diameter=20.0, upscale_only=True)
    assert up.scale_for(10.0) == pytest.approx(2.0) and up.scale_for(40.0) == 1.0
    assert ScaleNormalisingInferer(inner, target_diameter=None).scale_for(5.0) == 1.0
    with pytest.raises(ValueError):
        ScaleNormalisingInferer(inner, target_diameter=0.0)
    with pytest.raises(ValueError):
        ScaleNormalisingInferer(inner, target_diameter=20.0, min_scale=2.0)
    with pytest.raises(ValueError):
        ScaleNormalisingInferer(OverlapTileInferer(roi_size=64, output="labels"), target_diameter=20.0)


# ------------------------------------------------------------------------------------ the passes
def test_rescaled_pass_returns_the_input_size_and_dtype() -> None:
    net = _Threshold()
    x = _image(radius=4.0, spacing=14)  # diameter 8 px
    inferer = ScaleNormalisingInferer(OverlapTileInferer(roi_size=64, precision="fp32"), 24.0, min_size=10)
    out = inferer(x, net)
    assert inferer.last_scales == [pytest.approx(3.0, rel=0.05)]
    assert net.calls > 1 and max(max(s) for s in net.sizes) <= 64  # tiled at both scales
    assert out.shape == (1, 2, *x.shape[2:]) and out.dtype == torch.float32
    plain = OverlapTileInferer(roi_size=64, precision="fp32")(x, _Threshold())
    agree = (out.argmax(1) == plain.argmax(1)).float().mean().item()
    assert agree > 0.97  # the same discs, back on the source grid (edges move by interpolation only)
    meta = MetaTensor(x, meta={"filename_or_obj": "discs.png"})
    out_meta = inferer(meta, _Threshold())
    assert isinstance(out_meta, MetaTensor) and out_meta.meta["filename_or_obj"] == "discs.png"
    torch.testing.assert_close(out_meta.as_tensor(), out)


def test_mean_combines_the_two_scales() -> None:
    x = _image(radius=4.0, spacing=14)
    plain = OverlapTileInferer(roi_size=64, precision="fp32")(x, _Threshold())
    replaced = ScaleNormalisingInferer(OverlapTileInferer(roi_size=64, precision="fp32"), 24.0, min_size=10)
    mean = ScaleNormalisingInferer(
        OverlapTileInferer(roi_size=64, precision="fp32"), 24.0, min_size=10, combine="mean"
    )
    torch.testing.assert_close(mean(x, _Threshold()), (plain + replaced(x, _Threshold())) / 2)
    with pytest.raises(ValueError):
        ScaleNormalisingInferer(OverlapTileInferer(roi_size=64), 24.0, combine="max")


def test_no_second_pass_near_the_target_or_without_one() -> None:
    x = _image(radius=8.0, spacing=26)  # diameter 16 px
    one_pass = _Threshold()
    plain = OverlapTileInferer(roi_size=64, precision="fp32")(x, one_pass)
    for target in (16.0, 18.0, None):
        net = _Threshold()
        inner = OverlapTileInferer(roi_size=64, precision="fp32")
        inferer = ScaleNormalisingInferer(inner, target_diameter=target, min_size=10)
        out = inferer(x, net)
        assert net.calls == one_pass.calls and inferer.last_scales == [1.0]
        assert torch.equal(out, plain)


def test_three_class_estimate_measures_the_grown_interiors() -> None:
    """With ``interior_channel`` (background / interior / contour scores) the estimate is the nuclei's
    diameter, not their interiors'."""
    from medseg.transforms import contour_classes

    classes = torch.from_numpy(contour_classes(_discs((120, 150), 8.0, 26), width=2).astype(np.int64))
    scores = torch.nn.functional.one_hot(classes, 3).permute(2, 0, 1).float() * 10.0
    inner = OverlapTileInferer(roi_size=64, precision="fp32")
    three = ScaleNormalisingInferer(inner, target_diameter=20.0, min_size=10, interior_channel=1)
    assert three.estimate_diameter(scores) == pytest.approx(16.0, rel=0.05)
    interiors_only = ScaleNormalisingInferer(inner, target_diameter=20.0, min_size=10)
    assert interiors_only.estimate_diameter(scores) < 13.0


def test_each_batch_item_gets_its_own_scale() -> None:
    x = torch.cat([_image(radius=4.0, spacing=14), _image(radius=10.0, spacing=30)])
    inferer = ScaleNormalisingInferer(OverlapTileInferer(roi_size=64, precision="fp32"), 20.0, min_size=10)
    out = inferer(x, _Threshold())
    assert inferer.last_scales[0] == pytest.approx(2.5, rel=0.05) and inferer.last_scales[1] == 1.0
    assert out.shape == (2, 2, *x.shape[2:])


def test_precision_of_a_copy_leaves_the_original_alone() -> None:
    """The predict engine sets the precision on a copy of the bundle's inferer."""
    inner = OverlapTileInferer(roi_size=64, precision="fp32")
    inferer = ScaleNormalisingInferer(inner, target_diameter=20.0)
    assert inferer.roi_size == 64 and inferer.precision == inner.precision
    other = copy.copy(inferer)
    other.precision = "bf16"
    assert other.inferer is not inner and other.inferer.precision == "bf16"
    assert inferer.inferer is inner and inner.precision == "fp32"


# ------------------------------------------------------------------------------------ the nuclei bundle
def test_bundle_inferer_is_off_by_default() -> None:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, ScaleNormalisingInferer) and inferer.target_diameter is None
    assert isinstance(inferer.inferer, OverlapTileInferer)
    assert inferer.min_size == parser.get_parsed_content("min_object_size")


@pytest.mark.skipif(not (BUNDLE / "models" / "model.pt").is_file(), reason="no shipped weights")
@pytest.mark.skipif(not NUCLEI.is_dir(), reason="needs sample_data/nuclei_2d")
def test_predict_with_size_normalisation_gives_consecutive_instances(tmp_path: Path) -> None:
    """Shipped weights on two sample images, resized by the inferer: instances 1..N on the source grid."""
    from medseg.predict import BatchPredictor

    items = load_datalist(str(NUCLEI), "validation")[:2]
    override = tmp_path / "scale.json"
    override.write_text(json.dumps({"target_diameter": 40.0, "inferer#max_scale": 2.0}))
    configs = [str(BUNDLE / "configs" / "inference.json"), str(override)]
    p = BatchPredictor.from_bundle(
        BUNDLE, tmp_path / "out", config_file=configs, precision="fp32", progress=False
    )
    rows = p.run([{"image": it["image"]} for it in items])
    assert [r.status for r in rows] == ["ok"] * len(items)
    assert all(s > 1.0 for s in p._inferer.last_scales)  # the sample nuclei are smaller than 40 px
    assert sorted(r.id for r in rows) == sorted(Path(it["image"]).stem for it in items)
    for r in rows:
        inst = np.asarray(nib.load(tmp_path / "out" / f"{r.id}_instances.nii.gz").dataobj).squeeze()
        seg = np.asarray(nib.load(tmp_path / "out" / f"{r.id}_seg.nii.gz").dataobj).squeeze()
        assert inst.shape == seg.shape
        ids = np.unique(inst)
        assert list(ids) == list(range(len(ids))) and len(ids) > 1  # background 0, then 1..N
        assert ((seg > 0) & (inst == 0)).mean() < 0.01  # the mask's nuclei are instances
