"""The I/O boundary: every input is read once, by the reader meant for it, or its case fails with a message
naming the file and the cause; the rest of the batch goes on. Faulty inputs as a hospital export has them,
built from the project's sample data and pydicom's bundled test files, through the real ``unet_ct_3d``
pipeline (a small override, see ``conftest.ct_bundle``) and ``medseg predict``'s command line."""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage
from pydicom.data import get_testdata_file

from medseg.data import DicomReader, MatReader, ReadError, StrictLoadImage, StrictLoadImaged
from medseg.data.formats import FORMATS, format_of, image_suffixes, strip_suffix, suffix_of
from medseg.predict import BatchPredictor, discover_cases, merge_reports, read_report

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "sample_data" / "ct_3d"
MAT = ROOT / "sample_data" / "brain_mri_mat" / "1.mat"
GOOD_NIFTI = CT / "images" / "case_001.nii.gz"


def _predict(bundle: Path, src: Path, out: Path, **kwargs: object) -> dict[str, object]:
    configs = [str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "tiny.json")]
    p = BatchPredictor.from_bundle(bundle, out, config_file=configs, progress=False, **kwargs)
    return {r.id: r for r in p.run(src)}


def _cli(bundle: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "medseg", "predict", "--bundle", str(bundle), "--config-file",
           str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "tiny.json"), "--no-progress",
           *args]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _with_good_case(folder: Path) -> None:
    shutil.copy(GOOD_NIFTI, folder / "good.nii.gz")


def _assert_good_ok(rows: dict[str, object]) -> None:
    assert rows["good"].status == "ok", rows["good"].error


# ------------------------------------------------------------------------------------ format table
def test_one_format_table_decides_what_a_path_is(tmp_path: Path) -> None:
    assert format_of("a/b.NII.GZ").name == "nifti" and suffix_of("x.nii.gz") == ".nii.gz"
    assert strip_suffix("scan.nii.gz") == "scan" and strip_suffix("notes.txt") == "notes.txt"
    assert format_of("report.json") is None and format_of("list.txt") is None
    assert set(image_suffixes("dicom")) == {".dcm", ".dicom", ".dic", ".ima"}
    assert len({s for f in FORMATS for s in f.suffixes}) == sum(
        len(f.suffixes) for f in FORMATS
    )  # no overlap
    uid_named = tmp_path / "1.2.840.113619.2.55"  # PACS exports name files by UID, without a suffix
    shutil.copy(get_testdata_file("CT_small.dcm"), uid_named)
    assert format_of(uid_named).name == "dicom"
    (tmp_path / "plain").write_bytes(b"\0" * 200)
    assert format_of(tmp_path / "plain") is None
    os.mkfifo(tmp_path / "pipe")  # never opened (opening a FIFO for reading blocks)
    assert format_of(tmp_path / "pipe") is None


# --------------------------------------------------------------------------------- strict loading
def test_explicit_reader_failure_is_not_replaced_by_another_reader(tmp_path: Path) -> None:
    """MONAI's LoadImage(reader=R) falls back to other readers when R raises; StrictLoadImage(d) does not."""
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "rtdose.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path)
    absent = DicomReader(series_uid="1.2.3.4.5")
    with pytest.raises(ReadError, match=r"1\.2\.3\.4\.5.*(not|absent)"):
        StrictLoadImage(reader=absent)(tmp_path)
    with pytest.raises(ReadError, match="no field 'cjdata/nosuchfield'"):
        StrictLoadImage(reader=MatReader(field="cjdata/nosuchfield"))(MAT)
    with pytest.raises(ReadError, match="no field"):
        StrictLoadImaged("image", reader=MatReader(field="cjdata/nosuchfield"))({"image": str(MAT)})
    # the designated reader's result when it succeeds; other formats still get their own reader
    img = StrictLoadImage(reader=MatReader(field="cjdata/image"), image_only=True)(MAT)
    assert tuple(img.shape) == (512, 512)
    nii = StrictLoadImage(reader=MatReader(field="cjdata/image"), image_only=True)(GOOD_NIFTI)
    assert tuple(nii.shape) == tuple(nib.load(GOOD_NIFTI).shape)
    # plain MONAI (documented behaviour we guard against): another reader answers instead
    fallback = LoadImage(reader=MatReader(field="cjdata/nosuchfield"), image_only=True)(MAT)
    assert tuple(fallback.shape) == (512, 512)


