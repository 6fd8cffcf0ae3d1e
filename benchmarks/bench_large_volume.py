"""Benchmark: ``medseg predict`` on one whole-body-sized CT: peak memory and per-stage times.

Generates a CT-like volume (default 512x512x1000 int16, 0.7x0.7x1.0 mm: a body ellipse, an organ, noise)
as NIfTI, runs ``medseg predict --bundle bundles/unet_ct_3d`` on it in a child process (its
``models/model.pt``, or random weights of the same network when absent: timing and memory only), and
prints the child's peak resident memory (``ru_maxrss``) against the size of the volume as float32, and
the report's stage times (load + preprocess, inference, post-processing + writing).
``--train`` first trains a copy of the bundle on the sample CT volumes (smooth masks, as a real model's;
random weights give noise masks, the worst case for the writer's compression).
Run: ``python benchmarks/bench_large_volume.py [--size 512 512 1000] [--keep DIR] [--train]
[--memory retain]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_ct(
    path: Path, size: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0
) -> None:
    """A CT-like int16 volume in HU: air, a body ellipse of soft tissue, a brighter organ, noise."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    x = (np.arange(nx) - nx / 2)[:, None] / (0.42 * nx)
    y = (np.arange(ny) - ny / 2)[None, :] / (0.32 * ny)
    body = (x**2 + y**2) <= 1.0
    organ = ((x - 0.3) ** 2 / 0.1 + (y + 0.1) ** 2 / 0.15) <= 1.0
    vol = np.empty(size, np.int16)
    for k in range(nz):  # slice by slice: the generator itself stays small
        sl = np.full((nx, ny), -1000, np.int16)
        sl[body] = 40
        if nz // 4 < k < 3 * nz // 4:
            sl[organ] = 110
        vol[:, :, k] = sl + rng.normal(0, 12, (nx, ny)).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), path)


def train_copy(bundle: Path, dst: Path) -> Path:
    """A copy of ``bundle`` trained on ``sample_data/ct_3d`` with its own training config."""
    if not (dst / "models" / "model.pt").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(bundle / "configs", dst / "configs")
        (dst / "models").mkdir()
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               str(dst / "configs" / "train.json"), "--bundle_root", str(dst),
               "--dataset_dir", str(ROOT / "sample_data" / "ct_3d"), "--num_workers", "0"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        print(f"trained {dst} on the sample CT volumes in {time.perf_counter() - t0:.0f} s")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 1000])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 1.0])
    ap.add_argument("--bundle", default=str(ROOT / "bundles" / "unet_ct_3d"))
    ap.add_argument("--keep", default=None, help="folder to keep the generated volume and outputs in")
    ap.add_argument("--train", action="store_true", help="first train a copy of the bundle on the sample CT")
    ap.add_argument("--memory", default="bundle", help="medseg predict --memory: bundle, retain or release")
    args = ap.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_large_"))
    (tmp / "in").mkdir(parents=True, exist_ok=True)
    src = tmp / "in" / "ct.nii.gz"
    if not src.is_file():
        t0 = time.perf_counter()
        make_ct(src, tuple(args.size), tuple(args.spacing))
        print(f"generated {src} in {time.perf_counter() - t0:.1f} s")
    bundle = Path(args.bundle)
    if args.train:
        bundle = train_copy(bundle, tmp / "trained_bundle")
    ckpt = bundle / "models" / "model.pt"
    extra: list[str] = []
    if not ckpt.is_file():
        import torch
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        torch.manual_seed(0)
        ckpt = tmp / "random_model.pt"
        torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
        extra = ["--ckpt", str(ckpt)]
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "medseg", "predict", "--bundle", str(bundle), "--input", str(tmp / "in"),
           "--output", str(out), "--no-progress", *extra]  # fmt: skip
    cmd += ["--memory", args.memory]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    f32_mb = np.prod(args.size) * 4 / 2**20
    report = json.loads((out / "report.json").read_text())
    row = report["cases"][0]
    print(f"volume {'x'.join(map(str, args.size))} ({f32_mb:.0f} MiB as float32), {wall:.1f} s end to end")
    print(f"peak RSS {peak_mb:.0f} MiB = {peak_mb / f32_mb:.2f}x the float32 volume")
    print(f"stages: load+preprocess {row['load_s']:.2f} s, inference {row['infer_s']:.2f} s, "
          f"post-processing+writing {row['write_s']:.2f} s")  # fmt: skip
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
