"""Benchmark: fp32 contiguous vs fp32 channels-last vs bf16 autocast + channels-last on this CPU.

All in one process, one run:

1. the matmul peak of this CPU: a 4096x4096 matmul in fp32 and in bf16 (GFLOP/s);
2. forward passes (inference tiles) of the paper's U-Net (572x572, 64 features, depth 4) and of the three
   bundles' networks at their inference tile sizes, with GFLOP (``torch.utils.flop_counter``) and GFLOP/s,
   also as a fraction of the bf16 matmul peak;
3. training steps (``MixedPrecisionInferer`` forward, fp32 cross-entropy, backward, SGD momentum 0.99;
   batch 4) of the paper's U-Net at 252x252 and of the bundles' networks at their training patch sizes;
4. ``medseg predict`` end to end on 20 inputs per bundle (copies of the sample data: nuclei PNGs, brain
   MRI ``.mat`` slices, CT volumes of ``--ct-size`` as NIfTI), random weights (timing only), the three
   settings interleaved within each repeat; medians.

"fp32 contiguous" is how medseg ran on CPU before ``medseg.precision``; "bf16 channels-last" is what
``precision="auto"`` picks on a CPU with native bf16 (printed at the top).
Run: ``python benchmarks/bench_precision.py [--repeats 3] [--n 20] [--skip-predict] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from medseg.inferers import MixedPrecisionInferer  # noqa: E402
from medseg.networks import UNet  # noqa: E402
from medseg.precision import Precision, cpu_bf16_support, resolve_precision  # noqa: E402

SETTINGS = {
    "fp32 contiguous": Precision("fp32", "cpu", False),
    "fp32 channels_last": Precision("fp32", "cpu", True),
    "bf16 channels_last": Precision("bf16", "cpu", True),
}

# name: (network kwargs, inference tile (batch 1), training patch (batch 4))
NETS: dict[str, tuple[dict, tuple[int, ...], tuple[int, ...]]] = {
    "paper U-Net (64 / depth 4, valid)": (dict(spatial_dims=2, features=64, depth=4), (572, 572), (252, 252)),
    "unet_nuclei_2d (32 / 3, valid, BN)": (
        dict(spatial_dims=2, features=32, depth=3, norm="batch"), (508, 508), (188, 188),
    ),
    "unet_brain_tumor_mri (16 / 4, same, BN)": (
        dict(spatial_dims=2, out_channels=1, features=16, depth=4, padding="same", norm="batch", dropout=0.0),
        (256, 256), (128, 128),
    ),
    "unet_ct_3d (8 / 3, same, IN, 3D)": (
        dict(spatial_dims=3, features=8, depth=3, padding="same", norm="instance", dropout=0.0),
        (96, 96, 48), (48, 48, 24),
    ),
}  # fmt: skip


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(repeats: int, dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, float]:
    """GFLOP/s of a 4096x4096 matmul in each of ``dtypes`` (best of ``repeats``)."""
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    cast = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out = {}
    for name in dtypes:
        x, y = a.to(cast[name]), b.to(cast[name])
        out[name] = 2 * n**3 / best_of(lambda x=x, y=y: x @ y, repeats) / 1e9
    return out


def flops(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def forward_row(kwargs: dict, tile: tuple[int, ...], repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(1, 1, *tile)
    row: dict[str, float] = {}
    for name, plan in SETTINGS.items():
        net = plan.prepare(UNet(**kwargs).eval())
        xi = plan.format_input(x)

        def run(net: nn.Module = net, xi: torch.Tensor = xi, plan: Precision = plan) -> None:
            with torch.no_grad(), plan.autocast():
                net(xi)

        if not row:
            row["gflop"] = flops(lambda net=net, xi=xi: net(xi)) / 1e9
        row[name] = best_of(run, repeats)
    return row


def train_row(kwargs: dict, patch: tuple[int, ...], repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(4, 1, *patch)
    row: dict[str, float] = {}
    for name, plan in SETTINGS.items():
        net = plan.prepare(UNet(**kwargs).train())
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99)
        inferer = MixedPrecisionInferer(plan)
        out_shape = inferer(x, net).shape
        if out_shape[1] == 1:
            target = torch.rand(out_shape).round()
            loss_fn: Callable = nn.functional.binary_cross_entropy_with_logits
        else:
            target = torch.randint(0, out_shape[1], (out_shape[0], *out_shape[2:]))
            loss_fn = nn.functional.cross_entropy

        def step(net: nn.Module = net, opt=opt, inferer=inferer, target=target, loss_fn=loss_fn) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(inferer(x, net), target).backward()
            opt.step()

        if not row:
            row["gflop"] = flops(step) / 1e9
        row[name] = best_of(step, repeats)
    return row


# ------------------------------------------------------------------------------------- medseg predict
def _bundle_copy(name: str, tmp: Path) -> Path:
    from monai.bundle import ConfigParser

    dst = tmp / "bundles" / name
    shutil.copytree(ROOT / "bundles" / name / "configs", dst / "configs")
    (dst / "models").mkdir()
    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "inference.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), dst / "models" / "model.pt")
    return dst


def _inputs(name: str, tmp: Path, n: int, ct_size: tuple[int, int, int]) -> Path:
    folder = tmp / "inputs" / name
    folder.mkdir(parents=True)
    if name == "unet_ct_3d":
        from bench_predict import make_volumes

        make_volumes(folder, n, ct_size)
        return folder
    src = {
        "unet_nuclei_2d": sorted((ROOT / "sample_data" / "nuclei_2d" / "images").glob("*.png")),
        "unet_brain_tumor_mri": sorted((ROOT / "sample_data" / "brain_mri_mat").glob("*.mat")),
    }[name]
    for i in range(n):
        shutil.copy(src[i % len(src)], folder / f"case_{i:03d}{src[i % len(src)].suffix}")
    return folder


def predict_rows(n: int, repeats: int, ct_size: tuple[int, int, int]) -> dict[str, dict[str, float]]:
    from medseg.predict import BatchPredictor

    rows: dict[str, dict[str, float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    try:
        for name in ("unet_nuclei_2d", "unet_brain_tumor_mri", "unet_ct_3d"):
            bundle, inputs = _bundle_copy(name, tmp), _inputs(name, tmp, n, ct_size)
            times: dict[str, list[float]] = {s: [] for s in SETTINGS}
            for rep in range(repeats + 1):  # the first round warms caches up and is not counted
                for setting, plan in SETTINGS.items():
                    out = tmp / "out" / f"{name}-{setting.replace(' ', '_')}-{rep}"
                    p = BatchPredictor.from_bundle(bundle, out, precision=plan, progress=False)
                    t0 = time.perf_counter()
                    rows_ = p.run(str(inputs))
                    wall = time.perf_counter() - t0
                    bad = [r.error for r in rows_ if r.status != "ok"]
                    if bad:
                        raise RuntimeError(f"{name}: {bad[0]}")
                    if rep:
                        times[setting].append(wall)
                    shutil.rmtree(out)
            rows[name] = {s: statistics.median(t) for s, t in times.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=20, help="inputs per bundle for medseg predict")
    ap.add_argument("--ct-size", type=int, nargs=3, default=[192, 192, 80])
    ap.add_argument("--skip-predict", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    support, reason = cpu_bf16_support()
    auto = resolve_precision("auto", "cpu")
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"precision='auto' -> {auto} ({reason})")
    peak = matmul_peak(args.repeats)
    print(f"matmul 4096^2: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s\n")
    result: dict = {"cpu": cpu, "threads": torch.get_num_threads(), "auto": str(auto), "peak": peak}

    names = list(SETTINGS)
    for title, fn, sizes in (("forward, batch 1", forward_row, 1), ("training step, batch 4", train_row, 2)):
        print(f"## {title}")
        print(f"| network | size | GFLOP | {' | '.join(names)} | speed-up | bf16 GFLOP/s (% of bf16 peak) |")
        print("|---|---|---|" + "---|" * len(names) + "---|---|")
        section = {}
        for net_name, (kwargs, tile, patch) in NETS.items():
            size = tile if sizes == 1 else patch
            row = fn(kwargs, size, args.repeats)
            section[net_name] = row
            bf16 = row["bf16 channels_last"]
            rate = row["gflop"] / bf16
            print(
                f"| {net_name} | {'x'.join(map(str, size))} | {row['gflop']:.1f} | "
                + " | ".join(f"{row[s]:.3f} s" for s in names)
                + f" | {row['fp32 contiguous'] / bf16:.2f}x | {rate:.0f} ({100 * rate / peak['bf16']:.0f}%) |"
            )
        result[title] = section
        print()

    if not args.skip_predict:
        print(f"## medseg predict, {args.n} inputs per bundle, end to end (median of {args.repeats})")
        print(f"| bundle | {' | '.join(names)} | speed-up |")
        print("|---|" + "---|" * len(names) + "---|")
        pred = predict_rows(args.n, args.repeats, tuple(args.ct_size))
        for name, row in pred.items():
            print(
                f"| {name} | "
                + " | ".join(f"{row[s]:.2f} s" for s in names)
                + f" | {row['fp32 contiguous'] / row['bf16 channels_last']:.2f}x |"
            )
        result["predict"] = pred
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
