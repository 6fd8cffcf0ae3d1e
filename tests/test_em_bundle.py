"""The EM membrane bundle (``unet_em_isbi2012``) and the ISBI 2012 challenge metrics in ``medseg.metrics``.

Metric cases are small enough to count the pixel pairs by hand; the Rand scores count pairs of distinct
pixels inside true cells (the true membranes are left out).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.metrics import cell_regions, pixel_error, rand_error, rand_scores

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundles" / "unet_em_isbi2012"
EM_DATA = REPO.parent / "shared" / "datasets" / "isbi2012_em"


def _rows(row: list[int], n: int = 2) -> np.ndarray:
    """``n`` identical rows: a 2D map from a 1D pattern."""
    return np.array([row] * n)


# --------------------------------------------------------------------------------------------- metrics
def test_pixel_error_counts_differing_pixels() -> None:
    true = _rows([1, 1, 0, 1, 1])
    assert pixel_error(true, true) == 0.0
    assert pixel_error(np.ones((2, 5)), true) == pytest.approx(2 / 10)  # the membrane column missed
    assert pixel_error(true * 255, true) == 0.0  # any non-zero value is cell
    with pytest.raises(ValueError, match="shape"):
        pixel_error(np.ones((2, 4)), true)


def test_cell_regions_four_connected_and_filled() -> None:
    cells = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    labels = cell_regions(cells)
    assert labels.max() == 2 and labels[0, 0] != labels[1, 1]  # diagonal contact does not join
    filled = cell_regions(np.array([[1, 1, 0, 0, 1], [1, 1, 0, 0, 1]]), fill_membrane=True)
    assert (filled[:, :3] == filled[0, 0]).all() and (filled[:, 3:] == filled[0, 4]).all()


def test_rand_identical_is_zero_and_true_membrane_ignored() -> None:
    true = _rows([1, 1, 0, 1, 1, 0, 1])
    assert rand_error(true, true) == pytest.approx(0.0)
    # a thicker predicted membrane that separates the same cells: still perfect
    assert rand_error(_rows([1, 0, 0, 0, 1, 0, 1]), true) == pytest.approx(0.0)


def test_rand_merge_by_hand() -> None:
    # two true cells of 4 px (2x2) merged into one predicted region of 8 px
    true = _rows([1, 1, 0, 1, 1])
    scores = rand_scores(np.ones((2, 5)), true)
    # pairs inside true cells: 2 * C(4,2) = 12, all in one predicted region; predicted pairs C(8,2) = 28
    assert scores.split == pytest.approx(12 / 12)
    assert scores.merge == pytest.approx(12 / 28)
    f = 2 * (12 / 28) / (1 + 12 / 28)
    assert scores.f_score == pytest.approx(f) and scores.error == pytest.approx(1 - f)  # 0.4
    assert rand_error(np.ones((2, 5)), true) == pytest.approx(0.4)


def test_rand_split_by_hand() -> None:
    # one true cell of 16 px split by a 2-px predicted membrane into 8 + 8 (each membrane pixel joins the
    # nearer region: columns 3 and 4 go left and right)
    true = np.ones((2, 8))
    scores = rand_scores(_rows([1, 1, 1, 0, 0, 1, 1, 1]), true)
    # true pairs C(16,2) = 120; pairs in one predicted region 2 * C(8,2) = 56, all inside the true cell
    assert scores.split == pytest.approx(56 / 120)
    assert scores.merge == pytest.approx(1.0)
    assert scores.error == pytest.approx(1 - 2 * (56 / 120) / (1 + 56 / 120))  # 0.3636...


def test_rand_unequal_merge_by_hand() -> None:
    # true cells of 6 and 2 px merged: true pairs C(6,2) + C(2,2) = 16, predicted pairs C(8,2) = 28
    true = _rows([1, 1, 1, 0, 1])
    scores = rand_scores(np.ones((2, 5)), true)
    assert scores.split == pytest.approx(1.0)
    assert scores.merge == pytest.approx(16 / 28)
    assert scores.error == pytest.approx(1 - 2 * (16 / 28) / (1 + 16 / 28))  # 0.2727...


def test_rand_against_direct_pair_count() -> None:
    """Random maps: the score equals a direct count over all pairs of distinct true-cell pixels."""
    rng = np.random.default_rng(0)
    true = rng.random((9, 11)) > 0.3
    pred = rng.random((9, 11)) > 0.3
    t = cell_regions(true)
    p = cell_regions(pred, fill_membrane=True)
    inside = t.ravel() > 0
    tv, pv = t.ravel()[inside], p.ravel()[inside]
    same_t = tv[:, None] == tv[None, :]
    same_p = pv[:, None] == pv[None, :]
    off = ~np.eye(len(tv), dtype=bool)
    both = (same_t & same_p & off).sum()
    split, merge = both / (same_t & off).sum(), both / (same_p & off).sum()
    scores = rand_scores(pred, true)
    assert scores.split == pytest.approx(split) and scores.merge == pytest.approx(merge)


def test_separate_cells_closes_a_faint_membrane_with_a_watershed_line() -> None:
    from medseg.transforms import SeparateCells, SeparateCellsd, separate_cells
    from monai.data import MetaTensor

    # two confident cells joined by a faint membrane (probability 0.55 > 0.5): thresholding merges them
    row = [0.95, 0.95, 0.9, 0.6, 0.55, 0.6, 0.9, 0.95, 0.95, 0.2, 0.7]
    prob = _rows(row, 3).astype(np.float32)
    plain = separate_cells(prob, 0.5, None)
    assert plain.all(axis=0).tolist() == [True] * 9 + [False, True]
    closed = separate_cells(prob, 0.5, 0.9)
    # a 1-px line where the two cores meet (the faintest column); the part without a core (last column)
    # and every other pixel keep the thresholded class
    assert closed.all(axis=0).tolist() == [True] * 4 + [False] + [True] * 4 + [False, True]
    assert not closed[:, 4].any()
    assert cell_regions(closed).max() == 3 and cell_regions(plain).max() == 2
    with pytest.raises(ValueError, match="seed_threshold"):
        separate_cells(prob, 0.5, 0.4)

    probs = np.stack([1 - prob, prob])  # (membrane, cell) after softmax
    out = SeparateCells(0.5, 0.9)(torch.from_numpy(probs))
    assert out.shape == (1, 3, 11) and out.dtype == torch.uint8
    np.testing.assert_array_equal(out[0].numpy(), closed)
    d = SeparateCellsd("pred", 0.5, 0.9)({"pred": MetaTensor(torch.from_numpy(probs), meta={"x": 1})})
    assert isinstance(d["pred"], MetaTensor) and d["pred"].meta["x"] == 1
    np.testing.assert_array_equal(d["pred"][0].numpy(), closed)


# ---------------------------------------------------------------------------------------------- bundle
needs_data = pytest.mark.skipif(not EM_DATA.is_dir(), reason=f"needs the ISBI 2012 EM slices in {EM_DATA}")
needs_weights = pytest.mark.skipif(
    not (BUNDLE / "models" / "model.pt").is_file(), reason="no shipped weights"
)

SPLIT = "$medseg.data.datalist.load_datalist(@dataset_dir, '{}', datalist=@datalist_file)[:{}]"

# a tiny network on two small crops: seconds on a CPU
TINY = {
    "epochs": "1",
    "val_interval": "1",
    "num_workers": "0",
    "features": "4",
    "depth": "2",
    "patch_size": "[92,92]",
    "tile_size": "[188,188]",
    "batch_size": "2",
    "samples_per_image": "1",
    "train_list": SPLIT.format("training", 2),
    "val_list": SPLIT.format("validation", 1),
}


def _copy_bundle(dest: Path) -> Path:
    target = dest / BUNDLE.name
    shutil.copytree(BUNDLE, target, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    return target


def test_committed_split_holds_out_slices_25_to_29() -> None:
    split = json.loads((BUNDLE / "configs" / "isbi2012_datalist.json").read_text())
    train = [it["image"] for it in split["training"]]
    val = [it["image"] for it in split["validation"]]
    assert train == [f"images/{k}.png" for k in range(25)]
    assert val == [f"images/{k}.png" for k in range(25, 30)]
    assert [it["image"] for it in split["test"]] == val


def test_missing_default_data_says_where_to_get_it(tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    bundle = _copy_bundle(tmp_path / "elsewhere")  # no ../../../shared/datasets next to this copy
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content("dataset_dir")
    cause = str(info.value.__cause__)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert "isbi-2012" in cause and "--dataset_dir" in cause
    if EM_DATA.is_dir():
        parser["bundle_root"] = str(BUNDLE)
        assert Path(parser.get_parsed_content("dataset_dir", lazy=False)) == EM_DATA.resolve()


@needs_data
def test_one_epoch_smoke_training_on_two_small_crops(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    args = [f"--{k}={v}" for k, v in {**TINY, "dataset_dir": str(EM_DATA)}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(bundle / "configs" / "train.json"), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "val_mean_dice" in proc.stderr + proc.stdout
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"features": 4, "depth": 2})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))


@needs_weights
def test_shipped_weights_load_strictly_into_network_def() -> None:
    from shipped_weights import assert_fp16_weights_load_strictly

    assert_fp16_weights_load_strictly(BUNDLE)


@needs_data
@needs_weights
def test_predict_a_held_out_slice_with_the_shipped_weights(tmp_path: Path) -> None:
    """``medseg predict``'s engine on slice 29 (never trained on): a membrane map of the slice's size."""
    import nibabel as nib
    from monai.transforms import LoadImage

    from medseg.predict import BatchPredictor

    image = EM_DATA / "images" / "29.png"
    rows = BatchPredictor.from_bundle(BUNDLE, tmp_path, progress=False).run([{"image": str(image)}])
    assert [r.status for r in rows] == ["ok"]
    seg = np.asarray(nib.load(tmp_path / f"{rows[0].id}_seg.nii.gz").dataobj).squeeze()
    true = np.asarray(LoadImage(image_only=True)(EM_DATA / "labels" / "29.png")).squeeze() > 0  # same axes
    assert seg.shape == true.shape == (512, 512)
    assert set(np.unique(seg)) <= {0, 1}
    # loose bounds (the held-out figures are measured by benchmarks/em_quality.py)
    assert pixel_error(seg, true) < 0.15
    assert rand_error(seg, true) < 0.2


@needs_weights
def test_monailabel_prepare_accepts_the_shipped_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medseg.cli import main

    app = tmp_path / "apps" / "monaibundle"
    app.mkdir(parents=True)
    (app / "main.py").write_text("# placeholder for MONAI Label's app\n")
    assert main(["monailabel-prepare", "--app", str(app), str(BUNDLE)]) == 0
    assert "unet_em_isbi2012: 2D" in capsys.readouterr().out
    installed = app / "model" / BUNDLE.name
    assert (installed / "models" / "model.pt").read_bytes() == (BUNDLE / "models" / "model.pt").read_bytes()
