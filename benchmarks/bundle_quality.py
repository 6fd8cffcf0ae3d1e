"""Train each bundle with its default configs on the sample data; report validation mean Dice and time.

    python benchmarks/bundle_quality.py [--bundles unet_nuclei_2d ...] [--repeats 1] [--in-place]

Each run is ``python -m monai.bundle run training --config_file bundles/<name>/configs/train.json`` with no
override (the bundle's defaults, the sample data), in a subprocess. By default the bundle is copied to a
temporary folder so ``models/`` of the checkout is left alone; ``--in-place`` trains in the bundle itself
(leaving ``models/model.pt`` ready for inference). Reported per run: best validation mean Dice (the
key metric the bundle's CheckpointSaver uses), wall time, and CPU time (user + system of the child
process, all its threads). Targets: Dice >= 0.85 nuclei, >= 0.80 brain MRI, >= 0.85 CT.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"unet_nuclei_2d": 0.85, "unet_brain_tumor_mri": 0.80, "unet_ct_3d": 0.85}
_BEST = re.compile(r"Key metric: (\S+) best value: ([0-9.eE+-]+) at epoch: (\d+)")


def train_once(name: str, in_place: bool, extra: list[str]) -> dict[str, float | int | str]:
    """One default training run of bundle ``name``; returns best Dice, its epoch, wall and CPU seconds."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        if in_place:
            bundle = REPO / "bundles" / name
            dataset = []
        else:
            bundle = Path(tmp) / name
            skip = shutil.ignore_patterns("models", "eval", "runs")
            shutil.copytree(REPO / "bundles" / name, bundle, ignore=skip)
            # the copy lives outside the repository: point it at the same default sample data
            dataset = ["--dataset_dir", str(REPO / "sample_data" / name_to_dataset(name))]
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
               "--config_file", str(bundle / "configs" / "train.json"), *dataset, *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: training failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    matches = _BEST.findall(proc.stdout + proc.stderr)
    if not matches:
        raise RuntimeError(f"{name}: no validation result in the log\n{proc.stdout[-2000:]}")
    metric, best, epoch = matches[-1]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"metric": metric, "best": float(best), "epoch": int(epoch), "wall_s": wall, "cpu_s": cpu}


def name_to_dataset(name: str) -> str:
    return {"unet_nuclei_2d": "nuclei_2d", "unet_brain_tumor_mri": "brain_mri_mat", "unet_ct_3d": "ct_3d"}[
        name
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundles", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per bundle (median reported)")
    parser.add_argument("--in-place", action="store_true", help="train in bundles/<name> (writes models/)")
    parser.add_argument("overrides", nargs="*", help="extra `--key value` overrides passed to every run")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, torch threads: default")
    failed = False
    for name in args.bundles:
        runs = [train_once(name, args.in_place, args.overrides) for _ in range(args.repeats)]
        dice = statistics.median(r["best"] for r in runs)
        wall = statistics.median(r["wall_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        ok = dice >= TARGETS[name]
        failed |= not ok
        print(
            f"{name:22s} best {runs[0]['metric']} {dice:.4f} (target {TARGETS[name]:.2f}, "
            f"{'met' if ok else 'NOT met'}) at epoch {[r['epoch'] for r in runs]}; "
            f"wall {wall:.0f} s, CPU {cpu:.0f} s (user+sys), CPU/wall {cpu / wall:.2f}; runs={len(runs)}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
