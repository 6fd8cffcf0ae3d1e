"""The committed sample datasets are valid, consistent, and exactly what the generator writes.

Every file is opened with an independent reader (PIL, h5py, scipy.io, pydicom, SimpleITK,
nibabel), not with medseg's own readers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import scipy.io
import SimpleITK as sitk
from matplotlib.path import Path as PolygonPath
from PIL import Image
from scipy import ndimage

from medseg.data.matlab_writer import write_mat_v5, write_mat_v73
from medseg.data.sample_data import DATASETS, generate_sample_data

ROOT = Path(__file__).resolve().parents[1] / "sample_data"
SPLITS = ("training", "validation", "test")


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def _datalist(name: str) -> dict[str, list[dict[str, str]]]:
    return json.loads((ROOT / name / "datalist.json").read_text())


def _entries(name: str) -> Iterator[tuple[str, dict[str, str]]]:
    for split, items in _datalist(name).items():
        for item in items:
            yield split, item


# ----------------------------------------------------------------------------- content of a file
def _h5_content(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"__userblock__": path.read_bytes()[:512]}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: Any) -> None:
            attrs = {k: obj.attrs[k] for k in sorted(obj.attrs)}
            if "MATLAB_fields" in attrs:
                attrs["MATLAB_fields"] = [bytes(b"".join(x)) for x in attrs["MATLAB_fields"]]
            out[name] = (obj[()] if isinstance(obj, h5py.Dataset) else None, attrs)

        f.visititems(visit)
    return out


def _content(path: Path) -> Any:
    """A comparable rendering of a file's content (arrays, geometry, metadata; no container bytes)."""
    name = path.name
    if name.endswith(".png"):
        return np.asarray(Image.open(path))
    if name.endswith(".mat"):
        if h5py.is_hdf5(path):
            return _h5_content(path)
        return scipy.io.loadmat(path)
    if name.endswith(".dcm"):
        ds = pydicom.dcmread(path)
        return {"meta": ds.file_meta, "dataset": ds}
    if name.endswith(".nii.gz"):
        img = nib.load(path)
        return {"header": img.header.binaryblock, "data": np.asarray(img.dataobj)}
    return path.read_bytes()


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.dtype == object:
            _assert_same(list(a.ravel()), list(b.ravel()), where)
        elif a.dtype.names:
            for field in a.dtype.names:
                _assert_same(a[field], b[field], f"{where}.{field}")
        else:
            assert np.array_equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("regen")
    written = generate_sample_data(out, seed=0)
    assert written == [out / n for n in DATASETS]
    return out


def test_dataset_names() -> None:
    assert DATASETS == ("nuclei_2d", "brain_mri_mat", "ct_3d")
    with pytest.raises(ValueError, match="unknown sample dataset"):
        generate_sample_data("/nonexistent-never-written", ["nope"])


@pytest.mark.parametrize("name", DATASETS)
def test_regeneration_equals_committed(name: str, regenerated: Path) -> None:
    committed, fresh = ROOT / name, regenerated / name
    files = _files(committed)
    assert files == _files(fresh)
    for rel in files:
        _assert_same(_content(committed / rel), _content(fresh / rel), f"{name}/{rel}")


def test_regeneration_is_bit_identical(regenerated: Path, tmp_path: Path) -> None:
    """Two runs on one machine give the same bytes: no time stamps, no unseeded randomness."""
    a = regenerated / "nuclei_2d"
    b = generate_sample_data(tmp_path, ["nuclei_2d"], seed=0)[0]
    assert _files(a) == _files(b)
    assert all((a / r).read_bytes() == (b / r).read_bytes() for r in _files(a))
    c = generate_sample_data(tmp_path, ["nuclei_2d"], seed=1)[0]  # replaces the folder
    assert c == b and not list(tmp_path.glob(".*"))
    assert (a / "images/nuclei_00.png").read_bytes() != (c / "images/nuclei_00.png").read_bytes()


