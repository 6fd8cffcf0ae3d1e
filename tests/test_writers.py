"""Mask writers: NIfTI on the source grid (also after Spacingd/Orientationd) and DICOM SEG."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged, Orientationd, Spacingd
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medseg.data.errors import ReadError
from medseg.data.writers import mask_to_source_grid, write_dicom_seg, write_nifti_mask

REPO = Path(__file__).resolve().parent.parent
ANATOMICAL = os.path.join(data_path, "anatomical.nii")


def _load_nifti(path: str | Path) -> MetaTensor:
    return LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)(str(path))


def _threshold_mask(img: torch.Tensor) -> torch.Tensor:
    """Two labels from the intensities: a real, irregular segmentation of the scan."""
    x = img.float()
    lo, hi = torch.quantile(x.flatten(), 0.55), torch.quantile(x.flatten(), 0.8)
    return (x > lo).to(torch.uint8) + (x > hi).to(torch.uint8)


def _nearest_reference(
    src_affine: np.ndarray, src_shape: tuple, mask: np.ndarray, affine: np.ndarray
) -> np.ndarray:
    """Independent nearest-neighbour pull of ``mask`` (on ``affine``) onto the source grid, zeros outside."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in src_shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ src_affine[:3, :3].T + src_affine[:3, 3]
    inv = np.linalg.inv(affine)
    idx = np.rint(world @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(mask.shape)), axis=1)
    out = np.zeros(len(ijk), mask.dtype)
    out[inside] = mask[tuple(idx[inside].T)]
    return out.reshape(src_shape)


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------
def test_nifti_round_trip_on_source_grid(tmp_path: Path) -> None:
    src = nib.load(ANATOMICAL)
    img = _load_nifti(ANATOMICAL)
    mask = _threshold_mask(img)
    assert mask.affine is not None and set(np.unique(mask.numpy())) == {0, 1, 2}
    for i, (m, ref) in enumerate(
        [
            (mask, None),  # MetaTensor carries its own source metadata
            (mask.numpy()[0], img.meta),  # plain array + the source's meta dict
            (mask.numpy(), ANATOMICAL),  # channel-first array + the source NIfTI path
        ]
    ):
        out = tmp_path / f"mask{i}.nii.gz"
        assert write_nifti_mask(m, ref, out) == str(out)
        back = nib.load(out)
        assert back.shape == src.shape
        np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
        assert back.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(back.dataobj), mask.numpy()[0])
    assert sorted(os.listdir(tmp_path)) == [f"mask{i}.nii.gz" for i in range(3)]  # no temp files left


@pytest.mark.parametrize("pixdim", [(1.0, 1.0, 1.0), (3.0, 2.5, 3.0)], ids=["finer", "coarser"])
def test_nifti_mask_goes_back_to_source_grid_after_the_pipeline(tmp_path: Path, pixdim: tuple) -> None:
    src = nib.load(ANATOMICAL)
    truth = _threshold_mask(_load_nifti(ANATOMICAL))[0].numpy()
    label_path = tmp_path / "label.nii.gz"
    write_nifti_mask(truth, ANATOMICAL, label_path)
    pipeline = Compose(
        [
            LoadImaged(keys=["image", "label"], reader="NibabelReader"),
            EnsureChannelFirstd(keys=["image", "label"]),
            Orientationd(keys=["image", "label"], axcodes="LPI"),  # anatomical.nii is LAS
            Spacingd(keys=["image", "label"], pixdim=pixdim, mode=("bilinear", "nearest")),
        ]
    )
    data = pipeline({"image": ANATOMICAL, "label": str(label_path)})
    pred = data["label"]  # stands in for a network output on the pipeline's grid
    assert tuple(pred.shape[1:]) != src.shape and not np.allclose(pred.affine.numpy(), src.affine)
    out = tmp_path / "pred.nii"
    write_nifti_mask(pred, data["image"], out)
    back = nib.load(out)
    assert back.shape == src.shape
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    got = np.asarray(back.dataobj)
    expected = _nearest_reference(
        src.affine, src.shape, pred[0].numpy().astype(np.uint8), pred.affine.numpy()
    )
    np.testing.assert_array_equal(got, expected)
    if pixdim == (1.0, 1.0, 1.0):  # every source voxel centre is a voxel of the finer grid: lossless
        np.testing.assert_array_equal(got, truth)
    else:
        assert (got == truth).mean() > 0.8


