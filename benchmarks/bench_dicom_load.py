"""Benchmark: load a 200-slice 512x512 uncompressed CT series.

medseg ``DicomReader`` (through ``LoadImage()``, auto-selected) vs SimpleITK ``ImageSeriesReader``
vs MONAI ``LoadImage(reader="PydicomReader")`` (and ``ITKReader`` when ``itk`` is installed), all in
the same process, medians over ``--repeats`` runs after one warm-up (the page cache is warm for all).
The series is generated from pydicom's ``CT_small.dcm`` header into a temporary folder (deleted
afterwards), files shuffled on disk names so that nobody gets file-name order for free.

    python benchmarks/bench_dicom_load.py [--slices 200] [--size 512] [--repeats 5]

Goal (issue 3): medseg no slower than SimpleITK and >= 2x faster than MONAI's PydicomReader.
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


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (imports, page cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


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

        def sitk_load_monai_layout() -> np.ndarray:  # what MONAI's ITKReader + LoadImage hand on
            return np.ascontiguousarray(sitk_load()[1].transpose(2, 1, 0))

        load_default = LoadImage(image_only=True)  # built once: we time loading, not construction
        load_pydicom = LoadImage(reader="PydicomReader", image_only=True)
        loaders: dict[str, Callable[[], object]] = {
            "medseg LoadImage() [DicomReader]": lambda: load_default(str(folder)),
            "medseg DicomReader (reader only)": lambda: DicomReader().get_data(
                DicomReader().read(str(folder))
            )[0],
            "SimpleITK ImageSeriesReader": sitk_load,
            "SimpleITK + (x,y,z) C-contiguous": sitk_load_monai_layout,
            "MONAI LoadImage(PydicomReader)": lambda: load_pydicom(str(folder)),
        }
        try:
            import itk  # noqa: F401

            loaders["MONAI LoadImage(ITKReader)"] = lambda: LoadImage(reader="ITKReader", image_only=True)(
                str(folder)
            )
        except ImportError:
            print("itk is not installed: MONAI ITKReader skipped")

        results: dict[str, float] = {}
        outputs: dict[str, object] = {}
        for name, fn in loaders.items():
            results[name], outputs[name] = median_time(fn, args.repeats)
            print(f"{name:36s} median {results[name] * 1000:8.1f} ms")

        ours = np.asarray(outputs["medseg LoadImage() [DicomReader]"])
        ref = outputs["SimpleITK ImageSeriesReader"][1].transpose(2, 1, 0)  # type: ignore[index]  # (z,y,x) -> (x,y,z)
        print(f"same voxels as SimpleITK: {bool(np.array_equal(ours, ref))}")
        base = results["medseg LoadImage() [DicomReader]"]
        for name, t in results.items():
            if not name.startswith("medseg"):
                print(f"ratio {name} / medseg LoadImage: {t / base:5.2f}x")


if __name__ == "__main__":
    main()
