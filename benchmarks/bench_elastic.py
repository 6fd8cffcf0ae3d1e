"""Benchmark: elastic deformation of image + label on CPU, medseg vs MONAI, elasticdeform, torchio.

One process; every repeat round runs every method once on the same inputs (interleaved, so that load from
other processes hits all methods alike); medians over rounds and the ratio "fastest other / medseg".

    python benchmarks/bench_elastic.py [--repeats-2d 15] [--repeats-3d 5] [--threads N [N ...]]

By default it runs with the environment's torch thread count and then with 1 thread (what PyTorch sets in
DataLoader worker processes, where augmentation normally runs). elasticdeform is single-threaded C.

Settings per library (paper: 3x3 control grid, 10 px std, bicubic image, nearest label, mirrored border):
- medseg ``RandElasticGridd(sigma=10, num_points=3)``: image bilinear (and bicubic in 2D), label nearest,
  reflection padding.
- MONAI ``Rand2DElasticd(spacing=half the size, magnitude_range=(10, 10))`` (3x3 coarse grid, bicubic
  upsampled), image bilinear / label nearest, reflection; ``Rand3DElasticd(sigma_range=(5, 8),
  magnitude_range=(100, 200))`` (its only 3D method: smoothed dense noise).
- elasticdeform ``deform_random_grid([img, lab], sigma=10, points=3, mode="mirror")``, ``order=[3, 0]``
  (its default, cubic spline image) and ``order=[1, 0]`` (linear image, like medseg's default).
- torchio ``RandomElasticDeformation`` (defaults: 7 control points, B-spline, linear image / nearest label).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from medseg.transforms import RandElasticGridd


def _inputs(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image with a few blobs and its 3-class label, channel-first float32."""
    rng = np.random.default_rng(0)
    axes = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    r2 = sum(a**2 for a in axes)
    lab = (r2 < 0.5).astype(np.float32) + (r2 < 0.1).astype(np.float32)
    img = lab * 100 + rng.normal(0, 10, shape).astype(np.float32)
    return img[None].astype(np.float32), lab[None]


def _methods(shape: tuple[int, ...], img: np.ndarray, lab: np.ndarray) -> dict[str, Callable[[], object]]:
    nd = len(shape)
    timg, tlab = torch.from_numpy(img), torch.from_numpy(lab)
    out: dict[str, Callable[[], object]] = {}

    ours = RandElasticGridd(["image", "label"], sigma=10.0, num_points=3, mode=("bilinear", "nearest"))
    ours.set_random_state(0)
    out["medseg bilinear/nearest"] = lambda: ours({"image": timg, "label": tlab})
    if nd == 2:
        ours_c = RandElasticGridd(["image", "label"], sigma=10.0, num_points=3, mode=("bicubic", "nearest"))
        ours_c.set_random_state(0)
        out["medseg bicubic/nearest"] = lambda: ours_c({"image": timg, "label": tlab})

    from monai.transforms import Rand2DElasticd, Rand3DElasticd

    if nd == 2:
        monai_t = Rand2DElasticd(
            ["image", "label"],
            spacing=tuple(n // 2 for n in shape),
            magnitude_range=(10.0, 10.0),
            prob=1.0,
            mode=("bilinear", "nearest"),
            padding_mode="reflection",
        )
    else:
        monai_t = Rand3DElasticd(
            ["image", "label"],
            sigma_range=(5.0, 8.0),
            magnitude_range=(100.0, 200.0),
            prob=1.0,
            mode=("bilinear", "nearest"),
            padding_mode="reflection",
        )
    monai_t.set_random_state(0)
    out[f"MONAI {type(monai_t).__name__}"] = lambda: monai_t({"image": timg, "label": tlab})

    try:
        import elasticdeform

        elasticdeform.deform_random_grid([img[0], lab[0]], sigma=10, points=3, order=[1, 0])  # import check
        for order in (3, 1):
            out[f"elasticdeform order=[{order},0]"] = lambda order=order: elasticdeform.deform_random_grid(
                [img[0], lab[0]], sigma=10, points=3, order=[order, 0], mode="mirror"
            )
    except Exception as e:  # noqa: BLE001 - report any import/ABI failure (its wheel breaks with NumPy 2)
        print(f"  elasticdeform unavailable: {type(e).__name__}: {e}".splitlines()[0])

    try:
        import torchio as tio

        t4 = (lambda a: a[..., None]) if nd == 2 else (lambda a: a)
        subject = tio.Subject(
            image=tio.ScalarImage(tensor=torch.from_numpy(t4(img))),
            label=tio.LabelMap(tensor=torch.from_numpy(t4(lab))),
        )
        tio_t = tio.RandomElasticDeformation(max_displacement=(10, 10, 0) if nd == 2 else 10)
        out["torchio RandomElasticDeformation"] = lambda: tio_t(subject)
    except Exception as e:  # noqa: BLE001
        print(f"  torchio unavailable: {type(e).__name__}: {e}".splitlines()[0])
    return out


def bench(shape: tuple[int, ...], repeats: int) -> None:
    img, lab = _inputs(shape)
    methods = _methods(shape, img, lab)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up (caches, lazy imports)
        fn()
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ours = med["medseg bilinear/nearest"]
    print(
        f"\n{'x'.join(map(str, shape))} image + label, {repeats} rounds, median ms (ratio = other / medseg)"
    )
    for name, m in med.items():
        print(f"  {name:40s} {m * 1e3:9.1f} ms   x{m / ours:7.1f}")
    others = {n: m for n, m in med.items() if not n.startswith("medseg")}
    if others:
        best = min(others, key=others.__getitem__)
        print(f"  fastest other: {best}; medseg is {others[best] / ours:.1f}x faster (goal >= 5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats-2d", type=int, default=15)
    parser.add_argument("--repeats-3d", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts (default: the environment's, then 1 as in a DataLoader worker)",
    )
    args = parser.parse_args()
    given = torch.get_num_threads()
    threads = args.threads or ([given, 1] if given > 1 else [1])
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, numpy {np.__version__}, environment threads {given}")
    for n in threads:
        torch.set_num_threads(n)
        print(f"\n=== torch.set_num_threads({n}) ===")
        bench((572, 572), args.repeats_2d)
        bench((128, 128, 128), args.repeats_3d)


if __name__ == "__main__":
    main()
