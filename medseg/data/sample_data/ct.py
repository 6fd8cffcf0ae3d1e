"""``ct_3d``: abdominal-CT-like volumes with a liver-like organ, as DICOM series and NIfTI.

Each case is an axial CT of the upper abdomen at a coarse (downsampled) resolution: body outline
with skin/subcutaneous fat, muscle wall, visceral fat, spine (cortical and cancellous bone,
discs, canal), paraspinal muscles, aorta and IVC with contrast, kidneys, spleen, stomach with
air and fluid, bowel gas, lung bases, and the liver (the labelled organ) with a smooth, lobulated
boundary and enhancing vessels. Values are Hounsfield units with partial-volume blur and
correlated noise.

Geometry: 128x128 pixels, anisotropic voxels (in-plane 2.6-3.0 mm, slices 4 or 5 mm), standard
axial orientation (ImageOrientationPatient 1\\0\\0\\0\\1\\0), head-first supine. Instance numbers
run from the top slice down (decreasing z), as scanners usually number them, so InstanceNumber
order is the reverse of the position order; file names are random hex, unrelated to either.

The NIfTI copies hold the same voxels in ascending-z order (the order ITK/SimpleITK reads the
series in), with the RAS affine of the DICOM geometry: ``diag(-dx, -dy, dz)`` and the LPS origin
with x and y negated; labels share that affine exactly.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from medseg.data.sample_data._common import smooth_noise, write_json

N_CASES = 4
MATRIX = 128
SPLITS = {"training": (0, 1), "validation": (2,), "test": (3,)}
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESCALE_INTERCEPT = -1024
_PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])
#: fixed implementation UID/name so that the file meta is the same under pydicom 2.4 and 3.x
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["medseg sample-data implementation"])
IMPLEMENTATION_NAME = "MEDSEG_SAMPLE"


def _fmt(v: float) -> str:
    """A decimal string (DS) with at most 4 decimals, e.g. ``-174.6328``."""
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _geometry(rng: np.random.Generator) -> dict[str, Any]:
    fov = float(rng.choice([336.0, 350.0, 360.0, 376.0]))
    ps = fov / MATRIX  # exact binary fractions: 2.625, 2.734375, 2.8125, 2.9375
    st = float(rng.choice([4.0, 5.0]))
    depth = int(rng.choice([48, 52]))
    x0 = float(_fmt(-fov / 2 + ps / 2 + rng.uniform(-5, 5)))
    y0 = float(_fmt(-fov / 2 + ps / 2 + rng.uniform(-25, 0)))
    z_bottom = float(_fmt(rng.uniform(-420.0, -380.0) + 0.0))
    return {"ps": ps, "st": st, "depth": depth, "x0": x0, "y0": y0, "z0": z_bottom}


def _blob(
    X: np.ndarray,
    Y: np.ndarray,
    Z: np.ndarray,
    centre: tuple[float, float, float],
    axes: tuple[float, float, float],
) -> np.ndarray:
    return np.sqrt(
        ((X - centre[0]) / axes[0]) ** 2 + ((Y - centre[1]) / axes[1]) ** 2 + ((Z - centre[2]) / axes[2]) ** 2
    )


def make_case(rng: np.random.Generator, geo: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One case: (HU volume int16, liver mask uint8), both indexed ``[k, row, col]`` with k = ascending z."""
    d, ps, st = geo["depth"], geo["ps"], geo["st"]
    shape = (d, MATRIX, MATRIX)
    kk, rr, cc = np.meshgrid(np.arange(d), np.arange(MATRIX), np.arange(MATRIX), indexing="ij")
    X = geo["x0"] + cc * ps  # LPS: + is patient left
    Y = geo["y0"] + rr * ps  # + is posterior
    zext = (d - 1) * st
    T = kk / (d - 1)  # 0 = bottom slice, 1 = top slice
    Z = T * zext  # mm above the bottom slice

    bx, by = rng.uniform(-6, 6), rng.uniform(-4, 4)
    A = rng.uniform(140, 156) * (1 + 0.04 * np.sin(2.5 * T + rng.uniform(0, 6)))
    B = rng.uniform(100, 115) * (1 + 0.03 * np.sin(2.0 * T + rng.uniform(0, 6)))
    x, y = X - bx, Y - by
    e = np.sqrt((x / A) ** 2 + (y / B) ** 2)  # body outline at e = 1
    fat = rng.uniform(12, 24)
    in_fat = np.sqrt((x / (A - fat)) ** 2 + (y / (B - fat)) ** 2)
    in_cavity = np.sqrt((x / (A - fat - 10)) ** 2 + (y / (B - fat - 10)) ** 2)

    hu = np.full(shape, -1000.0)
    hu[e < 1] = -100.0  # subcutaneous fat (skin is blurred in)
    hu[in_fat < 1] = 50.0  # muscle wall
    cavity = in_cavity < 1
    visceral = smooth_noise(rng, shape, (1.5, 3.0, 3.0))
    hu[cavity] = np.where(visceral[cavity] > 0.3, -90.0, 35.0)  # visceral fat vs bowel/soft tissue

    # spine: vertebral body with discs, canal, posterior elements; paraspinal muscles
    sy = B * 0.58
    vb = np.hypot(x, y - sy)
    disc = np.cos(2 * np.pi * (Z + rng.uniform(0, 30)) / 30.0) > 0.8
    hu[np.hypot(x - 38, y - sy - 22) / 22 < 1] = 55.0
    hu[np.hypot(x + 38, y - sy - 22) / 22 < 1] = 55.0
    hu[vb < 18] = 900.0
    hu[vb < 15.5] = np.where(disc[vb < 15.5], 85.0, 260.0)
    canal = np.hypot(x, y - sy - 26)
    hu[(canal >= 8) & (canal < 14) & (y > sy + 18)] = 650.0
    hu[canal < 8] = 15.0

    # aorta and IVC (contrast)
    aorta = np.hypot(x - 14, y - sy + 32) < 11.0
    ivc = np.hypot(x + 24, y - sy + 30) < 10.0
    hu[aorta] = 175.0
    hu[ivc] = 140.0

    # kidneys (lower half), cortex enhancing, medulla/pelvis darker
    for side in (-1.0, 1.0):
        kc = (side * 0.4 * A.mean(), sy - 5 + rng.uniform(-5, 5), zext * rng.uniform(0.22, 0.35))
        k = _blob(x, y, Z, kc, (24, 30, 48))
        hu[k < 1] = 165.0
        hu[k < 0.55] = 35.0

    # liver (the label): right upper quadrant, lobulated, with a left lobe towards the midline
    ztop = zext * rng.uniform(0.85, 0.98)
    right = _blob(x, y, Z, (-0.45 * A, -0.05 * B, ztop - 0.38 * zext), (0.46 * A, 0.66 * B, 0.42 * zext))
    left = _blob(x, y, Z, (0.02 * A, -0.48 * B, ztop - 0.25 * zext), (0.42 * A, 0.28 * B, 0.24 * zext))
    wobble = 0.09 * smooth_noise(rng, shape, (2.0, 6.0, 6.0))
    rho = np.minimum(right, left * 1.05) + wobble
    soft = ndimage.gaussian_filter((rho < 1).astype(np.float64), (0.6, 1.2, 1.2))
    liver = (soft > 0.5) & cavity & ~aorta & (vb > 22) & (np.hypot(x + 24, y - sy + 30) > 12.5)
    liver = ndimage.binary_opening(liver, iterations=1)
    lab, n = ndimage.label(liver)
    if n > 1:
        sizes = ndimage.sum_labels(liver, lab, index=np.arange(1, n + 1))
        liver = lab == (int(np.argmax(sizes)) + 1)

    # spleen (left, upper, posterior) and stomach (left, anterior, air over fluid); not labelled
    spleen = _blob(x, y, Z, (0.55 * A, 0.25 * B, ztop - 0.3 * zext), (0.2 * A, 0.32 * B, 0.2 * zext)) < 1
    hu[spleen & cavity & ~liver] = 120.0
    stom = _blob(x, y, Z, (0.35 * A, -0.2 * B, ztop - 0.35 * zext), (0.24 * A, 0.28 * B, 0.2 * zext))
    stomach = (stom < 1) & cavity & ~liver & ~spleen
    hu[stomach] = 40.0  # wall
    inner = (stom < 0.8) & stomach
    hu[inner] = np.where((y + 0.2 * B + 10)[inner] < 0, -950.0, 12.0)  # air anterior, fluid posterior
    # bowel gas pockets (lower abdomen)
    gas = smooth_noise(rng, shape, (1.0, 2.0, 2.0)) > 2.0
    hu[gas & cavity & (T < 0.45) & ~liver & (vb > 20)] = -900.0

    # lung bases (top slices), posterior, above/behind the liver dome
    lung_t = np.clip((T - 0.72) / 0.28, 0, 1)
    for side in (-1.0, 1.0):
        lung = np.hypot((x - side * 0.5 * A) / (0.38 * A), (y - 0.15 * B) / (0.6 * B)) < lung_t * 1.1
        hu[lung & cavity & ~liver & (vb > 20)] = -850.0

    # liver parenchyma with texture and enhancing vessels
    tex = smooth_noise(rng, shape, (1.0, 1.5, 1.5))
    vessel = np.abs(smooth_noise(rng, shape, (1.5, 2.5, 2.5))) < 0.07
    hu[liver] = np.where(vessel[liver], 165.0, 105.0 + 6.0 * tex[liver])

    # image formation: partial volume blur, correlated noise (less in air), quantisation
    hu = ndimage.gaussian_filter(hu, (0.35, 0.6, 0.6))
    noise = smooth_noise(rng, shape, (0.0, 0.7, 0.7))
    body = ndimage.gaussian_filter((e < 1).astype(np.float64), 1.0)
    hu += noise * 5.0 * body
    hu = np.clip(np.round(hu), -1024, 3071 + RESCALE_INTERCEPT).astype(np.int16)
    return hu, liver.astype(np.uint8)


