"""Nuclei as instances: gap-separated foreground -> instance labels, the object metrics of the field, the
committed DSB 2018 split, and the instance output of ``medseg predict`` with the nuclei bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from medseg.transforms import (
    CONTOUR,
    INTERIOR,
    ContourClassesd,
    DarkBackground,
    DarkBackgroundd,
    LabelInstances,
    LabelInstancesd,
    contour_classes,
    label_instances,
    separate_instances,
)
from monai.transforms import LoadImage

from medseg.data.datalist import load_datalist
from medseg.metrics import IOU_THRESHOLDS, foreground_iou, instance_iou, object_errors, object_scores

REPO = Path(__file__).resolve().parent.parent
NUCLEI = REPO / "sample_data" / "nuclei_2d"
BUNDLE = REPO / "bundles" / "unet_nuclei_2d"
DSB = REPO.parent / "shared" / "datasets" / "dsb2018_fluo"

sys.path.insert(0, str(REPO / "benchmarks"))


def _sample_labels() -> list[np.ndarray]:
    items = load_datalist(str(NUCLEI), "training")
    return [np.asarray(LoadImage(image_only=True)(it["label"])).astype(np.int64) for it in items[:4]]


# ------------------------------------------------------------------------------------------- instances
def test_gap_separated_sample_nuclei_come_back_as_their_instances() -> None:
    """The training target (instances separated by the 1-px gap) labelled again: one id per true nucleus,
    touching ones included, ids 1..N consecutive, the gaps given back (paper Sec. 3)."""
    touching_seen = 0
    for lab in _sample_labels():
        sep = separate_instances(lab)
        touching_seen += int(((sep == 0) & (lab > 0)).sum() > 0)
        inst = label_instances(sep > 0, min_size=1, connectivity=2)
        assert inst.dtype == np.uint16 and inst.shape == lab.shape
        ids = np.unique(inst)
        assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))  # consecutive, background 0
        n_true = len(np.unique(lab)) - 1
        scores = object_scores(inst, lab, [0.5, 0.8])
        assert scores[0].tp == n_true and scores[0].fp == 0 and scores[0].fn == 0
        assert scores[1].accuracy > 0.95
        assert foreground_iou(inst, lab) > 0.995  # the gaps are filled again
    assert touching_seen >= 2, "the sample images should contain touching nuclei"


def test_label_instances_drops_specks_and_keeps_diagonal_gaps() -> None:
    fg = np.zeros((30, 30), bool)
    fg[2:10, 2:10] = True  # two squares separated by a 1-px vertical gap
    fg[2:10, 11:19] = True
    fg[20:24, 20:24] = True  # 16 px
    fg[27, 3] = True  # a 1-px speck
    inst = label_instances(fg, min_size=5)
    assert inst.max() == 3 and inst[27, 3] == 0
    assert inst[5, 10] in (1, 2) and inst[1, 10] == 0 and inst[10, 10] == 0  # gap filled, not its ends
    assert set(np.unique(inst[2:10, 2:19])) == {1, 2}
    # two squares touching only at a corner are separate with the default 4-connectivity
    corner = np.zeros((10, 10), bool)
    corner[1:4, 1:4] = corner[4:7, 4:7] = True
    assert label_instances(corner, min_size=1).max() == 2
    assert label_instances(corner, min_size=1, connectivity=2).max() == 1
    assert label_instances(np.zeros((5, 5)), min_size=1).max() == 0


def test_split_at_necks_separates_two_merged_discs_and_keeps_single_ones() -> None:
    """Two discs overlapping at a neck (no gap between them) become two instances with ``split_h``; a lone
    disc, an ellipse and a speck-sized blob stay whole; without ``split_h`` the pair is one."""
    yy, xx = np.mgrid[:80, :120]
    pair = ((yy - 40) ** 2 + (xx - 30) ** 2 <= 15**2) | ((yy - 40) ** 2 + (xx - 56) ** 2 <= 15**2)
    lone = (yy - 15) ** 2 + (xx - 100) ** 2 <= 10**2
    ellipse = ((yy - 60) / 6.0) ** 2 + ((xx - 100) / 16.0) ** 2 <= 1
    small = (yy - 75) ** 2 + (xx - 10) ** 2 <= 2**2
    fg = pair | lone | ellipse | small
    merged = label_instances(fg, min_size=5)
    assert merged.max() == 4
    inst = label_instances(fg, min_size=5, split_h=1.0)
    assert inst.max() == 5 and list(np.unique(inst)) == list(range(6))
    left, right = inst[40, 22], inst[40, 64]
    assert left and right and left != right
    assert len(np.unique(inst[lone])) == 1 and len(np.unique(inst[ellipse])) == 1
    assert inst[75, 10] > 0  # a blob too flat for a marker is kept whole, not dropped
    plain = label_instances(fg, min_size=5, split_h=1.0, fill_gaps=False)
    assert ((plain > 0) == fg).all()  # the split itself only relabels; it adds or removes no pixel
    # the pair's boundary lies at the neck (x = 43), one side per disc
    assert set(np.unique(inst[pair & (xx < 41)])) == {left}
    assert set(np.unique(inst[pair & (xx > 45)])) == {right}


def test_dark_background_inverts_bright_field_and_leaves_fluorescence() -> None:
    """Sample fluorescence nuclei (dark background) are left as they are; the same image inverted (a
    bright-field-like contrast) is turned back; a real DSB 2018 bright-field image is inverted."""
    image = np.asarray(LoadImage(image_only=True)(load_datalist(str(NUCLEI), "training")[0]["image"]))
    image = image.astype(np.float32)[None]
    t = DarkBackground()
    same = np.asarray(t(image))
    assert t.inverted == [False] and np.array_equal(same, image)
    bright = image.max() + image.min() - image
    back = np.asarray(t(bright))
    assert t.inverted == [True] and np.allclose(back, image)
    d = DarkBackgroundd(keys="image")({"image": torch.as_tensor(bright)})
    assert torch.allclose(d["image"], torch.as_tensor(image))
    bf = DSB / "images" / "7f38885521586fc6.png"
    if bf.is_file():
        img = np.asarray(LoadImage(image_only=True)(str(bf)), dtype=np.float32)[None]
        lab = np.asarray(LoadImage(image_only=True)(str(DSB / "labels" / bf.name)))[None] > 0
        assert img[lab].mean() < img[~lab].mean()  # nuclei darker than the background
        out = np.asarray(t(img))
        assert t.inverted == [True] and out[lab].mean() > out[~lab].mean()


def test_label_instances_dict_transform_keeps_metadata() -> None:
    import torch
    from monai.data import MetaTensor

    mask = np.zeros((1, 12, 12), np.float32)
    mask[0, 1:5, 1:5] = mask[0, 6:11, 6:11] = 1
    meta = MetaTensor(torch.from_numpy(mask), meta={"filename_or_obj": "x.png"})
    out = LabelInstancesd("pred", min_size=2)({"pred": meta})
    assert out["instances"].shape == (1, 12, 12) and out["instances"].meta["filename_or_obj"] == "x.png"
    assert int(out["instances"].max()) == 2
    onehot = np.concatenate([1 - mask, mask])  # (bg, fg) channels, as AsDiscreted(to_onehot=2) gives
    assert LabelInstances(min_size=2)(onehot).max() == 2
    with pytest.raises(ValueError, match="one mask key"):
        LabelInstancesd(["a", "b"])


def test_objects_of_low_mean_probability_are_dropped() -> None:
    """Three squares the argmax calls foreground; the one the network is unsure of (mean foreground
    probability 0.6) is dropped with ``min_mean_probability`` 0.75, the sure ones are kept, ids consecutive;
    a probability map is required."""
    fg_prob = np.full((20, 20), 0.05, np.float32)
    fg_prob[1:6, 1:6] = 0.95
    fg_prob[8:13, 8:13] = 0.6  # faint: above 0.5 at every pixel, unsure as an object
    fg_prob[14:19, 14:19] = np.where(np.arange(5) % 2, 0.99, 0.7)  # mean 0.82: kept
    fg = fg_prob > 0.5
    assert label_instances(fg, min_size=4).max() == 3
    inst = label_instances(fg, min_size=4, probability=fg_prob, min_mean_probability=0.75)
    assert sorted(np.unique(inst)) == [0, 1, 2]
    assert (inst[8:13, 8:13] == 0).all() and (inst[1:6, 1:6] > 0).all() and (inst[14:19, 14:19] > 0).all()
    assert (inst[1:6, 1:6] != inst[14:19, 14:19]).all()
    with pytest.raises(ValueError, match="probability map"):
        label_instances(fg, probability=None, min_mean_probability=0.75)
    with pytest.raises(ValueError, match="probability map"):
        label_instances(fg, probability=fg_prob[:10], min_mean_probability=0.75)

    softmax = torch.from_numpy(np.stack([1 - fg_prob, fg_prob]))  # the network's softmax, (bg, fg)
    out = LabelInstancesd("pred", min_size=4, min_mean_probability=0.75)({"pred": softmax})
    assert np.array_equal(np.asarray(out["instances"][0]), inst)
    assert int(LabelInstances(min_size=4)(softmax).max()) == 3  # off by default
    with pytest.raises(ValueError, match="softmax"):
        LabelInstances(min_mean_probability=0.75)(torch.from_numpy(fg[None].astype(np.float32)))


def test_contour_classes_of_touching_squares() -> None:
    """Interior, a contour of ``width`` px inside each instance (also where two touch), background."""
    lab = np.zeros((12, 20), np.int64)
    lab[2:10, 2:10] = 1
    lab[2:10, 10:18] = 2  # touches instance 1 along x = 9 | 10
    c = contour_classes(lab)
    assert c.dtype == np.uint8 and set(np.unique(c)) == {0, 1, 2}
    assert (c[lab == 0] == 0).all()
    assert (c[3:9, 3:9] == 1).all() and (c[3:9, 11:17] == 1).all()  # 6x6 interiors
    assert (c[2, 2:18] == 2).all() and (c[2:10, 9] == 2).all() and (c[2:10, 10] == 2).all()
    c2 = contour_classes(lab, width=2)
    assert (c2[4:8, 4:8] == 1).all() and (c2[3, 3:17] == 2).all() and int((c2 == 1).sum()) == 2 * 16
    edge = np.ones((6, 6), np.int64)  # the image edge is not a contour
    assert (contour_classes(edge) == 1).all()
    with pytest.raises(ValueError, match=">= 0"):
        contour_classes(-lab)
    with pytest.raises(ValueError, match="width"):
        contour_classes(lab, width=0)


def test_contour_classes_round_trip_on_sample_nuclei() -> None:
    """The three-class target of the sample labels, grown back from its interiors: one instance per true
    nucleus, touching ones included, on the full extent of the nuclei."""
    from monai.data import MetaTensor

    for lab in _sample_labels():
        sep = MetaTensor(torch.from_numpy(separate_instances(lab))[None])
        c = ContourClassesd("label")({"label": sep})["label"]
        assert isinstance(c, MetaTensor) and c.dtype == torch.float32 and c.shape == (1, *lab.shape)
        c = c[0].numpy().astype(np.uint8)
        inst = label_instances(c > 0, min_size=1, interior=c == INTERIOR)
        s = object_scores(inst, lab, [0.5, 0.8])
        n_true = len(np.unique(lab)) - 1
        assert s[0].tp == n_true and s[0].fp == 0 and s[0].fn == 0 and s[1].accuracy > 0.95
        assert foreground_iou(inst, lab) > 0.995


def test_interiors_grow_into_instances_and_small_interiors_are_not_markers() -> None:
    """Two discs merged without any gap but with two interiors come out as two instances split at the
    neck; a foreground blob without interior stays one instance; an interior speck under
    ``min_interior_size`` splits nothing; a three-class one-hot input works the same."""
    yy, xx = np.mgrid[:60, :100]
    a = (yy - 30) ** 2 + (xx - 25) ** 2 <= 12**2
    b = (yy - 30) ** 2 + (xx - 47) ** 2 <= 12**2
    lone = (yy - 10) ** 2 + (xx - 85) ** 2 <= 6**2
    fg = a | b | lone
    interior = ((yy - 30) ** 2 + (xx - 25) ** 2 <= 8**2) | ((yy - 30) ** 2 + (xx - 47) ** 2 <= 8**2)
    inst = label_instances(fg, min_size=5, interior=interior)
    assert inst.max() == 3 and (inst[fg] > 0).all()
    assert ((label_instances(fg, min_size=5, interior=interior, fill_gaps=False) > 0) == fg).all()
    left, right = inst[30, 20], inst[30, 52]
    assert left and right and left != right and len(np.unique(inst[lone])) == 1 and inst[10, 85] > 0
    assert set(np.unique(inst[a & (xx < 34)])) == {left} and set(np.unique(inst[b & (xx > 38)])) == {right}
    speck = interior.copy()
    speck[10, 85] = speck[10, 87] = True  # two 1-px interiors in the lone disc
    assert label_instances(fg, min_size=5, interior=speck, min_interior_size=1).max() == 4
    assert label_instances(fg, min_size=5, interior=speck, min_interior_size=3).max() == 3
    classes = np.where(interior, INTERIOR, np.where(fg, CONTOUR, 0))
    onehot = np.stack([classes == k for k in range(3)]).astype(np.float32)
    out = LabelInstancesd("pred", min_size=5, interior_label=INTERIOR)({"pred": torch.from_numpy(onehot)})
    assert np.array_equal(out["instances"][0].numpy(), inst)
    label_map = classes[None].astype(np.float32)
    assert np.array_equal(LabelInstances(min_size=5, interior_label=1)(label_map)[0], inst)
    assert LabelInstances(min_size=5)(label_map).max() == 2  # without: components


# --------------------------------------------------------------------------------------------- metrics
def _squares(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    out = np.zeros((40, 40), np.int64)
    for i, (r0, r1, c0, c1) in enumerate(boxes, 1):
        out[r0:r1, c0:c1] = i
    return out


def test_object_metrics_hand_made_cases() -> None:
    a, b = (2, 12, 2, 12), (2, 12, 14, 24)
    true = _squares(a, b)
    # perfect match
    perfect = object_scores(true, true)
    assert all(s.tp == 2 and s.fp == 0 and s.fn == 0 and s.accuracy == 1.0 for s in perfect)
    # one nucleus split in two halves (IoU 0.5 each, not > 0.5): 1 TP, 2 FP, 1 FN
    split = _squares((2, 7, 2, 12), (7, 12, 2, 12), b)
    s = object_scores(split, true, [0.5])[0]
    assert (s.tp, s.fp, s.fn) == (1, 2, 1)
    assert s.accuracy == pytest.approx(1 / 4) and s.f1 == pytest.approx(2 / 5)
    # a merged pair: one predicted object covering both (IoU 100/220 < 0.5): 0 TP, 1 FP, 2 FN
    merged = _squares((2, 12, 2, 24))
    s = object_scores(merged, true, [0.5])[0]
    assert (s.tp, s.fp, s.fn) == (0, 1, 2) and s.accuracy == 0.0
    # empty prediction
    s = object_scores(np.zeros_like(true), true, [0.5])[0]
    assert (s.tp, s.fp, s.fn) == (0, 0, 2) and s.f1 == 0.0
    assert object_scores(np.zeros_like(true), np.zeros_like(true))[0].accuracy == 1.0
    # a shifted square: IoU 80/120 = 0.667 -> a match at 0.5 and 0.65, not at 0.7
    shifted = _squares((4, 14, 2, 12), b)
    p, t, iou = instance_iou(shifted, true)
    assert dict(zip(zip(p.tolist(), t.tolist(), strict=True), iou.tolist(), strict=True))[(1, 1)] == (
        pytest.approx(80 / 120)
    )
    tps = [s.tp for s in object_scores(shifted, true, [0.5, 0.65, 0.7])]
    assert tps == [2, 2, 1]
    assert IOU_THRESHOLDS[0] == 0.5 and IOU_THRESHOLDS[-1] == 0.95 and len(IOU_THRESHOLDS) == 10
    assert foreground_iou(merged, true) == pytest.approx(200 / 220)
    with pytest.raises(ValueError, match="differ in shape"):
        object_scores(true[:10], true)


def test_object_errors_sort_each_unmatched_object_by_cause() -> None:
    a, b, c = (2, 12, 2, 12), (2, 12, 14, 24), (20, 30, 2, 12)
    true = _squares(a, b, c)
    # a and b merged into one prediction, c split in halves, one extra blob on the background; each half
    # has IoU 0.5 with c (no match) and half its size (not under half: inexact, not a fragment)
    pred = _squares((2, 12, 2, 24), (20, 25, 2, 12), (25, 30, 2, 12), (32, 38, 30, 36))
    e = object_errors(pred, true)
    assert (e.tp, e.missed, e.merged, e.split, e.inexact_true) == (0, 0, 2, 1, 0)
    assert (e.extra, e.merging, e.fragment, e.inexact_pred) == (1, 1, 0, 2)
    # a missed, b found, c reduced to a small fragment
    e = object_errors(_squares(b, (20, 23, 2, 5)), true)
    assert (e.tp, e.missed, e.fragment) == (1, 2, 1)
    s = object_scores(pred, true, [0.5])[0]
    e = object_errors(pred, true)
    assert (e.tp, e.fp, e.fn) == (s.tp, s.fp, s.fn)
    assert object_errors(np.zeros_like(true), np.zeros_like(true)) == object_errors(true[:0], true[:0])
    assert object_errors(np.zeros_like(true), true).missed == 3
    with pytest.raises(ValueError, match="negative"):
        object_errors(-true, true)
    with pytest.raises(ValueError, match="negative"):
        object_scores(true, -true)


def test_otsu_baseline_of_the_quality_benchmark() -> None:
    from nuclei_quality import otsu_instances, otsu_threshold

    rng = np.random.default_rng(0)
    img = rng.normal(20, 3, (64, 64))
    img[10:20, 10:20] += 100
    img[40:50, 30:45] += 80
    t = otsu_threshold(img)
    assert 25 < t < 100  # above the background (20 +- 3), below both objects (>= 100)
    inst = otsu_instances(img)
    assert inst.max() == 2


def test_quality_benchmark_pools_counts_and_error_kinds_over_images() -> None:
    from nuclei_quality import pooled, scores

    a, b = (2, 12, 2, 12), (2, 12, 14, 24)
    true = _squares(a, b)
    perfect, merged = scores(true, true), scores(_squares((2, 12, 2, 24)), true)
    assert perfect["errors"]["merged"] == 0 and merged["errors"] == {
        "missed": 0, "merged": 2, "split": 0, "inexact_true": 0,
        "extra": 0, "merging": 1, "fragment": 0, "inexact_pred": 0}  # fmt: skip
    out = pooled([perfect, merged])
    # pooled counts, not the mean of per-image scores: 2 TP, 1 FP, 2 FN
    assert out["acc50"] == pytest.approx(2 / 5) and out["per_image_acc50"] == pytest.approx(0.5)
    assert out["errors_50"]["merged"] == 2 and out["errors_50"]["merging"] == 1


# ------------------------------------------------------------------------------------------ datalist
@pytest.mark.skipif(not DSB.is_dir(), reason="needs ../shared/datasets/dsb2018_fluo")
def test_committed_dsb_split_is_disjoint_and_complete() -> None:
    datalist = BUNDLE / "configs" / "dsb2018_fluo_datalist.json"
    train = load_datalist(DSB, "training", datalist=datalist)
    val = load_datalist(DSB, "validation", datalist=datalist)
    ids = lambda items: {Path(it["image"]).stem for it in items}  # noqa: E731
    assert not ids(train) & ids(val)
    index = json.loads((DSB / "index.json").read_text())
    assert ids(train) | ids(val) == {Path(i["image"]).stem for i in index["images"]}
    assert all(Path(it["label"]).is_file() for it in val)


def test_dsb_override_weights_the_background_with_a_fixed_class_weight() -> None:
    """``dsb2018.json`` over ``train.json`` gives the weight map (Eq. 2) the fixed ``w_c`` (0.3, 1) instead of
    the per-image frequency balance of ``train.json``: far from the nuclei the background weighs 0.3 whatever
    the image's foreground fraction, nuclei weigh 1, and the gaps between touching nuclei weigh more."""
    from medseg.transforms import UNetWeightMapd
    from monai.bundle import ConfigParser
    from scipy import ndimage

    def weight_map(files: list[str]) -> UNetWeightMapd:
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / f) for f in files])
        wm = parser.get_parsed_content("train#deterministic_transforms#3")
        assert isinstance(wm, UNetWeightMapd)
        return wm

    assert weight_map(["train.json"]).transform.class_weights is None  # sample data: per-image balance
    wm = weight_map(["train.json", "dsb2018.json"])
    label = _sample_labels()[0][None]  # touching synthetic nuclei
    out = wm({"label": label})
    w = np.asarray(out["weight"])[0]
    fg = label[0] > 0
    sep = np.asarray(out["label"])[0] > 0  # the nuclei with the 1-px gaps between touching ones cut out
    gaps = fg & ~sep
    assert gaps.any()
    far = ndimage.distance_transform_edt(~fg) > 3 * wm.transform.sigma  # d1 + d2 > 6 sigma: no border term
    assert far.sum() > 1000
    np.testing.assert_allclose(w[far], 0.3, atol=1e-3)
    np.testing.assert_allclose(w[sep].min(), 1.0, atol=1e-3)
    assert w[gaps].min() > 2.0


