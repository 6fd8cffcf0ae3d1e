"""Pixel-count sampling weights (medseg.data.area_weights) on the sample data and with a weighted sampler."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medseg.data import ReadError, area_weights
from medseg.data.datalist import load_datalist

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def test_weights_are_pixel_counts_of_the_sample_nuclei() -> None:
    items = load_datalist(SAMPLE / "nuclei_2d", "training")
    expected = [float(np.prod(Image.open(item["image"]).size)) for item in items]
    assert area_weights(items) == expected


def test_weights_are_voxel_counts_of_the_sample_volumes() -> None:
    items = load_datalist(SAMPLE / "ct_3d", "training") + load_datalist(SAMPLE / "ct_3d", "validation")
    expected = [float(np.prod(nib.load(item["label"]).shape)) for item in items]
    assert area_weights(items, key="label") == expected


def test_weighted_sampler_draws_in_proportion_to_area(tmp_path: Path) -> None:
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(small)
    Image.fromarray(np.zeros((128, 256), np.uint8)).save(large)
    weights = area_weights([{"image": str(small)}, {"image": str(large)}])
    assert weights == [64 * 64, 128 * 256]
    sampler = torch.utils.data.WeightedRandomSampler(
        weights, num_samples=18000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    counts = np.bincount(list(sampler), minlength=2)
    assert counts[1] / counts[0] == pytest.approx(8.0, rel=0.1)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(ReadError, match="missing.png: no such file"):
        area_weights([{"image": str(missing)}])
    with pytest.raises(KeyError, match="no 'image' entry"):
        area_weights([{"label": str(missing)}])
    with pytest.raises(ValueError, match="empty"):
        area_weights([])
