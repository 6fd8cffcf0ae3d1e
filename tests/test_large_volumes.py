"""Memory that does not grow with the scan: streamed NIfTI reading, integer volumes resampled slab by
slab, labels interpolated and discretised on the source grid without a full-size score map
(``InvertToLabelsd``), and the sink's streamed writing. Each path is checked against the plain one."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from medseg.transforms import (
    InvertToLabelsd,
    LabelRule,
    SeparableSpacing,
    SeparableSpacingd,
    label_request,
    separable_linear_resample,
    separable_resample_to_labels,
)
from medseg.transforms import spacing as spacing_module
from monai.data import MetaTensor
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    Resized,
    SaveImaged,
)

from medseg.data.nifti_reader import NiftiReader
from medseg.predict.sinks import prepare_postprocessing

REPO = Path(__file__).resolve().parents[1]
CT = sorted((REPO / "sample_data" / "ct_3d" / "images").glob("*.nii.gz"))


def _smooth_scores(shape: tuple[int, ...], channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *shape, generator=g) * 3
    return torch.nn.functional.avg_pool3d(x, 3, 1, 1)[0]


# ------------------------------------------------------------------------------ integer input, slabs
@pytest.mark.parametrize("fortran", [False, True])
def test_integer_volume_resampled_slab_by_slab_equals_float(monkeypatch: pytest.MonkeyPatch, fortran: bool):
    monkeypatch.setattr(spacing_module, "_SLAB_ELEMENTS", 5000)  # many slabs
    g = torch.Generator().manual_seed(1)
    vol = (torch.randn(37, 29, 23, generator=g) * 400).to(torch.int16)
    if fortran:
        vol = torch.from_numpy(np.asfortranarray(vol.numpy()))
    img = vol[None]
    args = ([0.37, 1.3, 0.61], [0.2, -0.4, 0.1], [90, 21, 35])
    ours = separable_linear_resample(img, *args, dtype=torch.float32)
    ref = separable_linear_resample(img.float(), *args, dtype=torch.float32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-3)


def test_integer_ct_takes_the_fast_path_when_shrinking_strongly(monkeypatch: pytest.MonkeyPatch):
    """An int16 volume as stored is resampled with the separable path even where ``grid_sample`` would be
    cheaper on float input: that path would convert the whole volume first. Values agree with MONAI's."""
    from monai.transforms import Spacing

    calls: list[torch.dtype] = []
    kernel = spacing_module.separable_linear_resample

    def counting(img: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(img.dtype)
        return kernel(img, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(spacing_module, "separable_linear_resample", counting)
    g = torch.Generator().manual_seed(0)
    raw = (torch.rand(1, 256, 256, 40, generator=g) * 2000 - 1000).to(torch.int16)
    affine = torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0], dtype=torch.float64))
    sp = SeparableSpacing(pixdim=(6.0, 6.0, 6.0), dtype=torch.float32)
    sp(MetaTensor(raw.float(), affine=affine))
    assert calls == []  # float input: grid_sample is cheaper here
    ours = sp(MetaTensor(raw, affine=affine))
    assert calls == [torch.int16]
    ref = Spacing(pixdim=(6.0, 6.0, 6.0), dtype=torch.float32)(MetaTensor(raw.float(), affine=affine))
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    # grid_sample rounds its float32 sampling positions (~1e-5 voxel): on white noise of +-1000 HU that
    # moves values by a few hundredths
    torch.testing.assert_close(ours.as_tensor(), ref.as_tensor(), rtol=0, atol=0.1)
    torch.testing.assert_close(ours.affine, ref.affine)


# ----------------------------------------------------------------------------- labels, slab by slab
@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
@pytest.mark.parametrize("rule", [LabelRule(threshold=0.2, dtype=torch.uint8), LabelRule(argmax=True),
                                  LabelRule(argmax=True, dtype=torch.uint8)])  # fmt: skip