def test_datalist_file_outside_the_dataset(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"x")
    (tmp_path / "data" / "a_lab.png").write_bytes(b"x")
    dl = tmp_path / "split.json"
    dl.write_text(json.dumps({"training": [{"image": "a.png", "label": "a_lab.png"}]}))
    items = load_datalist(tmp_path / "data", "training", datalist=dl)
    data = tmp_path / "data"
    assert items == [{"image": str(data / "a.png"), "label": str(data / "a_lab.png")}]
    from medseg.data import ReadError

    with pytest.raises(ReadError, match="datalist file not found"):
        load_datalist(tmp_path / "data", "training", datalist=tmp_path / "nope.json")


# ------------------------------------------------------------------------------- predict with instances
def test_predict_writes_instances_on_the_source_grid(trained_nuclei: Path, tmp_path: Path) -> None:
    from medseg.predict import BatchPredictor, read_report

    items = load_datalist(str(NUCLEI), "validation")
    # the object filter's threshold is calibrated for the shipped weights; this short training keeps all
    configs = [str(trained_nuclei / "configs" / n) for n in ("inference.json", "keep_unsure_objects.json")]
    p = BatchPredictor.from_bundle(trained_nuclei, tmp_path, config_file=configs, progress=False)
    rows = p.run([{"image": it["image"]} for it in items])
    assert [r.status for r in rows] == ["ok"] * len(items)
    for r, it in zip(sorted(rows, key=lambda r: r.id), sorted(items, key=lambda i: i["image"]), strict=True):
        inst_img = nib.load(tmp_path / f"{r.id}_instances.nii.gz")
        seg_img = nib.load(tmp_path / f"{r.id}_seg.nii.gz")
        inst = np.asarray(inst_img.dataobj).squeeze()
        assert inst_img.get_data_dtype() == np.uint16
        np.testing.assert_allclose(inst_img.affine, seg_img.affine)
        assert inst.shape == np.asarray(seg_img.dataobj).squeeze().shape
        ids = np.unique(inst)
        assert list(ids) == list(range(len(ids)))  # background 0, then 1..N
        assert r.objects == len(ids) - 1 and f"{r.id}_instances.nii.gz" in r.outputs
        true = np.asarray(LoadImage(image_only=True)(it["label"])).squeeze().astype(np.int64)
        s = object_scores(inst, true, [0.5])[0]
        # a model trained for seconds on 8 synthetic images: the instances are real nuclei, not noise
        # (object quality on real data is measured by benchmarks/nuclei_quality.py)
        assert s.f1 > 0.4, f"{r.id}: F1 {s.f1:.2f} on the sample nuclei"
    _, rows = read_report(tmp_path / "report.json")
    assert all(r.objects for r in rows)
    assert "objects" in (tmp_path / "report.csv").read_text().splitlines()[0].split(",")


