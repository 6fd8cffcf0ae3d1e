"""Benchmark: ``medseg predict``'s pipelined engine vs a plain sequential loop vs pure prediction time.

Generates ``--n`` CT volumes larger than the sample data (the sample CT cases resampled to
``--size``, with a little noise so no two are identical) as NIfTI, then times on the same cases:

1. *pure prediction*: the sum over cases of the ``inferer(image, network)`` call alone (inputs
   preprocessed and on the device beforehand, untimed): the floor any pipeline can reach;
2. *sequential loop*: per case load + preprocess -> infer -> postprocess -> write NIfTI, one after the
   other (``BatchPredictor(workers=0)``, the same code path without overlap);
3. *pipelined engine*: ``BatchPredictor(workers=W)`` (loading of the next cases and writing of finished
   ones overlap with inference).

Also prints the medians of the per-stage sums of the report rows (``load_s``: load + preprocess,
``infer_s``, ``write_s``: postprocess incl. ``Invertd`` + writing) for both modes.

Prints medians over ``--repeats`` runs, cases/s, and the ratios engine/pure and sequential/engine.
Run: ``python benchmarks/bench_predict.py [--n 20] [--size 192 192 80] [--repeats 3]``.
Uses ``bundles/unet_ct_3d`` with its ``models/model.pt`` (random weights when absent: timing only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_volumes(folder: Path, n: int, size: tuple[int, int, int], seed: int = 0) -> list[Path]:
    """``n`` NIfTI CT volumes of ``size`` voxels from the sample cases (trilinear zoom + noise)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    src = sorted((ROOT / "sample_data" / "ct_3d" / "images").glob("*.nii.gz"))
    out = []
    for i in range(n):
        img = nib.load(src[i % len(src)])
        data = img.get_fdata(dtype=np.float32)
        zoom = [s / d for s, d in zip(size, data.shape, strict=True)]
        big = ndimage.zoom(data, zoom, order=1) + rng.normal(0, 5, size).astype(np.float32)
        affine = img.affine.copy()
        affine[:3, :3] = affine[:3, :3] / np.asarray(zoom)[None, :]
        path = folder / f"ct_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(big.astype(np.int16), affine), path)
        out.append(path)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size", type=int, nargs=3, default=[192, 192, 80])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bundle", default=str(ROOT / "bundles" / "unet_ct_3d"))
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    from monai.bundle import ConfigParser

    from medseg.predict import BatchPredictor

    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        bundle = Path(args.bundle)
        ckpt = bundle / "models" / "model.pt"
        if not ckpt.is_file():
            parser = ConfigParser()
            parser.read_config(str(bundle / "configs" / "inference.json"))
            ckpt = tmp / "random.pt"
            torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
        src = tmp / "in"
        src.mkdir()
        t0 = time.perf_counter()
        make_volumes(src, args.n, tuple(args.size))
        print(
            f"{args.n} volumes of {tuple(args.size)} voxels generated in {time.perf_counter() - t0:.1f} s; "
            f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
        )

        def predictor(out: Path, workers: int) -> BatchPredictor:
            return BatchPredictor.from_bundle(
                bundle, out, checkpoint=ckpt, device=args.device, workers=workers, progress=False
            )

        # 1. pure prediction time: preprocessing untimed, the inferer alone timed per case
        p = predictor(tmp / "pure", 0)
        from medseg.predict.discovery import discover_cases

        cases = discover_cases(src)
        batches = [p.loader.load(c, "").batch for c in cases]

        def pure_run() -> float:
            total = 0.0
            for batch in batches:
                x = batch.to(p.device)
                sync(p.device)
                t = time.perf_counter()
                with torch.no_grad():
                    p._inferer(x, p.network)  # the engine's inferer: in the predictor's precision
                sync(p.device)
                total += time.perf_counter() - t
            return total

        pure_run()  # warm-up (allocator, oneDNN kernels)
        # the three measurements interleave within each repeat, so that a slow spell of a shared machine
        # hits all of them; per-repeat ratios are reported besides the ratio of medians
        pure, seq, eng = [], [], []
        stages: dict[str, list[dict[str, float]]] = {"seq": [], "engine": []}
        for r in range(args.repeats):
            pure.append(pure_run())
            for mode, workers, acc in (("seq", 0, seq), ("engine", args.workers, eng)):
                out = tmp / f"{mode}_{r}"
                bp = predictor(out, workers)
                t = time.perf_counter()
                rows = bp.run(src)
                acc.append(time.perf_counter() - t)
                assert all(row.status == "ok" for row in rows), [row.error for row in rows if row.error]
                # per-stage sums (threads overlap in the engine, so they exceed its wall time there)
                keys = ("load_s", "infer_s", "write_s")
                stages[mode].append({k: sum(getattr(row, k) for row in rows) for k in keys})
                shutil.rmtree(out)
        batches.clear()
        med = {k: statistics.median(v) for k, v in (("pure", pure), ("seq", seq), ("engine", eng))}
        result = {
            "n": args.n,
            "size": args.size,
            "workers": args.workers,
            "device": str(p.device),
            "omp_env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
            "pure_prediction_s": pure,
            "sequential_s": seq,
            "engine_s": eng,
            "median_s": med,
            "stage_sums_s": {
                m: {k: statistics.median(d[k] for d in v) for k in v[0]} for m, v in stages.items()
            },
            "cases_per_s": {k: args.n / v for k, v in med.items()},
            "engine_over_pure": med["engine"] / med["pure"],
            "engine_over_pure_per_repeat": [e / q for e, q in zip(eng, pure, strict=True)],
            "sequential_over_pure": med["seq"] / med["pure"],
            "speedup_engine_vs_sequential": med["seq"] / med["engine"],
        }
        print(json.dumps(result, indent=1))
        per_repeat = result["engine_over_pure_per_repeat"]
        print(
            f"median: pure prediction {med['pure']:.1f} s, sequential {med['seq']:.1f} s, "
            f"engine {med['engine']:.1f} s -> engine/pure {result['engine_over_pure']:.2f}x "
            f"(goal <= 1.3x; per repeat {', '.join(f'{x:.2f}' for x in per_repeat)}), "
            f"sequential/engine {result['speedup_engine_vs_sequential']:.2f}x"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
