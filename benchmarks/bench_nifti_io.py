"""Benchmark: ``.nii.gz`` reading and mask writing, medseg vs MONAI / nibabel, in one process.

    python benchmarks/bench_nifti_io.py [--size 192 192 80] [--repeats 7]

Reading: ``LoadImage(reader=NiftiReader())`` vs MONAI ``LoadImage(reader=NibabelReader())`` (float32, as
the bundles load), on CT volumes generated from the sample cases (``bench_predict.make_volumes``).
Writing: ``write_nifti_mask`` vs MONAI ``NibabelWriter`` vs ``nib.save`` of the same uint8 mask (a
thresholded CT, so that it compresses like a real mask). Prints medians and ratios (peer / medseg),
and whether ISA-L (``isal``) is in use.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import make_volumes  # noqa: E402


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[192, 192, 80])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    from monai.data import NibabelReader, NibabelWriter
    from monai.transforms import LoadImage

    from medseg.data import NiftiReader, write_nifti_mask
    from medseg.data.gzip_codec import HAS_ISAL

    tmp = Path(tempfile.mkdtemp(prefix="bench_nifti_"))
    path = make_volumes(tmp, 1, tuple(args.size))[0]
    print(f"{tuple(args.size)} int16 CT, {path.stat().st_size / 1e6:.1f} MB .nii.gz; isal: {HAS_ISAL}; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip

    ours = LoadImage(reader=NiftiReader(), image_only=True, dtype=np.float32)
    peer = LoadImage(reader=NibabelReader(), image_only=True, dtype=np.float32)
    a, b = ours(path), peer(path)
    assert torch.equal(a.as_tensor(), b.as_tensor()) and torch.equal(a.affine, b.affine)
    t_ours, t_peer = median_ms(lambda: ours(path), args.repeats), median_ms(lambda: peer(path), args.repeats)
    print(
        f"read   NiftiReader {t_ours:7.1f} ms | MONAI NibabelReader {t_peer:7.1f} ms ({t_peer / t_ours:.2f}x)"
    )

    img = nib.load(path)
    mask = (np.asanyarray(img.dataobj) > 100).astype(np.uint8)  # C-ordered (x, y, z), as the engine has it
    mask = np.ascontiguousarray(mask)
    ref = {"affine": img.affine, "original_affine": img.affine, "spatial_shape": np.asarray(mask.shape)}
    out = tmp / "ours.nii.gz"

    def monai_write() -> None:
        writer = NibabelWriter(output_dtype=np.uint8)
        writer.set_data_array(mask, channel_dim=None)
        writer.set_metadata({"affine": img.affine, "original_affine": img.affine}, resample=False)
        writer.write(str(tmp / "monai.nii.gz"))

    t_ours = median_ms(lambda: write_nifti_mask(mask, ref, out), args.repeats)
    t_monai = median_ms(monai_write, args.repeats)
    t_nib = median_ms(lambda: nib.save(nib.Nifti1Image(mask, img.affine), tmp / "nib.nii.gz"), args.repeats)
    for name in ("monai", "nib"):
        assert np.array_equal(np.asanyarray(nib.load(tmp / f"{name}.nii.gz").dataobj), mask)
    assert np.array_equal(np.asanyarray(nib.load(out).dataobj), mask)
    print(
        f"write  write_nifti_mask {t_ours:7.1f} ms | MONAI NibabelWriter {t_monai:7.1f} ms "
        f"({t_monai / t_ours:.2f}x) | nib.save {t_nib:7.1f} ms ({t_nib / t_ours:.2f}x); sizes "
        f"{out.stat().st_size / 1e3:.0f} / {(tmp / 'monai.nii.gz').stat().st_size / 1e3:.0f} kB"
    )


if __name__ == "__main__":
    main()