@pytest.mark.skipif(not (BUNDLE / "models" / "model.pt").is_file(), reason="no shipped weights")
def test_shipped_weights_load_strictly_into_network_def() -> None:
    from shipped_weights import assert_fp16_weights_load_strictly

    assert_fp16_weights_load_strictly(BUNDLE, max_mib=8)  # two U-Nets (BorderGatedEnsemble)


@pytest.mark.skipif(
    not (DSB.is_dir() and (BUNDLE / "models" / "model.pt").is_file()), reason="needs the DSB 2018 images"
)
def test_shipped_model_separates_touching_real_nuclei_better_than_otsu(tmp_path: Path) -> None:
    """Three DSB 2018 validation fields of densely packed, touching nuclei (about 450 in all)."""
    from nuclei_quality import otsu_instances

    from medseg.predict import BatchPredictor

    ids = ["5afb7932e9c7328f", "0402a81e75262469", "2f929b067a59f885"]
    val = {Path(it["image"]).stem: it for it in load_datalist(
        DSB, "validation", datalist=BUNDLE / "configs" / "dsb2018_fluo_datalist.json")}  # fmt: skip
    items = [val[i] for i in ids]  # held out of training
    rows = BatchPredictor.from_bundle(BUNDLE, tmp_path, progress=False).run(
        [{"image": it["image"]} for it in items]
    )
    rows = sorted(rows, key=lambda r: ids.index(Path(r.input).stem))  # the report's order is not the input's
    load = LoadImage(image_only=True)
    unet, otsu = [], []
    for row, it in zip(rows, items, strict=True):
        assert row.status == "ok", row.error
        inst = (
            np.asarray(nib.load(tmp_path / f"{row.id}_instances.nii.gz").dataobj).squeeze().astype(np.int64)
        )
        true = np.asarray(load(it["label"])).squeeze().astype(np.int64)
        unet.append(object_errors(inst, true))
        otsu.append(object_errors(otsu_instances(np.asarray(load(it["image"])).squeeze(), 25), true))
    acc = lambda es: sum(e.tp for e in es) / sum(e.tp + e.fp + e.fn for e in es)  # noqa: E731
    merged = lambda es: sum(e.merged for e in es)  # noqa: E731
    assert acc(unet) > 0.65 and acc(unet) > acc(otsu) + 0.25, (acc(unet), acc(otsu))
    assert merged(unet) < merged(otsu) / 3, (merged(unet), merged(otsu))


