"""``brain_mri_mat``: T1-contrast-like axial MRI slices with a tumour, stored like figshare's set.

The figshare brain-tumour set (Cheng 2017, doi:10.6084/m9.figshare.1512427) has one MATLAB v7.3
file per slice holding a struct ``cjdata`` with ``image`` (int16 512x512), ``label`` (1
meningioma, 2 glioma, 3 pituitary tumour), ``PID`` (char), ``tumorBorder`` (the delineated
outline, ``[x1 y1 x2 y2 ...]``) and ``tumorMask`` (the filled outline). This module writes the
same structure, for synthetic heads: scalp, skull, cortex with gyri, white matter, ventricles, and
one tumour per patient whose look follows its type (meningioma: homogeneous, dural-based;
glioma: ring-enhancing with a necrotic core and oedema; pituitary: small, midline, at the sella).
Rician noise and a smooth bias field as in MR magnitude images.

``tumorBorder`` convention here: ``x`` = column, ``y`` = row, 1-based MATLAB pixel coordinates
(``roipoly(image, x, y)`` reproduces ``tumorMask``); it is a double column vector (MATLAB size
``2K x 1``, HDF5 shape ``(1, 2K)``, so ``f["cjdata/tumorBorder"][0]`` is the whole vector, as
for the figshare files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.data.matlab_writer import write_mat_v5, write_mat_v73
from medseg.data.sample_data._common import smooth_noise, write_json

SIZE = 512
N_PATIENTS = 5
SLICES_PER_PATIENT = 3
TUMOUR_TYPES = {1: "meningioma", 2: "glioma", 3: "pituitary tumour"}
#: patient index -> split (split by patient: no PID in two splits)
PATIENT_SPLIT = ("training", "training", "training", "validation", "test")
PATIENT_TYPE = (1, 2, 3, 2, 1)
#: files (1-based numbers, as figshare names them) written in MATLAB v5 instead of v7.3
V5_FILES = (5, 12)


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre (x = col + 1, y = row + 1, MATLAB 1-based) lies inside the polygon."""
    mask = np.zeros(shape, dtype=bool)
    r0, r1 = max(0, int(np.floor(ys.min())) - 2), min(shape[0], int(np.ceil(ys.max())) + 1)
    c0, c1 = max(0, int(np.floor(xs.min())) - 2), min(shape[1], int(np.ceil(xs.max())) + 1)
    py, px = np.mgrid[r0:r1, c0:c1].astype(np.float64) + 1.0
    inside = np.zeros(py.shape, dtype=bool)
    x2, y2 = np.roll(xs, -1), np.roll(ys, -1)
    for xa, ya, xb, yb in zip(xs, ys, x2, y2, strict=True):  # even-odd rule, one edge at a time
        if ya == yb:
            continue
        crosses = (ya > py) != (yb > py)
        x_cross = xa + (py - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (px < x_cross)
    mask[r0:r1, c0:c1] = inside
    return mask


def _ellipse(rr: np.ndarray, cc: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((rr - cy) / ry) ** 2 + ((cc - cx) / rx) ** 2


class _Patient:
    """Per-patient anatomy and tumour parameters (shared by that patient's slices)."""

    def __init__(self, rng: np.random.Generator, tumour_type: int) -> None:
        self.tumour_type = tumour_type
        self.head = (
            rng.uniform(245, 265),
            rng.uniform(250, 262),
            rng.uniform(200, 222),
            rng.uniform(170, 188),
        )
        self.gain = rng.uniform(0.8, 1.1)
        self.harmonics = [(k, rng.uniform(0.03, 0.11), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
        hy, hx, ry, rx = self.head
        if tumour_type == 1:  # meningioma: at the convexity, touching the inner skull table
            phi = rng.uniform(-np.pi, np.pi)
            self.radius = rng.uniform(30, 42)
            dist = 1.0 - (0.8 * self.radius + 27) / min(ry, rx)
            self.centre = (hy + ry * dist * np.sin(phi), hx + rx * dist * np.cos(phi))
        elif tumour_type == 2:  # glioma: intra-axial, in a hemisphere
            side = rng.choice([-1.0, 1.0])
            self.radius = rng.uniform(34, 48)
            self.centre = (hy + rng.uniform(-0.35, 0.35) * ry, hx + side * rng.uniform(0.25, 0.42) * rx)
        else:  # pituitary: small, midline, anterior (sella)
            self.radius = rng.uniform(20, 27)
            self.centre = (hy - 0.32 * ry + rng.uniform(-6, 6), hx + rng.uniform(-5, 5))


def _tumour_outline(
    rng: np.random.Generator, patient: _Patient, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The delineated border: vertices (x = column, y = row, 1-based) of a wavy closed curve."""
    n = int(rng.integers(36, 64))
    theta = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = patient.radius * scale * (1 + sum(a * np.cos(k * theta + p) for k, a, p in patient.harmonics))
    r *= 1 + 0.015 * rng.standard_normal(n)  # hand-drawn jitter
    cy, cx = patient.centre
    xs = np.round(cx + 1 + r * np.cos(theta), 2)
    ys = np.round(cy + 1 + r * np.sin(theta), 2)
    return xs, ys


def make_slice(
    rng: np.random.Generator, patient: _Patient, level: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One slice at relative level ``level`` in [-1, 1]: (image int16, mask bool, border vector)."""
    shape = (SIZE, SIZE)
    rr, cc = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    hy, hx, ry, rx = patient.head
    shrink = 1.0 - 0.05 * level**2
    ry, rx = ry * shrink, rx * shrink
    head = _ellipse(rr, cc, hy, hx, ry, rx)
    skull_out = _ellipse(rr, cc, hy, hx, ry - 12, rx - 12)
    skull_in = _ellipse(rr, cc, hy, hx, ry - 22, rx - 22)
    csf_in = _ellipse(rr, cc, hy, hx, ry - 27, rx - 27)

    brain = csf_in < 1
    image = np.zeros(shape)
    image[head < 1] = 720.0  # scalp fat, bright on T1
    image[skull_out < 1] = 60.0  # cortical bone, dark
    image[skull_in < 1] = 160.0  # CSF rim
    # grey/white matter: gyri from a thresholded smooth field, white matter deeper inside
    depth = ndimage.distance_transform_edt(brain)
    gyri = smooth_noise(rng, shape, 6.0)
    white = (depth > 18) & (gyri + (depth - 40) / 25.0 > 0.0)
    image[brain] = 390.0
    image[brain & white] = 520.0
    sulci = brain & (depth < 30) & (np.abs(smooth_noise(rng, shape, 4.0)) < 0.12)
    image[sulci] = 190.0
    # lateral ventricles (butterfly) and the midline fissure
    if patient.tumour_type == 3:  # skull-base level: sphenoid sinus (air) in front of the sella
        cy, cx = patient.centre
        image[brain & (_ellipse(rr, cc, cy - 48, cx, 18, 30) < 1)] = 20.0
    else:
        vent_size = max(0.15, 1.0 - 0.8 * abs(level))
        for side in (-1.0, 1.0):
            v = _ellipse(rr, cc, hy - 10, hx + side * 22 * vent_size, 45 * vent_size, 13 * vent_size)
            image[brain & (v < 1)] = 130.0
    image[brain & (np.abs(cc - hx) < 1.5) & (np.abs(rr - hy) > 60)] = 170.0

    # tumour: filled delineated outline; look depends on the type
    scale = np.sqrt(max(0.35, 1.0 - 0.45 * level**2))
    xs, ys = _tumour_outline(rng, patient, scale)
    mask = _polygon_mask(xs, ys, shape)
    inner = ndimage.distance_transform_edt(mask)
    tex = smooth_noise(rng, shape, 3.0)
    if patient.tumour_type == 2:
        oedema = ndimage.distance_transform_edt(~mask) < 22 * rng.uniform(0.6, 1.0) + 6 * smooth_noise(
            rng, shape, 8
        )
        image[brain & oedema & ~mask] *= 0.72
        core = inner > 0.45 * inner.max()
        tumour = np.where(core, 210.0 + 30 * tex, 930.0 + 60 * tex)
    elif patient.tumour_type == 1:
        tumour = 980.0 + 40 * tex
    else:
        tumour = 860.0 + 50 * tex
    image = np.where(mask, tumour, image)

    # MR image formation: partial volume blur, bias field, Rician magnitude noise, gain
    image = ndimage.gaussian_filter(image, 1.1)
    image *= 1.0 + 0.08 * smooth_noise(rng, shape, 90.0)
    sigma = 4.0
    real = image + sigma * rng.standard_normal(shape)
    imag = sigma * rng.standard_normal(shape)
    image = np.hypot(real, imag) * patient.gain
    image = np.clip(np.round(image), 0, 32767).astype(np.int16)
    border = np.stack([xs, ys], axis=1).reshape(-1, 1)  # [x1 y1 x2 y2 ...] as a column
    return image, mask, border


def generate(out: Path, rng: np.random.Generator, seed: int) -> None:
    """Write ``1.mat`` ... ``15.mat`` (figshare naming), ``datalist.json`` and ``README.md``."""
    pids = [str(p) for p in rng.choice(np.arange(100000, 999999), size=N_PATIENTS, replace=False)]
    datalist: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    number = 0
    for p in range(N_PATIENTS):
        patient = _Patient(rng, PATIENT_TYPE[p])
        for level in np.linspace(-0.8, 0.8, SLICES_PER_PATIENT):
            number += 1
            image, mask, border = make_slice(rng, patient, float(level))
            cjdata = {
                "image": image,
                "label": float(patient.tumour_type),
                "PID": pids[p],
                "tumorBorder": border,
                "tumorMask": mask,
            }
            name = f"{number}.mat"
            writer = write_mat_v5 if number in V5_FILES else write_mat_v73
            writer(out / name, {"cjdata": cjdata})
            datalist[PATIENT_SPLIT[p]].append({"image": name, "label": name, "pid": pids[p]})
    write_json(out / "datalist.json", datalist)
    (out / "README.md").write_text(_readme(seed, pids), encoding="utf-8")


def _readme(seed: int, pids: list[str]) -> str:
    rows = []
    for p, pid in enumerate(pids):
        first = p * SLICES_PER_PATIENT + 1
        files = ", ".join(
            f"{n}.mat" + (" (v5)" if n in V5_FILES else "") for n in range(first, first + SLICES_PER_PATIENT)
        )
        t = PATIENT_TYPE[p]
        rows.append(f"| {pid} | {t} ({TUMOUR_TYPES[t]}) | {files} | {PATIENT_SPLIT[p]} |")
    table = "\n".join(rows)
    return f"""# brain_mri_mat: synthetic brain-tumour MRI slices in the figshare MATLAB format

{N_PATIENTS * SLICES_PER_PATIENT} axial T1-contrast-like slices (512x512, int16) of
{N_PATIENTS} synthetic patients, {SLICES_PER_PATIENT} slices each, one tumour per patient, stored
exactly like the figshare brain-tumour dataset (Cheng 2017, doi:10.6084/m9.figshare.1512427): one
MATLAB file per slice, numbered `1.mat`, `2.mat`, ..., each holding a struct `cjdata` with

| field | MATLAB type | meaning |
|---|---|---|
| `image` | int16 512x512 | the slice (pixel size 0.49 mm in the real set) |
| `label` | double 1x1 | 1 meningioma, 2 glioma, 3 pituitary tumour |
| `PID` | char 1xN | patient id (fake, 6 digits) |
| `tumorBorder` | double 2Kx1 | outline `[x1 y1 x2 y2 ...]`, x = column, y = row, 1-based |
| `tumorMask` | logical 512x512 | filled outline (pixel centres inside the polygon) |

Files are MATLAB v7.3 (HDF5 with the 512-byte MATLAB header, `MATLAB_class` attributes, struct
as group, char as uint16, logical as uint8, column-major: the HDF5 datasets hold the transposed
arrays) except {", ".join(f"`{n}.mat`" for n in V5_FILES)}, which are MATLAB v5 (read with
`scipy.io.loadmat`; HDF5 readers cannot open them). Read v7.3 with `h5py` and transpose:
`image = f["cjdata/image"][()].T`.

Made by `medseg sample-data --out sample_data --datasets brain_mri_mat` (seed {seed}); the
generator is `medseg/data/sample_data/brain_mri.py`, the MATLAB writer
`medseg/data/matlab_writer.py`. Synthetic: no real patients.

## Layout

- `N.mat`: one slice each (see above).
- `datalist.json`: `training` / `validation` / `test` lists of
  `{{"image": "N.mat", "label": "N.mat", "pid": PID}}`; image and label are the same file: read
  `cjdata/image` as the image and `cjdata/tumorMask` as the label.

## Splits (by patient: no PID is in two splits)

| PID | label | files | split |
|---|---|---|---|
{table}
"""