def test_nifti_dtypes_and_bad_masks(tmp_path: Path) -> None:
    img = _load_nifti(ANATOMICAL)
    big = torch.zeros_like(img, dtype=torch.int32)
    big[0, 3:6, 4:9, 2:5] = 300
    write_nifti_mask(big, None, tmp_path / "big.nii.gz")
    back = nib.load(tmp_path / "big.nii.gz")
    assert back.get_data_dtype() == np.uint16 and int(np.asarray(back.dataobj).max()) == 300
    ok = tmp_path / "ok.nii.gz"
    write_nifti_mask(_threshold_mask(img), None, ok)
    before = ok.read_bytes()
    bad = [
        (img.float() * 0.5 + 0.25, "integer labels"),
        (-_threshold_mask(img).int(), "negative"),
        (torch.cat([img, img]).int().abs(), "2 channels"),
    ]
    for mask, msg in bad:
        with pytest.raises(ValueError, match=msg):
            write_nifti_mask(mask, None, ok)
    with pytest.raises(ValueError, match="must end with .nii"):
        write_nifti_mask(_threshold_mask(img), None, tmp_path / "mask.png")
    with pytest.raises(ValueError, match="cannot hold"):
        write_nifti_mask(big, None, ok, dtype=np.uint8)
    with pytest.raises(ReadError, match="cannot read the reference"):
        write_nifti_mask(_threshold_mask(img).numpy(), tmp_path / "absent.nii", ok)
    assert ok.read_bytes() == before  # a failed write leaves the old file untouched
    assert sorted(os.listdir(tmp_path)) == ["big.nii.gz", "ok.nii.gz"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    import medseg.data.gzip_codec as codec
    import medseg.data.writers as writers

    img = _load_nifti(ANATOMICAL)
    out = tmp_path / f"mask{suffix}"
    write_nifti_mask(_threshold_mask(img), None, out)
    before = out.read_bytes()
    assert nib.load(out).shape == img.shape[1:]

    def broken_save(obj: nib.Nifti1Image, filename: str) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    def broken_compress(data: bytes, level: int = 1) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)  # .nii
    monkeypatch.setattr(codec, "gzip_compress", broken_compress)  # large .nii.gz: the streamed members
    monkeypatch.setattr(writers, "gzip_compress", broken_compress)  # small .nii.gz: one call
    with pytest.raises(OSError, match="disk full"):
        write_nifti_mask(torch.zeros_like(img, dtype=torch.uint8), None, out)
    assert out.read_bytes() == before and os.listdir(tmp_path) == [out.name]


def test_mask_to_source_grid_2d_mat(tmp_path: Path) -> None:
    """2-D images keep MONAI's 4x4 affine; the mask still comes back exactly (upsampled pipeline)."""
    from monai.transforms import Spacing

    mask = np.zeros((20, 30), np.uint8)
    mask[3:8, 17:25] = 1
    mt = MetaTensor(torch.from_numpy(mask)[None], affine=torch.diag(torch.tensor([0.49, 0.49, 1.0, 1.0])))
    mt.meta["original_affine"] = mt.affine.numpy().copy()
    mt.meta["spatial_shape"] = np.array(mask.shape)
    fine = Spacing(pixdim=(0.245, 0.245), mode="nearest")(mt)
    back, affine = mask_to_source_grid(fine)
    np.testing.assert_array_equal(back, mask)
    np.testing.assert_allclose(affine, mt.meta["original_affine"])


# --------------------------------------------------------------------------------------------------
# DICOM SEG
# --------------------------------------------------------------------------------------------------
N_SLICES = 6