@pytest.mark.skipif(
    not (DSB.is_dir() and (BUNDLE / "models" / "model.pt").is_file()), reason="needs the DSB 2018 images"
)
def test_shipped_object_probability_filter_removes_background_objects_on_real_images(tmp_path: Path) -> None:
    """On two validation fields held out of training (a bright-field smear of 99 nuclei in textured cytoplasm,
    and a sparse fluorescence field) the network marks some background as foreground; the bundle's
    per-object probability filter drops most of those objects and keeps nearly every nucleus it found, so
    the object accuracy at IoU 0.5 rises."""
    from medseg.predict import BatchPredictor

    ids = ["7f38885521586fc6", "20c37b1ad2f510ed"]
    val = {Path(it["image"]).stem: it for it in load_datalist(
        DSB, "validation", datalist=BUNDLE / "configs" / "dsb2018_fluo_datalist.json")}  # fmt: skip
    # one pass per tile: the filter acts on the network's output, with or without flips
    configs = [str(BUNDLE / "configs" / n) for n in ("inference.json", "no_flips.json")]
    off = [*configs, str(BUNDLE / "configs" / "keep_unsure_objects.json")]
    errors: dict[str, list] = {}
    for name, files in (("shipped", configs), ("off", off)):
        rows = BatchPredictor.from_bundle(BUNDLE, tmp_path / name, config_file=files, progress=False).run(
            [{"image": val[i]["image"]} for i in ids]
        )
        for row in rows:
            assert row.status == "ok", row.error
            inst = np.asarray(nib.load(tmp_path / name / f"{row.id}_instances.nii.gz").dataobj).squeeze()
            assert row.objects == int(inst.max())
            true = np.asarray(LoadImage(image_only=True)(val[Path(row.input).stem]["label"])).squeeze()
            errors.setdefault(name, []).append(object_errors(inst.astype(np.int64), true.astype(np.int64)))
    tp, fp, fn = ({k: sum(getattr(e, f) for e in es) for k, es in errors.items()} for f in ("tp", "fp", "fn"))
    acc = {k: tp[k] / (tp[k] + fp[k] + fn[k]) for k in errors}
    assert fp["shipped"] < 0.6 * fp["off"], fp
    assert tp["shipped"] >= 0.9 * tp["off"], tp
    assert acc["shipped"] > acc["off"] + 0.05, acc


