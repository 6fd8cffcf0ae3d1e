"""Benchmark: MONAI ``Spacingd`` vs medseg ``SeparableSpacingd`` (forward, and ``Invertd`` of a prediction).

CT-like volumes are made from the sample CT (``sample_data/ct_3d``) resampled to fixed grids covering the
same field of view (192x192x80 and 512x512x200 by default). Per volume and computation dtype:

(a) forward: ``Spacingd(pixdim=(4, 4, 5))`` on the 1-channel image;
(b) inverse: ``Invertd`` of a 2-channel float32 prediction made on the (4, 4, 5) grid back to the source grid
    (what an inference bundle does after the network), the prediction carrying the preprocessed image's meta
    and applied_operations as medseg's predict engine builds it.

One process; each repeat round runs MONAI then medseg on the same inputs (interleaved, so load from other
processes hits both alike); medians over rounds and the ratio MONAI / medseg (> 1: medseg faster). The
"path" column says whether medseg took its separable path or fell back to MONAI's (strong downsampling,
where ``separable_is_cheaper`` is False). Outputs are checked against MONAI's on every setting.

    python benchmarks/bench_spacing.py [--shapes 192x192x80 512x512x200] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from medseg.transforms import SeparableSpacingd, separable_is_cheaper
from medseg.transforms import spacing as spacing_module
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd, Spacingd

CT = Path(__file__).resolve().parents[1] / "sample_data" / "ct_3d" / "images" / "case_000.nii.gz"
PIXDIM = (4.0, 4.0, 5.0)


def _volume(shape: tuple[int, int, int]) -> MetaTensor:
    """The sample CT (RAS) resampled trilinearly to ``shape`` over the same field of view."""
    ct = Compose(
        [LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), Orientationd("image", "RAS")]
    )({"image": str(CT)})["image"]
    data = F.interpolate(ct.as_tensor()[None].float(), size=shape, mode="trilinear", align_corners=False)[0]
    aff = ct.affine.clone().double()
    zoom = torch.tensor([n / m for n, m in zip(ct.shape[1:], shape, strict=True)], dtype=torch.float64)
    aff[:3, :3] = aff[:3, :3] * zoom  # voxel size scaled so the extent stays the same
    return MetaTensor(data, affine=aff, meta={"filename_or_obj": f"ct_{'x'.join(map(str, shape))}"})


class _PathCounter:
    """Counts calls of the separable kernel (to report which path medseg took)."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = spacing_module.separable_linear_resample

    def __enter__(self) -> _PathCounter:
        def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.calls += 1
            return self._real(*args, **kwargs)

        spacing_module.separable_linear_resample = spy
        return self

    def __exit__(self, *exc: object) -> None:
        spacing_module.separable_linear_resample = self._real


def _median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up (allocator, MKL/OpenMP pools, lazily built kernels)
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / max(b.abs().max().item(), 1.0))


def bench(shape: tuple[int, int, int], dtype: Any, repeats: int) -> list[tuple[str, ...]]:
    img = _volume(shape)
    rows: list[tuple[str, ...]] = []
    dname = np.dtype(dtype).name
    tf = {
        "MONAI": Spacingd("image", pixdim=PIXDIM, dtype=dtype),
        "medseg": SeparableSpacingd("image", pixdim=PIXDIM, dtype=dtype),
    }

    # (a) forward
    outs = {k: t({"image": img.clone()})["image"] for k, t in tf.items()}
    with _PathCounter() as pc:
        tf["medseg"]({"image": img})
    rel = _rel_diff(outs["medseg"], outs["MONAI"])
    assert outs["medseg"].shape == outs["MONAI"].shape and torch.allclose(
        outs["medseg"].affine, outs["MONAI"].affine
    )
    ms = _median_ms({k: (lambda t=t: t({"image": img})) for k, t in tf.items()}, repeats)
    path = "separable" if pc.calls else "MONAI (fallback)"
    cheaper = separable_is_cheaper(1, list(img.shape[1:]), list(outs["MONAI"].shape[1:]))
    rows.append(
        (f"forward 1ch {'x'.join(map(str, shape))} -> {'x'.join(map(str, outs['MONAI'].shape[1:]))}", dname,
         f"{ms['MONAI']:.1f}", f"{ms['medseg']:.1f}", f"{ms['MONAI'] / ms['medseg']:.2f}",
         f"{path} (cheaper={cheaper})", f"{rel:.1e}")
    )  # fmt: skip

    # (b) Invertd of a 2-channel float32 prediction made on the (4, 4, 5) grid
    pre = {k: Compose([t]) for k, t in tf.items()}
    data = {k: p({"image": img.clone()}) for k, p in pre.items()}
    inv = {
        k: Invertd("pred", transform=pre[k], orig_keys="image", nearest_interp=False, to_tensor=True)
        for k in pre
    }

    def make(k: str) -> dict[str, Any]:
        image = data[k]["image"]
        p = torch.sigmoid((image.as_tensor().float() - 40.0) / 200.0)
        pred = MetaTensor(torch.cat([1.0 - p, p]), meta=copy.deepcopy(dict(image.meta)))
        pred.applied_operations = copy.deepcopy(image.applied_operations)
        return {**data[k], "pred": pred}

    inputs = {k: make(k) for k in pre}
    outs = {k: inv[k](make(k))["pred"] for k in pre}
    assert outs["medseg"].shape == outs["MONAI"].shape == (2, *shape)
    rel = _rel_diff(outs["medseg"], outs["MONAI"])
    with _PathCounter() as pc:
        inv["medseg"](make("medseg"))
    # Invertd copies what it inverts (it does not change the input dict), so the inputs can be reused
    ms = _median_ms({k: (lambda k=k: inv[k](inputs[k])) for k in pre}, repeats)
    path = "separable" if pc.calls else "MONAI (fallback)"
    cheaper = separable_is_cheaper(2, list(data["MONAI"]["image"].shape[1:]), list(shape))
    rows.append(
        (f"Invertd 2ch {'x'.join(map(str, data['MONAI']['image'].shape[1:]))} -> {'x'.join(map(str, shape))}",
         dname, f"{ms['MONAI']:.1f}", f"{ms['medseg']:.1f}", f"{ms['MONAI'] / ms['medseg']:.2f}",
         f"{path} (cheaper={cheaper})", f"{rel:.1e}")
    )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["192x192x80", "512x512x200"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats} (ms)")
    header = ("case", "dtype", "MONAI ms", "medseg ms", "MONAI/medseg", "medseg path", "max rel diff")
    rows: list[tuple[str, ...]] = [header]
    for s in args.shapes:
        shape = tuple(int(v) for v in s.split("x"))
        reps = args.repeats if np.prod(shape) < 5e6 else max(3, args.repeats // 2)
        for dtype in (np.float64, np.float32):
            rows += bench(shape, dtype, reps)  # type: ignore[arg-type]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