@pytest.mark.parametrize("name", DATASETS)
def test_datalist_and_readme(name: str) -> None:
    datalist = _datalist(name)
    assert sorted(datalist) == sorted(SPLITS) and all(datalist[s] for s in SPLITS)
    seen: list[str] = []
    for _, item in _entries(name):
        for key in ("image", "label"):
            assert (ROOT / name / item[key]).is_file(), item[key]
        seen.append(item["image"])
    assert len(seen) == len(set(seen)), "an image is listed twice"
    readme = (ROOT / name / "README.md").read_text()
    assert f"medseg sample-data --out sample_data --datasets {name}" in readme


# ----------------------------------------------------------------------------- nuclei_2d
def _touching_instances(labels: np.ndarray) -> set[int]:
    touching: set[int] = set()
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:], labels[:-1])):
        m = (a > 0) & (b > 0) & (a != b)
        touching |= set(a[m].tolist()) | set(b[m].tolist())
    return touching


def test_nuclei_instances() -> None:
    n_touching = n_total = 0
    for _, item in _entries("nuclei_2d"):
        image = np.asarray(Image.open(ROOT / "nuclei_2d" / item["image"]))
        labels = np.asarray(Image.open(ROOT / "nuclei_2d" / item["label"]))
        assert image.dtype == np.uint8 and labels.dtype == np.uint16 and image.shape == labels.shape
        assert 256 <= min(image.shape) and max(image.shape) <= 512
        ids = np.unique(labels)
        assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, labels.max() + 1))  # instances 1..N
        assert labels.max() >= 40
        for i, box in enumerate(ndimage.find_objects(labels), start=1):  # each instance is one blob
            assert ndimage.label(labels[box] == i)[1] == 1
        fg = labels > 0
        assert image[fg].mean() > 3 * image[~fg].mean()  # separable, as fluorescence is
        n_touching += len(_touching_instances(labels))
        n_total += int(labels.max())
    assert 0.15 * n_total <= n_touching <= 0.8 * n_total


# ----------------------------------------------------------------------------- brain_mri_mat
def _mat_files() -> list[Path]:
    return sorted((ROOT / "brain_mri_mat").glob("*.mat"), key=lambda p: int(p.stem))


def _read_cjdata(path: Path) -> dict[str, Any]:
    """``cjdata`` in MATLAB orientation, from either format, with independent readers."""
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            g = f["cjdata"]
            return {
                "image": g["image"][()].T,
                "label": float(g["label"][0, 0]),
                "PID": g["PID"][()].T.ravel().astype(np.uint16).tobytes().decode("utf-16-le"),
                "tumorBorder": g["tumorBorder"][()].T,
                "tumorMask": g["tumorMask"][()].T.astype(bool),
            }
    c = scipy.io.loadmat(path)["cjdata"][0, 0]
    return {
        "image": c["image"],
        "label": float(c["label"][0, 0]),
        "PID": str(c["PID"][0]),
        "tumorBorder": c["tumorBorder"],
        "tumorMask": c["tumorMask"].astype(bool),
    }


def test_brain_v73_layout() -> None:
    v73 = [p for p in _mat_files() if h5py.is_hdf5(p)]
    assert len(v73) >= 10
    for path in v73:
        head = path.read_bytes()[:512]
        assert head.startswith(b"MATLAB 7.3 MAT-file") and b"HDF5 schema 1.00" in head[:116]
        assert head[124:128] == b"\x00\x02IM"
        with h5py.File(path, "r") as f:
            assert f.userblock_size == 512
            g = f["cjdata"]
            assert isinstance(g, h5py.Group) and g.attrs["MATLAB_class"] == b"struct"
            fields = sorted(b"".join(x).decode() for x in g.attrs["MATLAB_fields"])
            assert fields == ["PID", "image", "label", "tumorBorder", "tumorMask"]
            expect = {"image": (b"int16", np.int16), "label": (b"double", np.float64)}
            expect |= {"PID": (b"char", np.uint16), "tumorBorder": (b"double", np.float64)}
            expect |= {"tumorMask": (b"logical", np.uint8)}
            for key, (cls, dtype) in expect.items():
                assert g[key].attrs["MATLAB_class"] == cls and g[key].dtype == dtype, key
            assert g["PID"].attrs["MATLAB_int_decode"] == 2
            assert g["tumorMask"].attrs["MATLAB_int_decode"] == 1
            assert g["image"].shape == (512, 512) and g["label"].shape == (1, 1)
            assert g["PID"].shape[1] == 1  # 1xN char, stored transposed
            assert g["tumorBorder"].shape[0] == 1  # 2Kx1 double, stored transposed: [0] is the vector
            assert set(np.unique(g["tumorMask"][()])) <= {0, 1}


