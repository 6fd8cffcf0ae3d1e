"""The DICOM package's modules: header scan once, strict series choice, special files, gaps."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

import medseg  # noqa: F401  (registers the readers with LoadImage)
from medseg.data import DicomReader, ReadError, SliceHeader, scan_file
from medseg.data.dicom import headers as headers_module

DIRS = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"
CT5N = DIRS / "98892001" / "CT5N"  # 5 slices, explicit VR little endian
GAPPED = DIRS / "77654033" / "CT2"  # a missing slice


def load(path: os.PathLike | str, **kwargs: object) -> tuple[np.ndarray, dict]:
    reader = DicomReader(**kwargs)  # type: ignore[arg-type]
    return reader.get_data(reader.read(str(path)))


def scan_all(paths: list[Path]) -> list[SliceHeader]:
    out: list[SliceHeader] = []
    for p in paths:
        slices, reason = scan_file(str(p))
        assert reason is None, reason
        out.extend(slices)
    return out


def _uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID)


@pytest.fixture
def two_series(tmp_path: Path) -> Path:
    """A folder holding the 5-slice CT5N and the gapped 4-slice CT2 series, nested."""
    for sub in ("98892001/CT5N", "77654033/CT2"):
        shutil.copytree(DIRS / sub, tmp_path / "export" / sub.replace("/", "_"))
    return tmp_path / "export"


def test_scan_file_public_header() -> None:
    (s,), reason = scan_file(get_testdata_file("CT_small.dcm"))
    assert reason is None and isinstance(s, SliceHeader)
    assert (s.rows, s.cols, s.n_frames, s.frame, s.samples, s.bits) == (128, 128, 1, 0, 1, 16)
    assert s.position is not None and s.position.shape == (3,) and s.orientation.shape == (6,)
    assert s.tags["Modality"] == "CT" and "PatientName" not in s.tags and s.pixel_offset > 0
    frames, reason = scan_file(get_testdata_file("rtdose.dcm"))
    assert reason is None and [f.frame for f in frames] == list(range(15))
    assert scan_file(__file__) == ([], "not a DICOM file")


def test_absent_series_uid_raises_and_lists_the_series(two_series: Path) -> None:
    asked = "1.2.826.0.1.3680043.99.1"
    patient = str(pydicom.dcmread(next(CT5N.iterdir())).PatientName)
    with pytest.raises(ReadError) as err:
        load(two_series, series_uid=asked)
    msg = str(err.value)
    assert str(two_series) in msg and asked in msg and "not in the folder" in msg
    assert _uid(CT5N) in msg and _uid(GAPPED) in msg
    assert "CT" in msg and "5 image(s)" in msg and "4 image(s)" in msg
    assert patient and patient not in msg
    # the same with pre-scanned headers, and for a single file of another series
    scanned = scan_all(sorted(p for p in two_series.rglob("*") if p.is_file()))
    with pytest.raises(ReadError, match="not in the folder") as err:
        load(two_series, series_uid=asked, headers=scanned)
    assert _uid(CT5N) in str(err.value)
    one = next(CT5N.iterdir())
    with pytest.raises(ReadError, match="is not in the file") as err:
        load(one, series_uid=asked)
    assert str(one) in str(err.value) and _uid(CT5N) in str(err.value)


@pytest.mark.parametrize(
    "folder",
    [CT5N, Path(__file__).resolve().parents[1] / "sample_data" / "ct_3d" / "dicom" / "case_000"],
    ids=["CT5N", "sample_ct"],
)
def test_headers_are_not_read_again(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    ref, ref_meta = load(folder)
    scanned = scan_all(sorted(folder.iterdir()))

    def no_header_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a header was read again")

    monkeypatch.setattr(headers_module, "scan_file", no_header_read)
    monkeypatch.setattr(pydicom, "dcmread", no_header_read)
    reader = DicomReader(headers=scanned, recursive=False)
    arr, meta = reader.get_data(reader.read(str(folder)))
    assert arr.dtype == ref.dtype and np.array_equal(arr, ref)
    np.testing.assert_allclose(meta["affine"], ref_meta["affine"])
    assert meta["dicom_source_files"] == ref_meta["dicom_source_files"]
    assert meta["dicom_series_uid"] == ref_meta["dicom_series_uid"]


def test_headers_of_a_multiframe_file() -> None:
    path = get_testdata_file("rtdose.dcm")
    ref, ref_meta = load(path)
    frames, _ = scan_file(path)
    arr, meta = load(path, headers=frames)
    assert np.array_equal(arr, ref) and meta["dicom_source_frames"] == list(range(1, 16))
    np.testing.assert_allclose(meta["affine"], ref_meta["affine"])
    with pytest.raises(ValueError, match="one input"):
        DicomReader(headers=frames).read([path, path])
    with pytest.raises(ValueError, match="not both"):
        DicomReader(headers=frames, files=[path])
    with pytest.raises(ReadError, match="no DICOM image headers"):
        load(path, headers=[])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_never_opened(tmp_path: Path) -> None:
    fifos = [tmp_path / "scan.dcm", tmp_path / "noext"]
    for f in fifos:
        os.mkfifo(f)
    results: dict[str, object] = {}

    def check() -> None:
        reader = DicomReader()
        results["verify"] = [reader.verify_suffix(str(f)) for f in fifos]
        try:
            reader.read(str(fifos[0]))
        except ReadError as e:
            results["read"] = str(e)
        folder = tmp_path / "series"
        shutil.copytree(CT5N, folder)
        os.mkfifo(folder / "zz_fifo.dcm")  # a FIFO among the slices: left out of the listing
        results["shape"] = load(folder)[0].shape

    worker = threading.Thread(target=check, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "a FIFO was opened (the call blocked)"
    assert results["verify"] == [False, False]
    assert "FIFO" in str(results["read"]) and str(fifos[0]) in str(results["read"])
    assert results["shape"] == (16, 16, 5)


def test_gap_still_raises(two_series: Path) -> None:
    for kwargs in ({}, {"headers": scan_all(sorted(GAPPED.iterdir()))}):
        with pytest.raises(ReadError) as err:
            load(GAPPED, **kwargs)
        msg = str(err.value)
        assert (
            str(GAPPED) in msg and "non-uniform slice spacing" in msg and "expected a step of 1.25 mm" in msg
        )
    with pytest.raises(ReadError, match="non-uniform slice spacing"):
        load(two_series, series_uid=_uid(GAPPED))
    assert load(GAPPED, on_gap="accept")[0].shape[2] == 4


def test_modes_are_validated_and_channels_stacked() -> None:
    with pytest.raises(ValueError, match="resample"):
        DicomReader(on_gap="interpolate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="simpleitk"):
        DicomReader(decoder="gdcm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accept"):
        DicomReader().read(str(CT5N), on_gap="ignore")
    path = get_testdata_file("MR_small.dcm")
    reader = DicomReader()
    arr, meta = reader.get_data(reader.read([path, path]))
    assert arr.shape == (2, 64, 64, 1) and meta["original_channel_dim"] == 0
    one = reader.get_data(reader.read(path))[0]
    assert np.array_equal(arr[0], one) and np.array_equal(arr[1], one)


def test_compatibility_module_reexports() -> None:
    import medseg.data.dicom_reader as old
    from medseg.data import formats
    from medseg.data.dicom import headers, reader

    assert old.DicomReader is reader.DicomReader and old.DicomVolume is reader.DicomVolume
    assert old.KEPT_TAGS is headers.KEPT_TAGS
    assert old.DICOM_SUFFIXES == formats.image_suffixes("dicom") == (".dcm", ".dicom", ".dic", ".ima")