@pytest.fixture()
def ct_series(tmp_path: Path) -> tuple[Path, list[str]]:
    """A 6-slice CT series built from pydicom's CT_small.dcm; file names do not follow position."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "series"
    folder.mkdir()
    series_uid, z0 = generate_uid(), float(base.ImagePositionPatient[2])
    rng = np.random.default_rng(0)
    files_by_position = []
    names = [4, 1, 5, 0, 3, 2]
    for k in range(N_SLICES):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [
            float(base.ImagePositionPatient[0]),
            float(base.ImagePositionPatient[1]),
            z0 + 5 * k,
        ]
        ds.InstanceNumber = N_SLICES - k  # neither InstanceNumber nor the file name gives the order
        px = base.pixel_array.copy()
        px = np.roll(px, shift=int(rng.integers(-20, 20)), axis=int(k % 2))  # slices differ
        ds.PixelData = px.astype(base.pixel_array.dtype).tobytes()
        path = folder / f"slice_{names[k]}.dcm"
        ds.save_as(path)
        files_by_position.append(str(path))
    return folder, files_by_position


def _source_masks(files: list[str], lo: float, hi: float) -> np.ndarray:
    """Per source file, straight from pydicom: (n, rows, columns) label map from the stored pixels."""
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        out.append((hu > lo).astype(np.uint8) + (hu > hi).astype(np.uint8))
    return np.stack(out)


def _check_seg(
    seg_path: Path, files: list[str], expected: np.ndarray, n_segments: int, omitted: bool
) -> None:
    """SEG read back by pydicom and highdicom: frames, references and pixels (rows, columns per file)."""
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = [s.SOPInstanceUID for s in sources]
    ref = ds.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(uids)
    non_empty = [
        (s, k) for s in range(1, n_segments + 1) for k in range(len(files)) if (expected[k] == s).any()
    ]
    assert int(ds.NumberOfFrames) == (len(non_empty) if omitted else n_segments * len(files))
    # every frame references the source slice at its own position; highdicom (>= 0.23) orders the
    # frames of each segment spatially along the slice normal, so they are monotonic in position
    position = {s.SOPInstanceUID: [float(v) for v in s.ImagePositionPatient] for s in sources}
    normal = np.cross(*np.reshape([float(v) for v in sources[0].ImageOrientationPatient], (2, 3)))
    frames: dict[int, list[float]] = {}
    for fg in ds.PerFrameFunctionalGroupsSequence:
        ident = fg if "SegmentIdentificationSequence" in fg else ds.SharedFunctionalGroupsSequence[0]
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, position[uid], atol=1e-4)
        frames.setdefault(number, []).append(float(np.dot(ipp, normal)))
    expected_counts = {
        s: sum(1 for t, _ in non_empty if t == s) if omitted else len(files) for s in range(1, n_segments + 1)
    }
    assert {s: len(d) for s, d in frames.items()} == {s: c for s, c in expected_counts.items() if c}
    for d in frames.values():
        steps = np.diff(d)
        assert (steps > 0).all() or (steps < 0).all()
    seg = hd.seg.segread(seg_path)
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=list(range(1, n_segments + 1)),
        assert_missing_frames_are_empty=True,
    )
    assert px.shape == (len(files), *expected.shape[1:], n_segments)
    for s in range(1, n_segments + 1):
        np.testing.assert_array_equal(px[..., s - 1], expected == s)


def test_dicom_seg_from_the_dicom_reader(tmp_path: Path, ct_series: tuple[Path, list[str]]) -> None:
    from medseg.data.dicom_reader import DicomReader

    folder, files = ct_series
    img = LoadImage(reader=DicomReader(), image_only=True, ensure_channel_first=True)(str(folder))
    assert list(img.meta["dicom_source_files"]) == files  # sorted by position, as the contract says
    lo, hi = 0.0, 300.0
    mask = (img > lo).to(torch.uint8) + (img > hi).to(torch.uint8)
    assert tuple(mask.shape[1:]) == (128, 128, N_SLICES)
    out = tmp_path / "seg.dcm"
    write_dicom_seg(mask, None, out, {1: "soft tissue", 2: "bone"})
    expected = _source_masks(files, lo, hi)
    assert (expected == 1).any() and (expected == 2).any()
    _check_seg(out, files, expected, 2, omitted=True)
    ds = pydicom.dcmread(out)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["soft tissue", "bone"]
    algo = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "medseg" and ds.Manufacturer == "medseg"
    # keep every frame when asked
    write_dicom_seg(mask, None, out, ["soft tissue", "bone"], omit_empty_frames=False)
    _check_seg(out, files, expected, 2, omitted=False)


def test_dicom_seg_plain_array_and_resampled_pipeline(
    tmp_path: Path, ct_series: tuple[Path, list[str]]
) -> None:
    from medseg.data.dicom_reader import DicomReader

    folder, files = ct_series
    expected = _source_masks(files, 0.0, 300.0)
    # a plain (x, y, z) array with the files in slice order
    write_dicom_seg(np.transpose(expected, (2, 1, 0)), files, tmp_path / "a.dcm", {1: "a", 2: "b"})
    _check_seg(tmp_path / "a.dcm", files, expected, 2, omitted=True)
    # through a resampling pipeline: the writer brings the mask back to the source grid
    data = Compose(
        [
            LoadImaged(keys="image", reader=DicomReader()),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(0.661468 / 2, 0.661468 / 2, 2.5), mode="nearest"),
        ]
    )({"image": str(folder)})
    img = data["image"]
    assert tuple(img.shape[1:]) != (128, 128, N_SLICES)
    mask = (img > 0).to(torch.uint8) + (img > 300).to(torch.uint8)
    write_dicom_seg(mask, None, tmp_path / "b.dcm", {1: "a", 2: "b"})
    _check_seg(tmp_path / "b.dcm", files, expected, 2, omitted=True)


def test_dicom_seg_bad_inputs(tmp_path: Path, ct_series: tuple[Path, list[str]]) -> None:
    folder, files = ct_series
    mask = np.zeros((128, 128, N_SLICES), np.uint8)
    mask[10:20, 30:40, 2] = 1
    out = tmp_path / "seg.dcm"
    with pytest.raises(
        ValueError, match=r"does not match the source series: 128 columns x 128 rows x 6 files"
    ):
        write_dicom_seg(mask[:, :, :5], files, out, ["x"])
    with pytest.raises(ValueError, match="does not match"):
        write_dicom_seg(mask[:, :64], files, out, ["x"])
    mask[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"labels \[3\] that have no name"):
        write_dicom_seg(mask, files, out, {1: "x"})
    with pytest.raises(ValueError, match="no source_files"):
        write_dicom_seg(mask, None, out, {1: "x", 3: "y"})
    with pytest.raises(ValueError, match="more than once"):
        write_dicom_seg(mask, files[:5] + files[:1], out, {1: "x", 3: "y"})
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("hello")
    with pytest.raises(ReadError, match="cannot read source DICOM"):
        write_dicom_seg(mask, files[:5] + [str(not_dicom)], out, {1: "x", 3: "y"})
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["notes.dcm", "series"]
    # non-consecutive labels become segments 1..N in label order
    write_dicom_seg(mask, files, out, {1: "x", 3: "y"})
    ds = pydicom.dcmread(out)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in ds.SegmentSequence] == [(1, "x"), (2, "y")]
    seg = hd.seg.segread(out)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[2])
    assert px[0, 0, 0, 0] == 1 and px[..., 0].sum() == 1


CT_3D = REPO / "sample_data" / "ct_3d"


@pytest.mark.skipif(not (CT_3D / "dicom" / "case_000").is_dir(), reason="sample_data/ct_3d not generated")
def test_dicom_seg_and_nifti_for_sample_ct(tmp_path: Path) -> None:
    """The liver label of a sample case as DICOM SEG over its DICOM series, and back as NIfTI."""
    from medseg.data.dicom_reader import DicomReader

    img = LoadImage(reader=DicomReader(), image_only=True, ensure_channel_first=True)(
        str(CT_3D / "dicom" / "case_000")
    )
    label = _load_nifti(CT_3D / "labels" / "case_000.nii.gz")
    assert img.shape == label.shape
    np.testing.assert_allclose(img.affine.numpy(), label.affine.numpy(), atol=1e-4)  # same grid
    files = list(img.meta["dicom_source_files"])
    out = tmp_path / "liver_seg.dcm"
    write_dicom_seg(label.to(torch.uint8), files, out, {1: "liver"})
    expected = np.stack([label[0, :, :, k].numpy().T for k in range(label.shape[-1])]).astype(np.uint8)
    _check_seg(out, files, expected, 1, omitted=True)
    # independent orientation check: SEG pixels against each source file's own pixels (pydicom, no transposes)
    seg = hd.seg.segread(out)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    inside, outside = [], []
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        inside.append(hu[px[k] > 0])
        outside.append(hu[px[k] == 0])
    liver = np.concatenate(inside)
    assert 80 < np.median(liver) < 130 and abs(np.median(np.concatenate(outside)) - np.median(liver)) > 50
    # the NIfTI writer puts the same label back on the scan's grid
    write_nifti_mask(label, None, tmp_path / "liver.nii.gz")
    src = nib.load(CT_3D / "labels" / "case_000.nii.gz")
    back = nib.load(tmp_path / "liver.nii.gz")
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj))


@pytest.mark.parametrize("threads", [1, 3])
def test_gzip_member_writer_streams_one_valid_gzip_file(tmp_path: Path, threads: int) -> None:
    """Members of a few bytes each, written in order: gzip, nibabel and the reader see one stream; the
    NIfTI bytes equal nibabel's own serialisation; seeking backwards is refused."""
    import gzip

    from medseg.data.gzip_codec import GzipMemberWriter

    rng = np.random.default_rng(0)
    mask = np.asfortranarray((rng.random((37, 29, 23)) > 0.6).astype(np.uint8))
    img = nib.Nifti1Image(mask, np.diag([0.5, 0.6, 2.0, 1.0]))
    path = tmp_path / "m.nii.gz"
    with open(path, "wb") as fh, GzipMemberWriter(fh, chunk=1000, threads=threads) as gz:
        img.to_stream(gz)
        with pytest.raises(OSError, match="current position"):
            gz.seek(0)
    raw = path.read_bytes()
    assert raw.count(b"\x1f\x8b\x08") >= mask.size // 2000  # many members
    assert gzip.decompress(raw) == img.to_bytes()
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), mask)


