"""DicomReader on pydicom's bundled test files and the project's sample data."""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

import medseg  # noqa: F401  (registers the readers with LoadImage)
from medseg.data import DicomReader, ReadError

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
DIRS = TEST_FILES / "dicomdirtests"
REPO = Path(__file__).resolve().parents[1]


def load(path: os.PathLike | str, **kwargs) -> tuple[np.ndarray, dict]:
    reader = DicomReader(**kwargs)
    return reader.get_data(reader.read(str(path)))


def sitk_reference(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK volume as (x, y, z) and its RAS affine (MONAI convention)."""
    img = sitk.ReadImage(files if len(files) > 1 else files[0])
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), np.diag([-1, -1, 1, 1]) @ affine


def test_ct5n_sorted_by_position_and_equal_to_simpleitk() -> None:
    folder = DIRS / "98892001" / "CT5N"
    arr, meta = load(folder)
    ref_files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    ref, ref_affine = sitk_reference(ref_files)
    assert arr.shape == ref.shape == (16, 16, 5)
    np.testing.assert_array_equal(arr, ref)
    np.testing.assert_allclose(meta["affine"], ref_affine, atol=1e-4)
    np.testing.assert_allclose(meta["original_affine"], meta["affine"])
    # slice k comes from file k, ascending along the slice normal (InstanceNumber runs the other way)
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in meta["dicom_source_files"]]
    assert z == sorted(z) and len(set(z)) == 5
    assert [os.path.basename(f) for f in meta["dicom_source_files"]] == [
        os.path.basename(f) for f in ref_files
    ]
    for k, f in enumerate(meta["dicom_source_files"]):
        ds = pydicom.dcmread(f)
        np.testing.assert_array_equal(
            arr[:, :, k], ds.pixel_array.T * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        )
    assert list(meta["spatial_shape"]) == [16, 16, 5]
    np.testing.assert_allclose(meta["spacing"], [0.488281, 0.488281, 2.5], atol=1e-6)
    assert np.isnan(meta["original_channel_dim"])
    assert (
        meta["dicom_series_uid"]
        == meta["SeriesInstanceUID"]
        == pydicom.dcmread(ref_files[0]).SeriesInstanceUID
    )
    assert meta["Modality"] == "CT" and "StudyInstanceUID" in meta and "FrameOfReferenceUID" in meta
    assert "PatientName" not in meta and "PatientID" not in meta


def test_mr2_localizers_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    folder = DIRS / "98892003" / "MR2"
    with pytest.raises(ReadError) as err:
        load(folder)
    msg = str(err.value)
    assert str(folder) in msg and "no volumetric series" in msg
    uids = {pydicom.dcmread(f).SeriesInstanceUID for f in folder.iterdir()}
    assert len(uids) == 3 and all(uid in msg for uid in uids)
    # explicitly asking for the single-image series loads exactly that one image
    single = next(
        u for u in uids if sum(pydicom.dcmread(f).SeriesInstanceUID == u for f in folder.iterdir()) == 1
    )
    arr, meta = load(folder, series_uid=single)
    assert arr.shape == (16, 16, 1) and meta["dicom_series_uid"] == single


def test_folder_with_several_series_picks_largest_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for sub in ("98892001/CT5N", "77654033/CT2", "98892001/CT2N"):  # 5-slice CT, gapped CT, scouts
        shutil.copytree(DIRS / sub, tmp_path / "export" / sub.replace("/", "_"))
    with caplog.at_level(logging.INFO, logger="medseg.data.dicom_reader"):
        arr, meta = load(tmp_path)  # recursive scan of nested folders
    ct5n_uid = pydicom.dcmread(next((DIRS / "98892001" / "CT5N").iterdir())).SeriesInstanceUID
    assert meta["dicom_series_uid"] == ct5n_uid and arr.shape == (16, 16, 5)
    assert any("picked series" in r.getMessage() and ct5n_uid in r.getMessage() for r in caplog.records)
    assert not any("PatientName" in r.getMessage() for r in caplog.records)
    gapped_uid = pydicom.dcmread(next((DIRS / "77654033" / "CT2").iterdir())).SeriesInstanceUID
    with pytest.raises(ReadError, match="non-uniform slice spacing"):
        load(tmp_path, series_uid=gapped_uid)
    with pytest.raises(ReadError, match="not in the folder"):
        load(tmp_path, series_uid="1.2.3.4")


def test_files_restrict_the_header_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``files=``: a caller that knows a series' files (medseg predict) spares every other header."""
    from medseg.data.dicom import headers

    flat = tmp_path / "flat"
    flat.mkdir()
    for sub in ("98892001/CT5N", "98892001/CT2N"):  # one folder, two series
        for f in (DIRS / sub).iterdir():
            shutil.copy(f, flat / f"{sub.split('/')[1]}_{f.name}")
    ct5n = sorted(p.name for p in flat.iterdir() if p.name.startswith("CT5N"))
    scanned: list[str] = []
    real_scan = headers.scan_file

    def spy(path: str):
        scanned.append(os.path.basename(path))
        return real_scan(path)

    monkeypatch.setattr(headers, "scan_file", spy)
    reader = DicomReader(files=ct5n)  # names relative to the folder
    arr, meta = reader.get_data(reader.read(flat))
    assert arr.shape == (16, 16, 5) and sorted(scanned) == ct5n
    ref, ref_meta = load(DIRS / "98892001" / "CT5N")
    assert np.array_equal(arr, ref) and np.allclose(meta["affine"], ref_meta["affine"])
    scanned.clear()
    reader = DicomReader(files=[flat / n for n in ct5n])  # absolute paths
    assert reader.get_data(reader.read(flat))[0].shape == (16, 16, 5) and sorted(scanned) == ct5n


def test_gap_is_an_error_by_default_and_accept_resample_on_request() -> None:
    folder = DIRS / "77654033" / "CT2"
    with pytest.raises(ReadError) as err:
        load(folder)
    msg = str(err.value)
    assert str(folder) in msg and "expected a step of 1.25 mm" in msg and "202.5" in msg
    arr, meta = load(folder, on_gap="accept")
    assert arr.shape[2] == 4
    arr, meta = load(folder, on_gap="resample")
    assert arr.shape[2] == int(round((105.519997 + 99.480003) / 1.25)) + 1
    np.testing.assert_allclose(meta["spacing"][2], 1.25, atol=1e-6)
    first = pydicom.dcmread(meta["dicom_source_files"][0])
    np.testing.assert_allclose(arr[:, :, 0], first.pixel_array.T * 1.0 - 1024, atol=1e-3)


MR_VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", MR_VARIANTS)
@pytest.mark.parametrize("decoder", ["auto", "simpleitk"])
def test_compressed_variants_decode_like_uncompressed(name: str, decoder: str) -> None:
    ref, ref_meta = load(get_testdata_file("MR_small.dcm"))
    arr, meta = load(get_testdata_file(name), decoder=decoder)
    assert arr.shape == ref.shape == (64, 64, 1)
    np.testing.assert_array_equal(arr, ref)
    np.testing.assert_allclose(meta["affine"], ref_meta["affine"])


def test_single_file_and_multiframe_geometry_equal_simpleitk() -> None:
    for name in ("CT_small.dcm", "rtdose.dcm"):
        path = get_testdata_file(name)
        arr, meta = load(path)
        ref, ref_affine = sitk_reference([path])
        assert arr.shape == ref.shape
        np.testing.assert_array_equal(arr, ref)
        np.testing.assert_allclose(meta["affine"], ref_affine, atol=1e-4)
    assert meta["dicom_source_frames"] == list(range(1, 16)) and meta["dicom_source_files"] == [path] * 15


def test_enhanced_multiframe_matches_the_series(tmp_path: Path) -> None:
    """An enhanced-style file built from CT5N (frames in reverse order) loads as the folder does."""
    ref, ref_meta = load(DIRS / "98892001" / "CT5N")
    sources = [pydicom.dcmread(f) for f in ref_meta["dicom_source_files"]][::-1]
    ds = copy.deepcopy(sources[0])
    for tag in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        delattr(ds, tag)
    ds.NumberOfFrames = len(sources)
    shared = pydicom.Dataset()
    shared.PlaneOrientationSequence = [pydicom.Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = sources[0].ImageOrientationPatient
    shared.PixelMeasuresSequence = [pydicom.Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = sources[0].PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = sources[0].SliceThickness
    shared.PixelValueTransformationSequence = [pydicom.Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 1
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -1024
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for src in sources:
        item = pydicom.Dataset()
        item.PlanePositionSequence = [pydicom.Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = src.ImagePositionPatient
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = b"".join(src.PixelData for src in sources)
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    arr, meta = load(path)
    np.testing.assert_array_equal(arr, ref)
    np.testing.assert_allclose(meta["affine"], ref_meta["affine"], atol=1e-6)
    assert meta["dicom_source_frames"] == [5, 4, 3, 2, 1]


def test_bad_inputs_raise_read_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file at all\n" * 20)
    no_dicom = tmp_path / "no_dicom"
    no_dicom.mkdir()
    (no_dicom / "readme.txt").write_text("hello")
    good = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good[: len(good) - 5000])
    header_only = tmp_path / "header_only.dcm"
    header_only.write_bytes(good[:600])
    cases = {
        tmp_path / "missing": "no such file",
        empty: "empty folder",
        text: "not a DICOM file",
        no_dicom: "no DICOM image series",
        truncated: "pixel data",
        header_only: "",
        DIRS / "98892001" / "CT2N": "no volumetric series",  # two orthogonal scouts: not stacked
        get_testdata_file("nested_priv_SQ.dcm"): "without an image",
    }
    for path, reason in cases.items():
        with pytest.raises(ReadError) as err:
            load(path)
        assert str(path) in str(err.value) and reason in str(err.value), str(err.value)


def test_load_image_picks_readers() -> None:
    import nibabel
    from monai.data import NibabelReader
    from monai.transforms import LoadImage

    loader = LoadImage(image_only=False)
    for path in (
        DIRS / "98892001" / "CT5N",
        get_testdata_file("CT_small.dcm"),
        DIRS / "98892001" / "CT5N" / "2062",
    ):
        img, meta = loader(str(path))
        assert "dicom_source_files" in meta, path
    img, _ = loader(str(DIRS / "98892001" / "CT5N"))
    np.testing.assert_array_equal(img.numpy(), load(DIRS / "98892001" / "CT5N")[0])
    nii = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    picked = [r for r in loader.readers[::-1] if r.verify_suffix(str(nii))][0]
    assert isinstance(picked, NibabelReader)
    assert tuple(loader(str(nii))[0].shape) == nibabel.load(nii).shape
    assert not DicomReader().verify_suffix("x.mat")
    for reader in ("DicomReader", "dicomreader", DicomReader, DicomReader(series_uid=None)):
        img = LoadImage(reader=reader, image_only=True)(str(DIRS / "98892001" / "CT5N"))
        assert tuple(img.shape) == (16, 16, 5)
    if (REPO / "medseg" / "data" / "mat_reader.py").exists():
        assert [type(r).__name__ for r in loader.readers[-2:]] == ["MatReader", "DicomReader"]


@pytest.mark.skipif(
    not (REPO / "sample_data" / "ct_3d" / "dicom").is_dir(), reason="sample_data/ct_3d absent"
)
def test_sample_ct_dicom_equals_nifti_copy() -> None:
    from monai.transforms import LoadImage

    root = REPO / "sample_data" / "ct_3d"
    cases = sorted(p for p in (root / "dicom").iterdir() if p.is_dir())
    assert cases
    loader = LoadImage(image_only=True)
    for case in cases[:2]:
        dcm = loader(str(case))
        nii = loader(str(root / "images" / f"{case.name}.nii.gz"))
        assert dcm.meta["dicom_series_uid"]
        assert tuple(dcm.shape) == tuple(nii.shape)
        np.testing.assert_allclose(dcm.numpy(), nii.numpy(), atol=1e-3)
        np.testing.assert_allclose(dcm.affine.numpy(), nii.affine.numpy(), atol=1e-3)


def _write_series(
    folder: Path, n: int, rows: int, cols: int, slopes: list, inters: list, unsigned: bool
) -> None:
    """A CT series from CT_small.dcm's header (it keeps its DataSetTrailingPadding after PixelData)."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(1)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert (0xFFFC, 0xFFFC) in template  # padding after the pixels: the offset from the scan is needed
    uid = generate_uid()
    for k in rng.permutation(n):
        ds = template.copy()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = uid
        ds.Rows, ds.Columns = rows, cols
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.RescaleSlope, ds.RescaleIntercept = slopes[k], inters[k]
        dtype = np.uint16 if unsigned else np.int16
        ds.PixelData = rng.integers(0, 3000, (rows, cols)).astype(dtype).tobytes()
        ds.save_as(folder / f"S{k:03d}", enforce_file_format=True)


@pytest.mark.parametrize(
    ("slopes", "inters", "unsigned", "dtype"),
    [
        ([1] * 70, [-1024] * 70, False, "int16"),  # in-place rescale of the stored dtype
        ([1] * 35 + [2] * 35, [0] * 70, True, "int16"),  # uint16 -> int16, per-slice slope
        ([30] * 70, [5] * 70, True, "int32"),  # range beyond int16
        ([0.5] * 70, [-3.25] * 70, False, "float32"),
    ],
)
def test_native_fast_path_tiled_layout_and_rescale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slopes: list, inters: list, unsigned: bool, dtype: str
) -> None:
    # 70 x 67 x 130: not a multiple of the transpose tile along any axis
    _write_series(tmp_path, 70, 67, 130, slopes, inters, unsigned)
    from medseg.data.dicom import headers, pixels

    def no_pydicom(*args: object, **kwargs: object) -> None:
        raise AssertionError("native pixel data must not go through pydicom")

    monkeypatch.setattr(pixels, "read_pydicom", no_pydicom)
    monkeypatch.setattr(pixels, "read_sitk", no_pydicom)
    arr, meta = load(tmp_path)
    assert arr.shape == (130, 67, 70) and arr.flags.c_contiguous and str(arr.dtype) == dtype
    for k, f in enumerate(meta["dicom_source_files"]):
        ds = pydicom.dcmread(f)
        assert float(ds.ImagePositionPatient[2]) == 2.0 * k
        expected = ds.pixel_array.T.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(arr[:, :, k], expected.astype(dtype))
    # the frame is read from the offset the header scan found, straight into the caller's buffer
    (first,), reason = headers.scan_file(meta["dicom_source_files"][0])
    assert reason is None and first.pixel_offset is not None
    buf = np.empty((67, 130), np.uint16 if unsigned else np.int16)
    assert pixels.read_native(first, buf) is buf
    np.testing.assert_array_equal(buf, pydicom.dcmread(first.path).pixel_array)