def test_labels_slab_by_slab_equal_labels_of_resampled_scores(
    monkeypatch: pytest.MonkeyPatch, padding_mode: str, rule: LabelRule
):
    monkeypatch.setattr(spacing_module, "_SLAB_ELEMENTS", 3000)  # several blocks of planes
    scores = _smooth_scores((13, 11, 9), 3 if rule.argmax else 1)
    args = ([0.23, 0.31, 0.27], [-0.3, 0.1, -0.2], [60, 40, 36])
    ours = separable_resample_to_labels(scores, *args, rule, padding_mode)
    full = separable_linear_resample(scores, *args, padding_mode, dtype=torch.float32)
    ref = rule(full)
    assert ours.dtype == rule.dtype and ours.shape == ref.shape
    assert ours.permute(0, 3, 2, 1).is_contiguous()  # first spatial axis fastest: NIfTI's order
    differ = ours != ref
    # only scores at the threshold (or tied channels) up to float rounding may come out differently
    assert int(differ.sum()) <= max(2, ref.numel() // 10000)
    if rule.threshold is not None and differ.any():
        assert float((full[differ] - rule.threshold).abs().max()) < 1e-5


def _ct_like(flip: bool) -> MetaTensor:
    g = torch.Generator().manual_seed(3)
    vol = (torch.rand(64, 48, 30, generator=g) * 1400 - 1000).to(torch.int16)
    aff = torch.diag(torch.tensor([-0.8 if flip else 0.8, 0.9, 2.0, 1.0], dtype=torch.float64))
    return MetaTensor(vol, affine=aff)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("argmax", [False, True])
def test_invert_to_labels_equals_invertd_then_asdiscreted(flip: bool, argmax: bool):
    pre = Compose([
        EnsureChannelFirstd("image", channel_dim="no_channel"),
        Orientationd("image", axcodes="RAS"),
        SeparableSpacingd("image", pixdim=(2.5, 2.7, 3.0), dtype=torch.float32, mode="bilinear"),
    ])  # fmt: skip
    d = pre({"image": _ct_like(flip)})
    small = d["image"]
    pred = MetaTensor(_smooth_scores(tuple(small.shape[1:]), 3 if argmax else 1), meta=dict(small.meta))
    invert = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)
    discretise = (AsDiscreted("pred", argmax=True, dtype=torch.uint8) if argmax
                  else AsDiscreted("pred", threshold=0.1, dtype=torch.uint8))  # fmt: skip
    ref = discretise(invert({"image": small, "pred": pred.clone()}))["pred"]
    fused = InvertToLabelsd(invert, discretise)
    with label_request(fused.rule) as probe:  # the fused path is taken: the resampler gave labels
        Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(
            {"image": small, "pred": pred.clone()}
        )
    assert probe.done
    ours = fused({"image": small, "pred": pred.clone()})["pred"]
    assert ours.shape == ref.shape == (1, 64, 48, 30) and ours.dtype == ref.dtype == torch.uint8
    assert int((ours.as_tensor() != ref.as_tensor()).sum()) <= 2
    torch.testing.assert_close(ours.affine, ref.affine)
    torch.testing.assert_close(ours.affine.double(), _ct_like(flip).affine)


def test_invert_to_labels_falls_back_where_interpolation_remains():
    """A resize before the spacing: its inverse interpolates, so labels cannot be taken earlier; the
    fused transform then runs Invertd and AsDiscreted as given (same labels)."""
    pre = Compose([
        EnsureChannelFirstd("image", channel_dim="no_channel"),
        Resized("image", spatial_size=(80, 60, 36)),
        SeparableSpacingd("image", pixdim=(2.0, 2.0, 3.0), dtype=torch.float32),
    ])  # fmt: skip
    d = pre({"image": _ct_like(False)})
    small = d["image"]
    pred = MetaTensor(_smooth_scores(tuple(small.shape[1:]), 1), meta=dict(small.meta))
    invert = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)
    discretise = AsDiscreted("pred", threshold=0.0)
    with label_request(LabelRule(threshold=0.0)) as probe:
        invert({"image": small, "pred": pred.clone()})
    assert not probe.done
    ours = InvertToLabelsd(invert, discretise)({"image": small, "pred": pred.clone()})["pred"]
    ref = discretise(invert({"image": small, "pred": pred.clone()}))["pred"]
    assert torch.equal(ours.as_tensor(), ref.as_tensor()) and ours.dtype == torch.float32