def test_gzip_member_writer_error_leaves_no_pending_write(tmp_path: Path) -> None:
    from medseg.data.gzip_codec import GzipMemberWriter

    path = tmp_path / "x.gz"
    with pytest.raises(RuntimeError), open(path, "wb") as fh, GzipMemberWriter(fh, chunk=10**6) as gz:
        gz.write(b"abc" * 1000)
        raise RuntimeError("stop")
    assert path.read_bytes() == b""  # the buffered chunk was dropped, not flushed


def test_fortran_mask_written_without_transposing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A label map already in NIfTI's voxel order (first axis fastest) is written as is."""
    import medseg.data.writers as writers

    def no_copy(*args: object, **kwargs: object) -> None:
        raise AssertionError("transposed_copy called")

    monkeypatch.setattr(writers, "transposed_copy", no_copy)
    mask = np.asfortranarray((np.arange(6 * 5 * 4).reshape(6, 5, 4) % 3).astype(np.uint8))
    ref = {"affine": np.eye(4), "original_affine": np.eye(4), "spatial_shape": np.array(mask.shape)}
    write_nifti_mask(mask, ref, tmp_path / "f.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "f.nii.gz").dataobj), mask)


def test_large_masks_are_written_streamed_and_read_back_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip

    import medseg.data.writers as writers

    monkeypatch.setattr(writers, "_STREAM_BYTES", 1000)
    mask = (np.arange(40 * 30 * 20).reshape(40, 30, 20) % 7 == 0).astype(np.uint8)
    ref = {"affine": np.diag([0.7, 0.7, 1.0, 1.0]), "original_affine": np.diag([0.7, 0.7, 1.0, 1.0]),
           "spatial_shape": np.array(mask.shape)}  # fmt: skip
    path = write_nifti_mask(mask, ref, tmp_path / "big.nii.gz")
    raw = Path(path).read_bytes()
    assert raw.count(b"\x1f\x8b\x08") > 1  # several members: the streamed path
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
    np.testing.assert_allclose(img.affine, ref["affine"])
    small = nib.Nifti1Image(np.asfortranarray(mask), ref["affine"])
    assert len(gzip.decompress(raw)) == len(small.to_bytes())
