"""Benchmark: load a 200-slice 512x512 uncompressed CT series.

medseg ``DicomReader`` (through ``LoadImage()``, auto-selected) vs SimpleITK ``ImageSeriesReader``
vs MONAI ``LoadImage(reader="PydicomReader")`` (and ``ITKReader`` when ``itk`` is installed), all in
the same process, medians of wall and CPU time (all threads) over ``--repeats`` runs after one
warm-up (the page cache is warm for all). Ratios compare like with like: the same dtype and
layout on both sides (SimpleITK's raw (z, y, x) view, then reordered to MONAI's C-contiguous
(x, y, z) int16, then float32 as ``LoadImage()`` returns by default).
The series is generated from pydicom's ``CT_small.dcm`` header into a temporary folder (deleted
afterwards), files shuffled on disk names so that nobody gets file-name order for free.

    python benchmarks/bench_dicom_load.py [--slices 200] [--size 512] [--repeats 5]

Goal: medseg no slower than SimpleITK and >= 2x faster than MONAI's PydicomReader.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def make_series(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """Write an ``n``-slice ``size``x``size`` int16 CT series (explicit VR little endian)."""
    rng = np.random.default_rng(seed)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid, frame_uid = generate_uid(), generate_uid()
    names = rng.permutation(n)
    yy, xx = np.mgrid[:size, :size]
    disk = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2).astype(np.int16)
    for k in range(n):
        ds = template.copy()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series_uid, frame_uid
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [0.7, 0.7]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-180.0, -180.0, -100.0 + 1.25 * k]
        ds.SliceThickness = 1.25
        ds.InstanceNumber = n - k  # descending, as many scanners do
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        img = (disk * (1000 + k) + rng.integers(0, 50, (size, size))).astype(np.int16)
        ds.PixelData = img.tobytes()
        ds.save_as(folder / f"IM{names[k]:05d}", enforce_file_format=True)


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Median wall time and median CPU time (``process_time``: all threads of this process)."""
    out = fn()  # warm-up (imports, page cache)
    walls, cpus = [], []
    for _ in range(repeats):
        del out  # free the previous result first: every run allocates its output afresh
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def describe(out: object) -> str:
    arr = out[1] if isinstance(out, tuple) else out
    layout = "C" if getattr(arr, "is_contiguous", lambda: np.asarray(arr).flags.c_contiguous)() else "view"
    return f"{type(arr).__name__} {str(arr.dtype).replace('torch.', '')} {tuple(arr.shape)} {layout}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import SimpleITK as sitk
    from monai.transforms import LoadImage

    import medseg  # noqa: F401  (registers DicomReader with LoadImage)
    from medseg.data import DicomReader

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        make_series(folder, args.slices, args.size)
        print(f"generated {args.slices} x {args.size}x{args.size} slices in {time.perf_counter() - t0:.1f} s")

        def sitk_load() -> tuple[sitk.Image, np.ndarray]:  # (z, y, x) view; the image keeps it alive
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
            image = reader.Execute()
            return image, sitk.GetArrayViewFromImage(image)

        def sitk_xyz(dtype: type | None = None) -> np.ndarray:  # what ITKReader + LoadImage hand on
            xyz = sitk_load()[1].transpose(2, 1, 0)
            return np.ascontiguousarray(xyz) if dtype is None else xyz.astype(dtype, order="C")

        reader = DicomReader()
        # transforms built once: we time loading, not construction. LoadImage converts to float32
        # by default (dtype=np.float32) and always makes the array C-contiguous; dtype=None keeps
        # the reader's dtype (int16 for both medseg and SimpleITK here).
        medseg_f32, medseg_keep = LoadImage(image_only=True), LoadImage(image_only=True, dtype=None)
        pyd_f32 = LoadImage(reader="PydicomReader", image_only=True)
        pyd_keep = LoadImage(reader="PydicomReader", image_only=True, dtype=None)
        loaders: dict[str, Callable[[], object]] = {
            "medseg DicomReader (reader only)": lambda: reader.get_data(reader.read(str(folder)))[0],
            "medseg LoadImage(dtype=None)": lambda: medseg_keep(str(folder)),
            "medseg LoadImage() [float32]": lambda: medseg_f32(str(folder)),
            "SimpleITK ImageSeriesReader (z,y,x)": sitk_load,
            "SimpleITK -> (x,y,z) C-contiguous": sitk_xyz,
            "SimpleITK -> (x,y,z) float32": lambda: sitk_xyz(np.float32),
            "MONAI LoadImage(PydicomReader,None)": lambda: pyd_keep(str(folder)),
            "MONAI LoadImage(PydicomReader)": lambda: pyd_f32(str(folder)),
        }
        try:
            import itk  # noqa: F401

            itk_f32 = LoadImage(reader="ITKReader", image_only=True)
            loaders["MONAI LoadImage(ITKReader)"] = lambda: itk_f32(str(folder))
        except ImportError:
            print("itk is not installed: MONAI ITKReader skipped")

        walls: dict[str, float] = {}
        cpus: dict[str, float] = {}
        outputs: dict[str, object] = {}
        print(f"{'':37s} {'wall ms':>9s} {'CPU ms':>9s}  output")
        for name, fn in loaders.items():
            walls[name], cpus[name], outputs[name] = median_time(fn, args.repeats)
            print(f"{name:37s} {walls[name] * 1000:9.1f} {cpus[name] * 1000:9.1f}  {describe(outputs[name])}")

        ours = np.asarray(outputs["medseg LoadImage(dtype=None)"])
        ref = outputs["SimpleITK ImageSeriesReader (z,y,x)"][1].transpose(2, 1, 0)  # type: ignore[index]
        print(f"same voxels as SimpleITK: {bool(np.array_equal(ours, ref))}")
        # like with like: same dtype and layout on both sides (a ratio > 1 means medseg is faster)
        pairs = [
            ("SimpleITK ImageSeriesReader (z,y,x)", "medseg DicomReader (reader only)"),
            ("SimpleITK -> (x,y,z) C-contiguous", "medseg DicomReader (reader only)"),
            ("SimpleITK -> (x,y,z) C-contiguous", "medseg LoadImage(dtype=None)"),
            ("SimpleITK -> (x,y,z) float32", "medseg LoadImage() [float32]"),
            ("MONAI LoadImage(PydicomReader,None)", "medseg LoadImage(dtype=None)"),
            ("MONAI LoadImage(PydicomReader)", "medseg LoadImage() [float32]"),
            ("MONAI LoadImage(ITKReader)", "medseg LoadImage() [float32]"),
        ]
        for peer, mine in pairs:
            if peer in walls:
                print(
                    f"ratio {peer} / {mine}: wall {walls[peer] / walls[mine]:5.2f}x, "
                    f"CPU {cpus[peer] / cpus[mine]:5.2f}x"
                )


if __name__ == "__main__":
    main()