def test_prepare_postprocessing_fuses_only_what_it_can():
    pre = Compose([SeparableSpacingd("image", pixdim=(2.0, 2.0, 2.0))])
    post = Compose([
        Activationsd("pred", softmax=True),
        Invertd("pred", transform=pre, orig_keys="image"),
        AsDiscreted("pred", argmax=True),
        SaveImaged("pred", output_dir="/nonexistent"),
    ])  # fmt: skip
    out = prepare_postprocessing(post)
    assert [type(t).__name__ for t in out.transforms] == ["Activationsd", "InvertToLabelsd"]
    assert [type(t).__name__ for t in post.transforms][-1] == "SaveImaged"  # the bundle's own is untouched
    onehot = Compose([Invertd("pred", transform=pre, orig_keys="image"), AsDiscreted("pred", to_onehot=3)])
    assert [type(t).__name__ for t in prepare_postprocessing(onehot).transforms] == ["Invertd", "AsDiscreted"]
    other_key = Compose([Invertd("pred", transform=pre, orig_keys="image"), AsDiscreted("x", threshold=0.5)])
    assert [type(t).__name__ for t in prepare_postprocessing(other_key).transforms] == [
        "Invertd",
        "AsDiscreted",
    ]


# ----------------------------------------------------------------------------------- NIfTI reading
def _write_gz(path: Path, img: nib.Nifti1Image, members: int = 1) -> None:
    raw = img.to_bytes()
    step = -(-len(raw) // members)
    path.write_bytes(b"".join(gzip.compress(raw[i : i + step], 1) for i in range(0, len(raw), step)))


def test_streamed_reading_peak_is_the_array_and_a_chunk(tmp_path: Path):
    """The reader never holds the file's bytes or the volume as stored: its numpy allocations peak at
    the returned array plus about one read chunk."""
    from medseg.data import nifti_reader

    vol = (np.random.default_rng(0).random((160, 150, 140)) * 3000 - 1000).astype(np.int16)
    path = tmp_path / "v.nii.gz"
    _write_gz(path, nib.Nifti1Image(vol, np.diag([0.7, 0.7, 1.0, 1.0])))
    tracemalloc.start()
    try:
        img = nifti_reader._load_gz(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    arr = np.asarray(img.dataobj)
    assert arr.flags.c_contiguous and np.array_equal(arr, vol)
    assert peak < vol.nbytes + 2 * nifti_reader._READ_CHUNK, (peak, vol.nbytes)


@pytest.mark.parametrize("kind", ["scaled", "extension", "nifti2", "members", "4d", "big_endian"])
def test_streamed_reading_matches_nibabel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str):
    from medseg.data import nifti_reader

    monkeypatch.setattr(nifti_reader, "_READ_CHUNK", 4096)  # many slabs per volume
    rng = np.random.default_rng(2)
    shape = (23, 19, 17, 2) if kind == "4d" else (23, 19, 17)
    vol = rng.integers(-1000, 2000, shape).astype(">i2" if kind == "big_endian" else np.int16)
    cls = nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image
    img = cls(vol, np.diag([0.5, 0.6, 2.0, 1.0]))
    if kind == "scaled":
        img.header.set_slope_inter(0.5, -1024.0)
    if kind == "extension":
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"comment " * 300))
    path = tmp_path / f"{kind}.nii.gz"
    _write_gz(path, img, members=3 if kind == "members" else 1)
    reader = NiftiReader()
    ours, meta = reader.get_data(reader.read(path))
    ref = np.asanyarray(nib.load(path).dataobj)
    assert ours.shape == ref.shape and np.allclose(ours, ref, rtol=0, atol=1e-6)
    if kind == "scaled":
        assert ours.dtype == np.float32
    ours_meta = LoadImaged("image", reader=NiftiReader(), image_only=False)({"image": str(path)})
    ref_meta = LoadImaged("image", reader="NibabelReader", image_only=False)({"image": str(path)})
    assert torch.equal(ours_meta["image"].as_tensor(), ref_meta["image"].as_tensor())