@pytest.mark.skipif(
    not (DSB.is_dir() and (BUNDLE / "models" / "model.pt").is_file()), reason="needs the DSB 2018 images"
)
def test_shipped_test_time_mirroring_of_the_border_network() -> None:
    """The bundle mirrors the border network's input along ``flip_axes`` (``flip_members: "border"``): its
    logits are averaged over the mirrorings inside the ensemble, exactly as the inferer's ``flip_tta``
    averages that network alone, and the plain network runs once. ``flip_members: "both"`` mirrors the whole
    ensemble in the inferer instead, which makes the prediction mirror-equivariant; one pass is not.
    Computed in fp32 on a crop of a valid output size, so that nothing but rounding can tell them apart."""
    from monai.bundle import ConfigParser

    from medseg.bundle import load_weights
    from medseg.inferers import OverlapTileInferer

    def build(**overrides: object) -> tuple[torch.nn.Module, object, ConfigParser]:
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "inference.json"))
        parser["bundle_root"] = str(BUNDLE)
        parser["precision"] = "fp32"
        for k, v in overrides.items():
            parser[k] = v
        net = parser.get_parsed_content("network_def")
        load_weights(net, BUNDLE / "models" / "model.pt")
        net = parser.get_parsed_content("precision_plan").prepare(net.eval())
        return net, parser.get_parsed_content("tile_inferer", instantiate=True, lazy=False), parser

    net, infer, parser = build()
    assert parser.get_parsed_content("flip_tta") is True and parser["flip_members"] == "border"
    axes = [int(a) for a in parser.get_parsed_content("flip_axes")]
    dims = tuple(2 + a for a in axes)  # spatial axis -> NCHW dim
    assert net.border_flips == [list(dims)] and infer.flip_tta is False
    image = DSB / "images" / "2f929b067a59f885.png"  # validation split, 52 touching nuclei
    x = parser.get_parsed_content("preprocessing")({"image": str(image)})["image"][None].float()
    # 252 = 8 * 31 + 4, a valid output size: one tile whose mirrored context is symmetric, so a mirrored image
    # meets the max-pooling grid in the same phase (any other size is padded at one end only)
    x = x[..., :252, :252]
    with torch.no_grad():
        shipped = infer(x, net).float()
        member = OverlapTileInferer(infer.roi_size, precision="fp32", flip_tta=True, flip_axes=axes)
        pa = torch.softmax(member(x, net.border_net).float(), 1)[:, 1:]
        single = OverlapTileInferer(infer.roi_size, precision="fp32")
        pb = torch.softmax(single(x, net.plain_net).float(), 1)[:, 1:]
    q = torch.softmax(shipped, 1)[:, 1:]
    assert (q - torch.minimum((pa + pb) / 2, pa * (0.5 / net.gate))).abs().max() < 1e-4
    gaps, labels = {}, {}
    for setting in ("both", "off"):
        net_s, infer_s, _ = build(flip_members="both") if setting == "both" else build(flip_tta=False)
        assert infer_s.flip_tta is (setting == "both") and net_s.border_flips == []
        with torch.no_grad():
            y = infer_s(x, net_s).float()
            y_mirrored = torch.flip(infer_s(torch.flip(x, dims), net_s).float(), dims)
        labels[setting] = y.argmax(1)
        disagree = (y.argmax(1) != y_mirrored.argmax(1)).float().mean().item()
        gaps[setting] = (y - y_mirrored).abs().max().item(), disagree
    # (largest logit difference, fraction of pixels whose class differs)
    assert gaps["both"][0] < 1e-3 and gaps["off"][0] > 0.1, gaps
    assert gaps["both"][1] < 1e-4 and gaps["off"][1] > 1e-3, gaps
    # mirroring the border network alone gives nearly the classes of mirroring both
    moved = {k: (shipped.argmax(1) != v).float().mean().item() for k, v in labels.items()}
    assert moved["both"] < moved["off"], moved