def test_brain_v5_files_have_the_same_struct() -> None:
    v5 = [p for p in _mat_files() if not h5py.is_hdf5(p)]
    assert len(v5) >= 2
    for path in v5:
        assert path.read_bytes()[:19] == b"MATLAB 5.0 MAT-file"
        c = scipy.io.loadmat(path)["cjdata"][0, 0]
        assert sorted(c.dtype.names) == ["PID", "image", "label", "tumorBorder", "tumorMask"]
        assert c["image"].dtype == np.int16 and c["image"].shape == (512, 512)
        assert c["tumorMask"].shape == (512, 512) and c["label"].shape == (1, 1)


def test_brain_content_and_border() -> None:
    """Mask = pixels whose centre lies inside tumorBorder (x = column, y = row, 1-based)."""
    rr, cc = np.mgrid[0:512, 0:512]
    centres = np.stack([cc.ravel() + 1.0, rr.ravel() + 1.0], axis=1)
    for path in _mat_files():
        d = _read_cjdata(path)
        assert d["image"].dtype == np.int16 and d["label"] in (1.0, 2.0, 3.0)
        assert d["PID"].isdigit()
        border = d["tumorBorder"]
        assert border.shape[1] == 1 and border.shape[0] % 2 == 0
        xy = border[:, 0].reshape(-1, 2)
        inside = PolygonPath(xy).contains_points(centres).reshape(512, 512)
        mask = d["tumorMask"]
        assert mask.sum() > 500
        assert (inside != mask).sum() <= 0.01 * mask.sum(), path.name
        # the tumour is brighter than the rest of the brain (learnable), and the image is a head
        assert np.median(d["image"][mask]) > 1.5 * np.median(d["image"][d["image"] > 100])


def test_brain_split_by_patient() -> None:
    pids: dict[str, set[str]] = {s: set() for s in SPLITS}
    for split, item in _entries("brain_mri_mat"):
        assert item["image"] == item["label"]
        assert _read_cjdata(ROOT / "brain_mri_mat" / item["image"])["PID"] == item["pid"]
        pids[split].add(item["pid"])
    assert all(pids.values())
    assert not (pids["training"] & pids["validation"] or pids["training"] & pids["test"])
    assert not pids["validation"] & pids["test"]
    listed = {item["image"] for _, item in _entries("brain_mri_mat")}
    assert listed == {p.name for p in _mat_files()}


# ----------------------------------------------------------------------------- ct_3d
def _series(case_dir: Path) -> list[tuple[Path, pydicom.Dataset]]:
    return [(p, pydicom.dcmread(p)) for p in sorted(case_dir.iterdir())]


def _cases() -> list[dict[str, str]]:
    return [item for _, item in _entries("ct_3d")]


@pytest.mark.parametrize("item", _cases(), ids=lambda it: Path(it["dicom"]).name)
def test_ct_dicom_series_geometry(item: dict[str, str]) -> None:
    series = _series(ROOT / "ct_3d" / item["dicom"])
    assert len(series) >= 48
    first = series[0][1]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert len({getattr(ds, key) for _, ds in series}) == 1, key
    assert len({ds.SOPInstanceUID for _, ds in series}) == len(series)
    for _, ds in series:
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageOrientationPatient) == list(first.ImageOrientationPatient)
        assert list(ds.PixelSpacing) == list(first.PixelSpacing)
        assert (ds.Rows, ds.Columns) == (128, 128)
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float)) for _, ds in series])
    order = np.argsort(pos)
    steps = np.diff(pos[order])
    assert np.allclose(steps, float(first.SliceThickness), atol=1e-3)  # no gaps, spacing as declared
    assert np.allclose(steps, float(first.SpacingBetweenSlices), atol=1e-3)
    assert float(first.PixelSpacing[0]) < float(first.SliceThickness)  # anisotropic
    # neither name order nor InstanceNumber order is position order
    assert not np.array_equal(order, np.arange(len(series)))
    inst = np.array([int(ds.InstanceNumber) for _, ds in series])
    assert np.array_equal(np.sort(inst), np.arange(1, len(series) + 1))
    assert np.all(np.diff(pos[np.argsort(inst)]) < 0)  # InstanceNumber 1 is the top slice
    # HU range of a CT: air, and bone
    hu = np.stack([ds.pixel_array.astype(np.int32) - 1024 for _, ds in series])
    assert hu.min() <= -990 and hu.max() >= 500