def test_tiny_file_declaring_a_huge_image_fails_before_allocating(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 1024))
    hdr.set_data_dtype(np.int16)
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))
    assert bomb.stat().st_size < 100
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ReadError, match=r"bomb\.nii\.gz: the header declares 8192 MiB"):
        StrictLoadImage(image_only=True)(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing allocated


# --------------------------------------------------------------------------- the batch, bad inputs
def test_dicom_series_with_a_missing_slice_fails_its_case(ct_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    series = src / "patient" / "series"
    shutil.copytree(CT / "dicom" / "case_000", series)
    slices = sorted(series.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    slices[len(slices) // 2].unlink()  # one slice gone from the middle
    _with_good_case(src)
    rows = _predict(ct_bundle, src, tmp_path / "out")
    row = rows["patient__series"]
    assert row.status == "failed" and "patient/series" in row.error
    assert "gap" in row.error or "missing" in row.error or "spacing" in row.error, row.error
    assert not list((tmp_path / "out").glob("patient__series*"))  # no output for it
    _assert_good_ok(rows)


def test_folder_of_mixed_objects_never_gives_a_case_another_objects_grid(
    ct_bundle: Path, tmp_path: Path
) -> None:
    """Two MR files of one series (same slice, two compressions) and an RT dose in one folder: the MR
    case is the MR or fails; it never comes back on the dose grid (10x10x15)."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "rtdose.dcm"):
        shutil.copy(get_testdata_file(name), src)
    _with_good_case(src)
    rows = _predict(ct_bundle, src, tmp_path / "out", min_tile_fraction=0)
    dose = (
        nib.load(tmp_path / "out" / f"{rows['rtdose'].id}_seg.nii.gz")
        if rows["rtdose"].status == "ok"
        else None
    )
    mr = [r for cid, r in rows.items() if cid.startswith("MR_small")]
    assert len(mr) == 1
    if mr[0].status == "ok":
        out = nib.load(tmp_path / "out" / f"{mr[0].id}_seg.nii.gz")
        assert out.shape[:2] == (64, 64) and (dose is None or out.shape != dose.shape)
    else:
        assert "MR_small" in mr[0].error or "position" in mr[0].error, mr[0].error
        assert "10x10" not in mr[0].error
    _assert_good_ok(rows)


def test_mat_file_without_the_image_field_fails_not_segments_the_mask(tmp_path: Path) -> None:
    """A figshare .mat without cjdata/image: the brain bundle's reader must not take another field."""
    import h5py

    bundle = ROOT / "bundles" / "unet_brain_tumor_mri"
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    load = config["preprocessing"]["transforms"][0]
    assert load["_target_"] == "medseg.data.StrictLoadImaged"
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    loader = parser.get_parsed_content("preprocessing#transforms#0")
    broken = tmp_path / "no_image.mat"
    shutil.copy(MAT, broken)
    with h5py.File(broken, "a") as f:
        del f["cjdata/image"]
    with pytest.raises(ReadError, match=r"no_image\.mat.*cjdata/image"):
        loader({"image": str(broken)})


def test_fifo_and_special_files_are_failed_rows_not_a_hang(ct_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    os.mkfifo(src / "stuck.nii.gz")
    os.mkfifo(src / "1.2.840.99")  # suffix-less, as a DICOM file would be named
    _with_good_case(src)
    t0 = time.monotonic()
    rows = _predict(ct_bundle, src, tmp_path / "out")
    assert time.monotonic() - t0 < 120
    for cid in ("stuck", "1-2-840-99"):
        assert rows[cid].status == "failed" and "not a regular file" in rows[cid].error, rows[cid]
    _assert_good_ok(rows)


def test_output_folder_equal_to_input_is_refused_and_one_inside_is_not_rediscovered(
    ct_bundle: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    _with_good_case(src)
    proc = _cli(ct_bundle, "--input", str(src), "--output", str(src))
    assert proc.returncode == 2 and "output folder is the input folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(src.glob("*_seg.nii.gz"))
    inside = src / "results"
    for _ in range(2):  # a second run must not find the first run's masks as new cases
        proc = _cli(ct_bundle, "--input", str(src), "--output", str(inside))
        assert proc.returncode == 0, proc.stderr
    _, rows = read_report(str(inside / "report.json"))
    assert [r.id for r in rows] == ["good"] and rows[0].status == "skipped"


def test_unwritable_output_folder_is_exit_2_with_one_line(ct_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    _with_good_case(src)
    (tmp_path / "a_file").write_text("x")
    proc = _cli(ct_bundle, "--input", str(src), "--output", str(tmp_path / "a_file" / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert (
        len(lines) == 1 and "cannot write to the output folder" in lines[0] and "Traceback" not in proc.stderr
    )


def test_merge_reports_takes_the_newest_complete_split_and_keeps_its_failure(
    ct_bundle: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    _with_good_case(src)
    shutil.copy(GOOD_NIFTI, src / "good2.nii.gz")
    out = tmp_path / "out"
    for i in range(3):  # an old, complete 3-way split, all ok
        assert _cli(ct_bundle, "--input", str(src), "--output", str(out), "--shard", f"{i}/3").returncode == 0
    time.sleep(1.1)
    (src / "bad.nii.gz").write_bytes(b"not a nifti file at all" * 10)  # then the data changed
    codes = [_cli(ct_bundle, "--input", str(src), "--output", str(out), "--shard", f"{i}/2").returncode
             for i in range(2)]  # fmt: skip
    assert sorted(codes) == [0, 1]
    code, problems = merge_reports(str(out))
    assert code == 1 and any("newest complete 2-way" in p for p in problems), problems
    summary, rows = read_report(str(out / "report.json"))
    assert {r.id: r.status for r in rows}["bad"] == "failed" and summary["merged_shards"] == "2/2"


def test_messages_name_the_file_and_cause_never_a_transform_object(ct_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "empty.mat").write_bytes(b"")
    (src / "text.mat").write_text("this is not a MATLAB file\n" * 20)
    shutil.copy(MAT, src / "v73_truncated.mat")
    with open(src / "v73_truncated.mat", "r+b") as fh:
        fh.truncate(os.path.getsize(MAT) // 3)
    shutil.copy(MAT, src / "slice2d.mat")  # a 2-D image for the 3-D model: fails in Orientationd / checks
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 1024))
    hdr.set_data_dtype(np.int16)
    (src / "bomb.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))
    _with_good_case(src)
    rows = _predict(ct_bundle, src, tmp_path / "out")
    for cid, r in rows.items():
        if cid == "good":
            continue
        assert r.status == "failed"
        assert cid.split("__")[-1] in r.error or Path(r.input).name in r.error, r.error
        assert "object at 0x" not in r.error and "cannot find a suitable reader" not in r.error, r.error
        assert r.error.strip() and not r.error.rstrip().endswith("MemoryError:"), r.error
    assert "empty" in rows["empty"].error and "declares 8192 MiB" in rows["bomb"].error
    assert "MATLAB" in rows["text"].error or "not a .mat" in rows["text"].error, rows["text"].error
    _assert_good_ok(rows)


def test_discovery_scans_each_dicom_header_once(ct_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """The header scan of discovery travels with the case: the reader reads pixel data only."""
    import medseg.data.dicom.headers as headers

    src = tmp_path / "in"
    shutil.copytree(CT / "dicom" / "case_000", src / "series")
    calls: list[str] = []
    real = headers.scan_file

    def counting(path: str):  # noqa: ANN202
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(headers, "scan_file", counting)
    cases = discover_cases(src)
    n_files = len(list((src / "series").glob("*.dcm")))
    assert len(calls) == n_files and len(cases) == 1 and len(cases[0].headers) == n_files
    configs = [str(ct_bundle / "configs" / "inference.json"), str(ct_bundle / "configs" / "tiny.json")]
    p = BatchPredictor.from_bundle(ct_bundle, tmp_path / "out", config_file=configs, progress=False)
    rows = p.run(src, cases=cases)
    assert rows[0].status == "ok", rows[0].error
    assert len(calls) == n_files  # no second header read