def _nifti_affine(geo: dict[str, Any]) -> np.ndarray:
    """RAS affine of the series: LPS -> RAS negates x and y (voxel axes: col, row, slice)."""
    ps, st = geo["ps"], geo["st"]
    return np.array(
        [[-ps, 0, 0, -geo["x0"]], [0, -ps, 0, -geo["y0"]], [0, 0, st, geo["z0"]], [0, 0, 0, 1]],
        dtype=np.float64,
    )


def _write_nifti(path: Path, vol_kji: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(np.ascontiguousarray(vol_kji.transpose(2, 1, 0)), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(vol_kji.dtype)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["medseg sample-data ct_3d|" + "|".join(str(p) for p in parts)])


def _write_dicom(path: Path, ds: Dataset) -> None:
    if _PYDICOM_MAJOR >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.4
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.save_as(path, write_like_original=False)


def _write_series(
    folder: Path, rng: np.random.Generator, hu: np.ndarray, geo: dict[str, Any], case: int, seed: int
) -> None:
    folder.mkdir(parents=True)
    d = hu.shape[0]
    study, series, frame = (_uid(seed, case, k) for k in ("study", "series", "frame"))
    patient_id = f"ANON{int(rng.integers(10**5, 10**6))}"
    names: list[str] = []
    while len(names) < d:  # random hex names: name order is unrelated to slice order
        name = f"{int(rng.integers(0, 16**12)):012x}.dcm"
        if name not in names:
            names.append(name)
    ps = _fmt(geo["ps"])
    for k in range(d):  # k: ascending z; InstanceNumber 1 is the top slice
        instance = d - k
        z = geo["z0"] + k * geo["st"]
        sop = _uid(seed, case, "sop", instance)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_NAME
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20150101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "medseg synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic abdomen CT (medseg sample data)"
        ds.SeriesDescription = f"Abdomen {geo['st']:g}mm"
        ds.PatientName = f"Sample^Case{case:03d}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = _fmt(geo["st"])
        ds.SpacingBetweenSlices = _fmt(geo["st"])
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = f"{case + 1}"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [_fmt(geo["x0"]), _fmt(geo["y0"]), _fmt(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _fmt(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = hu.shape[1]
        ds.Columns = hu.shape[2]
        ds.PixelSpacing = [ps, ps]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        stored = (hu[k].astype(np.int32) - RESCALE_INTERCEPT).astype("<u2")
        ds.add_new(0x7FE00010, "OW", stored.tobytes())
        _write_dicom(folder / names[k], ds)


def generate(out: Path, rng: np.random.Generator, seed: int) -> None:
    """Write ``dicom/case_XXX/``, ``images/case_XXX.nii.gz``, ``labels/case_XXX.nii.gz``, datalist, README."""
    for sub in ("dicom", "images", "labels"):
        (out / sub).mkdir()
    entries = []
    infos = []
    for case in range(N_CASES):
        geo = _geometry(rng)
        hu, liver = make_case(rng, geo)
        name = f"case_{case:03d}"
        _write_series(out / "dicom" / name, rng, hu, geo, case, seed)
        affine = _nifti_affine(geo)
        _write_nifti(out / "images" / f"{name}.nii.gz", hu, affine)
        _write_nifti(out / "labels" / f"{name}.nii.gz", liver, affine)
        entries.append(
            {"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz", "dicom": f"dicom/{name}"}
        )
        infos.append((name, geo, float(liver.mean())))
    write_json(out / "datalist.json", {s: [entries[i] for i in idx] for s, idx in SPLITS.items()})
    (out / "README.md").write_text(_readme(seed, infos), encoding="utf-8")


def _readme(seed: int, infos: list[tuple[str, dict[str, Any], float]]) -> str:
    split_of = {i: s for s, idx in SPLITS.items() for i in idx}
    rows = "\n".join(
        f"| {name} | {MATRIX}x{MATRIX}x{g['depth']} | {g['ps']:g} x {g['ps']:g} x {g['st']:g} | "
        f"{100 * frac:.1f}% | {split_of[i]} |"
        for i, (name, g, frac) in enumerate(infos)
    )
    return f"""# ct_3d: synthetic abdominal CT with a liver-like organ

{N_CASES} CT-like volumes of the upper abdomen in Hounsfield units (air -1000, fat about -100,
soft tissue 30-60, enhanced liver about 105 with vessels at 165, kidney cortex 165, bone up to
900), at a coarse, anisotropic resolution, with one labelled organ: the **liver** (label 1,
background 0), a lobulated organ with a smooth boundary in the right upper quadrant. The scan also
shows spine, aorta, IVC, kidneys, spleen, stomach, bowel gas and lung bases (not labelled).

Made by `medseg sample-data --out sample_data --datasets ct_3d` (seed {seed}); the generator is
`medseg/data/sample_data/ct.py`. Synthetic: no real patients (PatientID values are fake).

## Layout

- `dicom/case_XXX/`: one folder per series, one CT Image Storage file per slice (explicit VR
  little endian, uint16 stored values, RescaleIntercept -1024, RescaleSlope 1, BitsStored 12),
  with Study/Series/SOP/FrameOfReference UIDs derived from the seed, ImagePositionPatient,
  ImageOrientationPatient (axial, 1\\0\\0\\0\\1\\0), PixelSpacing, SliceThickness,
  SpacingBetweenSlices, InstanceNumber. InstanceNumber 1 is the **top** slice (z decreases with
  InstanceNumber), and file names are random hex: neither name order nor InstanceNumber order is
  ascending position order. Sort by position along the slice normal.
- `images/case_XXX.nii.gz`: the same voxels (int16 HU) in ascending-z order with the RAS affine
  of the DICOM geometry (`diag(-dx, -dy, dz)`, origin = first-slice LPS position with x and y
  negated), as SimpleITK / nibabel / MONAI read the series.
- `labels/case_XXX.nii.gz`: uint8 liver mask with exactly the same shape and affine.
- `datalist.json`: `training` / `validation` / `test` lists of
  `{{"image": NIfTI, "label": NIfTI, "dicom": series folder}}`, paths relative to this folder.

## Cases and splits

| case | voxels (x, y, z) | spacing (mm) | liver fraction | split |
|---|---|---|---|---|
{rows}
"""
