"""MatReader: MATLAB v5 and v7.3 files of the same data give the same arrays, fields by path, errors."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from monai.data import Dataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged, Spacingd

from medseg.data.errors import ReadError
from medseg.data.mat_reader import MatReader

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------------
# A minimal MATLAB v7.3 writer in MATLAB's own layout, so these tests do not depend on the project's
# writer: 512-byte user block with the MATLAB header text, MATLAB_class attributes, column-major
# storage (HDF5 dims reversed), char as uint16, logical as uint8, struct = group, cell = references.
# --------------------------------------------------------------------------------------------------
_CLASSES = {
    np.dtype(np.float64): "double",
    np.dtype(np.float32): "single",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int16): "int16",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.int32): "int32",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.int64): "int64",
    np.dtype(np.uint64): "uint64",
}


def _h5_value(parent: h5py.Group, name: str, val: Any, refs: h5py.Group) -> None:
    if isinstance(val, dict):
        g = parent.create_group(name)
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        for k, v in val.items():
            _h5_value(g, k, v, refs)
        return
    if isinstance(val, list):  # 1xN cell
        ref_list = []
        for i, item in enumerate(val):
            key = f"{name}_{id(val)}_{i}"
            _h5_value(refs, key, item, refs)
            ref_list.append(refs[key].ref)
        ds = parent.create_dataset(name, data=np.array(ref_list, dtype=h5py.ref_dtype).reshape(-1, 1))
        ds.attrs["MATLAB_class"] = np.bytes_("cell")
        return
    if isinstance(val, str):  # 1xN char -> HDF5 (N, 1) uint16
        data = np.frombuffer(val.encode("utf-16-le"), dtype="<u2").reshape(-1, 1)
        ds = parent.create_dataset(name, data=data)
        ds.attrs["MATLAB_class"] = np.bytes_("char")
        ds.attrs["MATLAB_int_decode"] = np.int32(2)
        return
    arr = np.atleast_2d(np.asarray(val))
    if arr.dtype == bool:
        ds = parent.create_dataset(name, data=arr.astype(np.uint8).T)
        ds.attrs["MATLAB_class"] = np.bytes_("logical")
        ds.attrs["MATLAB_int_decode"] = np.int32(1)
    else:
        ds = parent.create_dataset(name, data=arr.T)
        ds.attrs["MATLAB_class"] = np.bytes_(_CLASSES[arr.dtype])


def savemat73(path: str | os.PathLike[str], variables: dict[str, Any]) -> None:
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        for name, val in variables.items():
            _h5_value(f, name, val, refs)
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header.ljust(512, b"\x00"))


def savemat5(path: str | os.PathLike[str], variables: dict[str, Any]) -> None:
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            cell = np.empty((1, len(v)), dtype=object)
            for i, x in enumerate(v):
                cell[0, i] = conv(x)
            return cell
        return v

    scipy.io.savemat(path, {k: conv(v) for k, v in variables.items()})


# Non-square image, tumour in an asymmetric spot: a transposed or flipped read cannot pass.
ROWS, COLS = 40, 56
TUMOUR_ROWS, TUMOUR_COLS = slice(6, 14), slice(33, 47)


def figshare_like() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 300, size=(ROWS, COLS)).astype(np.int16)
    mask = np.zeros((ROWS, COLS), dtype=bool)
    mask[TUMOUR_ROWS, TUMOUR_COLS] = True
    image[mask] += 1000  # the tumour is bright
    border = np.array([[6.0, 33.0, 6.0, 46.0, 13.0, 46.0, 13.0, 33.0]])
    return {
        "cjdata": {"label": 2.0, "PID": "MR0421ë", "image": image, "tumorBorder": border, "tumorMask": mask}
    }


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    data = figshare_like()
    p73, p5 = tmp_path / "case_73.mat", tmp_path / "case_5.mat"
    savemat73(p73, data)
    savemat5(p5, data)
    return p73, p5, data


def test_fixture_is_v73_and_v5(pair: tuple[Path, Path, dict]) -> None:
    p73, p5, _ = pair
    assert scipy.io.matlab.matfile_version(str(p73))[0] == 2 and h5py.is_hdf5(p73)
    assert scipy.io.matlab.matfile_version(str(p5))[0] == 1
    with pytest.raises(NotImplementedError):  # scipy alone cannot read v7.3: the h5py path is needed
        scipy.io.loadmat(str(p73))


@pytest.mark.parametrize("which", [0, 1], ids=["v7.3", "v5"])
def test_image_and_mask_orientation(pair: tuple[Path, Path, dict], which: int) -> None:
    path, data = pair[which], pair[2]["cjdata"]
    img = LoadImage(reader=MatReader(field="cjdata/image"), image_only=True, dtype=None)(path)
    msk = LoadImage(reader=MatReader(field="cjdata/tumorMask"), image_only=True, dtype=None)(path)
    assert tuple(img.shape) == (ROWS, COLS) and img.dtype == torch.int16
    assert tuple(msk.shape) == (ROWS, COLS) and msk.dtype == torch.uint8
    np.testing.assert_array_equal(img.numpy(), data["image"])
    rows, cols = np.nonzero(msk.numpy())
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (6, 14, 33, 47)
    assert img.numpy()[msk.numpy() > 0].min() >= 1000 > img.numpy()[msk.numpy() == 0].max()
    assert img.meta["mat_PID"] == "MR0421ë" and img.meta["mat_label"] == 2.0
    assert "mat_image" not in img.meta and "mat_tumorBorder" not in img.meta  # only small siblings
    assert img.meta["mat_file_version"] == ("7.3" if which == 0 else "5")
    assert img.meta["filename_or_obj"] == str(path)


def test_v73_equals_v5_for_every_kind(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = {
        "vol": rng.normal(size=(5, 7, 3)).astype(np.float32),  # 3-D: all axes must come back in order
        "seg": rng.integers(0, 2, size=(5, 7, 3)).astype(bool),
        "counts": rng.integers(0, 60000, size=(3, 9)).astype(np.uint16),
        "cases": [rng.normal(size=(4, 6)), "note"],
        "info": {"site": "Zürich", "n": np.int32(7)},
    }
    savemat73(tmp_path / "a73.mat", data)
    savemat5(tmp_path / "a5.mat", data)
    for field, dtype in [
        ("vol", np.float32),
        ("seg", np.uint8),
        ("counts", np.uint16),
        ("cases/0", np.float64),
    ]:
        a73, m73 = MatReader(field=field).get_data(MatReader(field=field).read(tmp_path / "a73.mat"))
        a5, m5 = MatReader(field=field).get_data(MatReader(field=field).read(tmp_path / "a5.mat"))
        np.testing.assert_array_equal(a73, a5)
        assert a73.dtype == dtype == a5.dtype, field
        assert tuple(m73["spatial_shape"]) == a5.shape
    expected = data["cases"][0]
    reader = MatReader()
    np.testing.assert_array_equal(
        reader.get_data(reader.read(tmp_path / "a73.mat", field="cases.0"))[0], expected
    )
    # siblings of a field inside a struct: char decoded (non-ASCII too), numeric scalar
    for p in ("a73.mat", "a5.mat"):
        with pytest.raises(ReadError, match="not a numeric array"):
            MatReader(field="info/site").read(tmp_path / p)
        _, meta = MatReader().get_data(MatReader(field="info/n").read(tmp_path / p))
        assert meta["mat_site"] == "Zürich"


def test_v4_file_and_reader_kwargs_through_loadimage(tmp_path: Path) -> None:
    arr = np.arange(35, dtype=np.float64).reshape(5, 7)
    scipy.io.savemat(tmp_path / "old.mat", {"img": arr, "other": np.ones((1, 1))}, format="4")
    assert scipy.io.matlab.matfile_version(str(tmp_path / "old.mat"))[0] == 0
    out, meta = MatReader().get_data(MatReader().read(tmp_path / "old.mat"))
    np.testing.assert_array_equal(out, arr)
    assert meta["mat_file_version"] == "4" and meta["mat_other"] == 1.0
    # LoadImage instantiates a reader class with its keyword arguments (bundle configs do this)
    img = LoadImage(reader=MatReader, field="img", image_only=True)(tmp_path / "old.mat")
    np.testing.assert_array_equal(img.numpy(), arr.astype(np.float32))


def test_same_file_image_and_label_in_a_datalist(pair: tuple[Path, Path, dict]) -> None:
    p73, p5, data = pair
    transform = Compose(
        [
            LoadImaged(keys="image", reader=MatReader(field="cjdata/image", pixdim=0.49)),
            LoadImaged(keys="label", reader=MatReader(field="cjdata/tumorMask", pixdim=0.49)),
            EnsureChannelFirstd(keys=["image", "label"]),
            Spacingd(keys=["image", "label"], pixdim=(0.98, 0.98), mode=("bilinear", "nearest")),
        ]
    )
    ds = Dataset([{"image": str(p), "label": str(p)} for p in (p73, p5)], transform=transform)
    out = [ds[0], ds[1]]
    for item in out:
        img, lab = item["image"], item["label"]
        assert tuple(img.shape) == (1, ROWS // 2, COLS // 2) == tuple(lab.shape)
        np.testing.assert_allclose(img.affine.numpy()[:2, :2], np.diag([0.98, 0.98]))
        np.testing.assert_allclose(lab.meta["original_affine"][:2, :2], np.diag([0.49, 0.49]))
        rows, cols = np.nonzero(lab[0].numpy() > 0)
        assert rows.min() >= 2 and rows.max() <= 7 and cols.min() >= 16 and cols.max() <= 24
        assert set(np.unique(lab.numpy())) == {0.0, 1.0}
    torch.testing.assert_close(out[0]["image"], out[1]["image"])
    torch.testing.assert_close(out[0]["label"], out[1]["label"])


def test_default_field_rule(tmp_path: Path, pair: tuple[Path, Path, dict]) -> None:
    for p in pair[:2]:  # figshare layout -> cjdata/image
        arr, meta = MatReader().get_data(MatReader().read(p))
        assert meta["mat_source_field"] == "cjdata/image" and arr.dtype == np.int16
    single = {"scan": {"pixels": np.ones((8, 9), np.uint8), "id": "x", "scale": 2.5}}
    savemat73(tmp_path / "one.mat", single)
    arr, meta = MatReader().get_data(MatReader().read(tmp_path / "one.mat"))
    assert meta["mat_source_field"] == "scan/pixels" and arr.shape == (8, 9)
    assert meta["mat_id"] == "x" and meta["mat_scale"] == 2.5
    savemat5(tmp_path / "two.mat", {"a": np.ones((4, 4)), "b": np.zeros((4, 5)), "v": np.ones((1, 9))})
    with pytest.raises(ReadError, match=r"2 image-like arrays \(a, b\).*MatReader\(field=") as e:
        MatReader().read(tmp_path / "two.mat")
    assert str(tmp_path / "two.mat") in str(e.value)


def test_multiple_files_stack_as_channels(pair: tuple[Path, Path, dict]) -> None:
    reader = MatReader(field="cjdata/image")
    arr, meta = reader.get_data(reader.read([pair[0], pair[1]]))
    assert arr.shape == (2, ROWS, COLS) and meta["original_channel_dim"] == 0
    assert tuple(meta["spatial_shape"]) == (ROWS, COLS)


def test_metadata_keys(pair: tuple[Path, Path, dict]) -> None:
    reader = MatReader(field="cjdata/image", pixdim=(0.49, 0.49, 6.0))
    arr, meta = reader.get_data(reader.read(pair[0]))
    assert np.isnan(meta["original_channel_dim"])  # MONAI's "no_channel"
    np.testing.assert_allclose(np.diag(meta["affine"]), [0.49, 0.49, 6.0, 1.0])
    np.testing.assert_array_equal(meta["spatial_shape"], arr.shape)
    _, meta = MatReader().get_data(MatReader().read(pair[1]))
    np.testing.assert_array_equal(meta["affine"], np.eye(4))
    assert MatReader().verify_suffix("a/b/case.mat") and MatReader().verify_suffix(["x.MAT", "y.mat"])
    assert not MatReader().verify_suffix("scan.nii.gz") and not MatReader().verify_suffix(["x.mat", "y.dcm"])
    with pytest.raises(ValueError, match="pixdim"):
        MatReader(pixdim=(0.5, -1.0))


# --------------------------------------------------------------------------------------------------
# Bad input -> ReadError naming the file and the reason
# --------------------------------------------------------------------------------------------------
def test_missing_and_non_numeric_fields(pair: tuple[Path, Path, dict]) -> None:
    for p in pair[:2]:
        with pytest.raises(ReadError, match=r"no field 'cjdata/tumourMask'.*available fields: ") as e:
            MatReader(field="cjdata/tumourMask").read(p)
        for listed in ("cjdata/tumorMask (40x56 ", "cjdata/label (1x1 double)", "cjdata/PID (1x7 char)"):
            assert listed in str(e.value)
        with pytest.raises(
            ReadError, match=r"'nothing' missing under the top level.*available fields: cjdata"
        ):
            MatReader(field="nothing/image").read(p)
        with pytest.raises(ReadError, match=r"'cjdata/PID' is .*char.*not a numeric array.*cjdata/image"):
            MatReader(field="cjdata/PID").read(p)
        with pytest.raises(ReadError, match=r"'cjdata' is .*struct"):
            MatReader(field="cjdata").read(p)


def test_not_a_mat_file_truncated_empty_nan(tmp_path: Path, pair: tuple[Path, Path, dict]) -> None:
    from pydicom.data import get_testdata_file

    dcm = get_testdata_file("CT_small.dcm")
    bad = tmp_path / "ct.mat"
    shutil.copy(dcm, bad)
    text = tmp_path / "notes.mat"
    text.write_text("just some text that is long enough to fill a MATLAB header " * 5)
    empty = tmp_path / "empty.mat"
    empty.write_bytes(b"")
    cases = {bad: "not a MATLAB .mat file", text: "not a MATLAB .mat file", empty: "not a MATLAB .mat file"}
    for src, name in ((pair[0], "trunc73.mat"), (pair[1], "trunc5.mat")):
        blob = src.read_bytes()
        (tmp_path / name).write_bytes(blob[: len(blob) * 2 // 3])
        cases[tmp_path / name] = "cannot read MATLAB"
    cases[tmp_path / "absent.mat"] = "no such file"
    for path, reason in cases.items():
        with pytest.raises(ReadError, match=reason) as e:
            MatReader(field="cjdata/image").read(path)
        assert e.value.path == str(path)
    nan = {"img": np.array([[1.0, np.nan], [np.inf, 4.0]])}
    savemat73(tmp_path / "nan73.mat", nan)
    savemat5(tmp_path / "nan5.mat", nan)
    savemat5(tmp_path / "emptyarr.mat", {"img": np.zeros((0, 3))})
    for p in ("nan73.mat", "nan5.mat"):
        with pytest.raises(ReadError, match="2 NaN/inf values"):
            MatReader().read(tmp_path / p)
        arr, _ = MatReader(allow_nonfinite=True).get_data(MatReader(allow_nonfinite=True).read(tmp_path / p))
        assert np.isnan(arr[0, 1]) and np.isinf(arr[1, 0])
    with pytest.raises(ReadError, match="is empty"):
        MatReader(field="img").read(tmp_path / "emptyarr.mat")


# --------------------------------------------------------------------------------------------------
# The project's sample data, when it has been generated
# --------------------------------------------------------------------------------------------------
SAMPLE_MATS = sorted(glob.glob(str(REPO / "sample_data" / "brain_mri_mat" / "**" / "*.mat"), recursive=True))


@pytest.mark.skipif(not SAMPLE_MATS, reason="sample_data/brain_mri_mat not generated")
def test_sample_data_mat_files() -> None:
    """v7.3 and v5 sample files: the enhancing tumour lies under the mask and on its tumorBorder outline."""
    from scipy import ndimage as ndi

    def read(path: str, field: str) -> tuple[np.ndarray, dict]:
        reader = MatReader(field=field)
        return reader.get_data(reader.read(path))

    versions = set()
    for path in SAMPLE_MATS:
        img, meta = read(path, "cjdata/image")
        msk, _ = read(path, "cjdata/tumorMask")
        border, _ = read(path, "cjdata/tumorBorder")
        versions.add(meta["mat_file_version"])
        assert img.shape == msk.shape == (512, 512) and img.dtype == np.int16 and msk.dtype == np.uint8
        assert set(np.unique(msk)) == {0, 1}
        assert (
            isinstance(meta["mat_PID"], str)
            and meta["mat_PID"].isdigit()
            and meta["mat_label"] in (1.0, 2.0, 3.0)
        )
        m = msk.astype(bool)
        # image and mask aligned: the tumour is brighter than a ring around it, and not when transposed
        contrast = []
        for mm in (m, m.T):
            ring = ndi.binary_dilation(mm, iterations=6) & ~mm
            contrast.append(img[mm].mean() - img[ring].mean())
        assert contrast[0] > 0.8 * img.std() and contrast[0] > contrast[1] + 100, path
        # the generator's outline ([x1 y1 x2 y2 ...], x = column, y = row, 1-based) follows the mask edge
        pts = np.asarray(border, dtype=float).reshape(-1, 2)
        rows, cols = np.rint(pts[:, 1]).astype(int) - 1, np.rint(pts[:, 0]).astype(int) - 1
        to_mask, to_background = ndi.distance_transform_edt(~m), ndi.distance_transform_edt(m)
        near_edge = (to_mask[rows, cols] <= 1.5) & (to_background[rows, cols] <= 1.5)
        assert near_edge.mean() > 0.9, path
    assert versions == {"7.3", "5"}
