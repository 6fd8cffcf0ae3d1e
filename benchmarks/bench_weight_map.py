"""Benchmark: U-Net weight map (paper eq. 2), medseg vs the naive reference recipe. Run, don't import.

    python benchmarks/bench_weight_map.py [--size 512] [--cells 120] [--repeats 7]

Synthetic 2D instance image (disks, touching ones split at the Voronoi line), separated by the 1-px gap
first (same input for both). The naive reference is the common public recipe: one full-image distance
transform per instance, stacked and sorted. Prints medians (one process) and the max abs difference.
Goal: medseg >= 50x faster at 512x512 with ~120 instances.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from medseg.transforms import UNetWeightMap, separate_instances, unet_weight_map

# the synthetic image and the naive reference are the ones the exactness tests use
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_weight_map import naive_weight_map, synthetic_instances  # noqa: E402


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median (wall-clock, process CPU) seconds; CPU time is less disturbed by other processes."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def row(name: str, t: tuple[float, float], ref: tuple[float, float] | None = None, extra: str = "") -> str:
    text = f"{name:<46} wall {t[0] * 1e3:8.1f} ms  cpu {t[1] * 1e3:8.1f} ms"
    if ref is not None:
        text += f"  ratio wall x{ref[0] / t[0]:6.1f}  cpu x{ref[1] / t[1]:6.1f}"
    return text + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cells", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--naive-repeats", type=int, default=3)
    args = parser.parse_args()

    lab = synthetic_instances((args.size, args.size), args.cells, 12, 22, seed=0)
    sep = separate_instances(lab)
    n_cells = len(np.unique(sep)) - 1
    print(
        f"image {args.size}x{args.size}, {n_cells} instances, "
        f"{np.count_nonzero(lab) - np.count_nonzero(sep)} gap pixels, foreground {np.mean(sep > 0):.0%}"
    )

    ref = naive_weight_map(sep, 10.0, 5.0)
    t_naive = median_time(lambda: naive_weight_map(sep, 10.0, 5.0), args.naive_repeats)
    print(row("naive reference (full EDT per instance)", t_naive))
    for tol in (1e-3, 1e-4, 1e-6):
        err = float(np.abs(unet_weight_map(sep, separate=False, tolerance=tol) - ref).max())
        t = median_time(lambda tol=tol: unet_weight_map(sep, separate=False, tolerance=tol), args.repeats)
        print(row(f"medseg unet_weight_map tolerance={tol:g}", t, t_naive, f"  max abs err {err:.2e}"))
    transform = UNetWeightMap()  # defaults: separate=True, tolerance=1e-4, channel-first input
    img = lab[None]
    t_transform = median_time(lambda: transform(img), args.repeats)
    print(row("UNetWeightMap() incl. gap separation", t_transform, t_naive))
    print(row("  of which separate_instances", median_time(lambda: separate_instances(lab), args.repeats)))


if __name__ == "__main__":
    main()