@pytest.mark.parametrize("item", _cases(), ids=lambda it: Path(it["dicom"]).name)
def test_ct_sitk_series_equals_nifti(item: dict[str, str]) -> None:
    folder = ROOT / "ct_3d" / item["dicom"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    series = reader.Execute()
    nifti = sitk.ReadImage(str(ROOT / "ct_3d" / item["image"]))
    label = sitk.ReadImage(str(ROOT / "ct_3d" / item["label"]))
    arr = sitk.GetArrayFromImage(series)
    assert np.array_equal(arr, sitk.GetArrayFromImage(nifti))
    for img in (nifti, label):  # SimpleITK gives both in LPS
        assert img.GetSize() == series.GetSize()
        assert np.allclose(img.GetOrigin(), series.GetOrigin(), atol=1e-4)
        assert np.allclose(img.GetSpacing(), series.GetSpacing(), atol=1e-5)
        assert np.allclose(img.GetDirection(), series.GetDirection(), atol=1e-6)
    # nibabel: RAS affine of the DICOM geometry, identical for image and label
    img_nib, lab_nib = nib.load(ROOT / "ct_3d" / item["image"]), nib.load(ROOT / "ct_3d" / item["label"])
    assert np.array_equal(img_nib.affine, lab_nib.affine) and img_nib.shape == lab_nib.shape
    origin = np.array(series.GetOrigin()) * [-1, -1, 1]
    spacing = np.array(series.GetSpacing())
    expect = np.diag([*(spacing * [-1, -1, 1]), 1.0])
    expect[:3, 3] = origin
    assert np.allclose(img_nib.affine, expect, atol=1e-4)
    assert nib.aff2axcodes(img_nib.affine) == ("L", "P", "S")
    assert np.array_equal(np.asarray(img_nib.dataobj).transpose(2, 1, 0), arr)
    lab = np.asarray(lab_nib.dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1}
    assert ndimage.label(lab)[1] == 1 and 0.02 < lab.mean() < 0.3  # one organ, a sizeable one
    hu = np.asarray(img_nib.dataobj)
    ring = ndimage.binary_dilation(lab > 0, iterations=2) & (lab == 0)
    assert np.median(hu[lab > 0]) - np.median(hu[ring]) > 40  # organ stands out from its surroundings


# ----------------------------------------------------------------------------- MATLAB writer
def test_matlab_writer_orientation_and_types(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    v = {"s": {"a": a, "t": "hé", "m": a > 4, "x": 2.5}}
    write_mat_v73(tmp_path / "a.mat", v)
    write_mat_v5(tmp_path / "b.mat", v)
    with h5py.File(tmp_path / "a.mat", "r") as f:
        assert f["s/a"].shape == (4, 3) and np.array_equal(f["s/a"][()].T, a)  # column-major
        assert f["s/t"][()].T.tobytes().decode("utf-16-le") == "hé"
        assert np.array_equal(f["s/m"][()].T, a > 4) and f["s/x"][()].shape == (1, 1)
    s = scipy.io.loadmat(tmp_path / "b.mat")["s"][0, 0]
    assert np.array_equal(s["a"], a) and str(s["t"][0]) == "hé" and s["x"][0, 0] == 2.5
    with pytest.raises(TypeError, match="cannot write"):
        write_mat_v73(tmp_path / "c.mat", {"z": np.array([1j])})
    assert not (tmp_path / "c.mat").exists() and not list(tmp_path.glob(".*part"))