def test_streamed_reading_truncated_voxel_data_names_the_file(tmp_path: Path):
    from medseg.data.errors import ReadError

    vol = np.arange(40 * 30 * 20, dtype=np.int16).reshape(40, 30, 20)
    raw = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw[: len(raw) - 1000]))  # complete gzip, short NIfTI
    with pytest.raises(ReadError, match="truncated NIfTI") as err:
        NiftiReader().read(path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------- predict: integer load path
def test_ct_bundle_reads_integer_volumes_as_stored(tmp_path: Path):
    """The CT bundle resamples first: ``medseg predict`` reads int16 volumes as int16 and the
    preprocessed image equals the float32-loaded one (up to rounding)."""
    from monai.bundle import ConfigParser

    from medseg.predict.discovery import discover_cases
    from medseg.predict.sources import CaseLoader, _resamples_to_float_first

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "unet_ct_3d" / "configs" / "inference.json"))
    pre = parser.get_parsed_content("preprocessing")
    src = tmp_path / "in"
    src.mkdir()
    vol = (np.random.default_rng(0).random((120, 110, 60)) * 1400 - 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 1.5, 1.0])), src / "ct.nii.gz")
    loader = CaseLoader(pre)
    assert _resamples_to_float_first(loader._rest, "image")
    (case,) = discover_cases(str(src))
    assert loader.read(case).dtype == torch.int16
    ours = loader.load(case, "x").data["image"]
    ref = pre({"image": str(src / "ct.nii.gz")})["image"]  # MONAI's float32 LoadImage
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours.as_tensor(), ref.as_tensor(), rtol=0, atol=1e-4)
    assert not _resamples_to_float_first(Compose(list(loader._rest.transforms)[::-1]), "image")


def test_ct_bundle_reads_dicom_series_as_stored():
    """The same for a DICOM series (integral rescale: the reader gives int16)."""
    from monai.bundle import ConfigParser

    from medseg.predict.discovery import discover_cases
    from medseg.predict.sources import CaseLoader

    series = REPO / "sample_data" / "ct_3d" / "dicom"
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "unet_ct_3d" / "configs" / "inference.json"))
    pre = parser.get_parsed_content("preprocessing")
    loader = CaseLoader(pre)
    case = discover_cases(str(series))[0]
    assert case.is_dicom
    raw = loader.read(case)
    assert raw.dtype in (torch.int16, torch.int32)
    ours = loader.load(case, "x").data["image"]
    ref = pre.transforms[1:]  # the bundle's steps after loading, on the float32 volume
    expected = Compose(list(ref))({"image": MetaTensor(raw.as_tensor().float(), meta=dict(raw.meta))})[
        "image"
    ]
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    torch.testing.assert_close(ours.as_tensor(), expected.as_tensor(), rtol=0, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_labels_and_integer_slabs_match_cpu():
    scores = _smooth_scores((13, 11, 9), 3)
    args = ([0.23, 0.31, 0.27], [-0.3, 0.1, -0.2], [60, 40, 36])
    for rule in (LabelRule(argmax=True, dtype=torch.uint8), LabelRule(threshold=0.1, dtype=torch.uint8)):
        s = scores if rule.argmax else scores[:1]
        cpu = separable_resample_to_labels(s, *args, rule)
        gpu = separable_resample_to_labels(s.cuda(), *args, rule)
        assert gpu.device.type == "cuda" and int((gpu.cpu() != cpu).sum()) <= 2
    vol = (torch.randn(1, 37, 29, 23, generator=torch.Generator().manual_seed(0)) * 400).to(torch.int16)
    cpu = separable_linear_resample(vol, [0.5, 1.3, 0.6], [0.0, 0.0, 0.0], [70, 21, 35], dtype=torch.float32)
    gpu = separable_linear_resample(
        vol.cuda(), [0.5, 1.3, 0.6], [0.0, 0.0, 0.0], [70, 21, 35], dtype=torch.float32
    )
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-2)


def test_labels_same_on_one_or_several_threads():
    scores = _smooth_scores((21, 17, 40), 1)
    args = ([0.2, 0.25, 0.3], [0.0, 0.0, 0.0], [100, 64, 130], LabelRule(threshold=0.05, dtype=torch.uint8))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = separable_resample_to_labels(scores, *args)
        torch.set_num_threads(3)  # blocks of planes on a pool of three
        several = separable_resample_to_labels(scores, *args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, several) and 0 < int(one.sum()) < one.numel()


def test_post_processing_thread_count_is_restored():
    from medseg.predict.engine import _with_threads

    before = torch.get_num_threads()
    assert _with_threads(1, torch.get_num_threads) == 1
    assert torch.get_num_threads() == before
    assert _with_threads(None, torch.get_num_threads) == before
