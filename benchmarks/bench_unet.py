"""Benchmark: medseg UNet forward vs MONAI BasicUNet of comparable width.

Cases, all in one process, runs interleaved (A, B, A, B, ...) so load changes hit both alike:

* 2D: the paper's network (valid convs, 64..1024 channels, depth 4) on a 572x572 tile (-> 388x388)
  vs BasicUNet(features=(64, 128, 256, 512, 1024, 64)) on the same tile (padded: -> 572x572).
* 3D: medseg's padded variant (``padding="same"``, instance norm, 32..512 channels, depth 4) on a 96^3
  patch vs BasicUNet(features=(32, 64, 128, 256, 512, 32)) (instance norm, LeakyReLU) on the same patch.
  The valid 3D variant cannot take 96^3 (its smallest valid input at depth 4 is 188^3), hence "same".

GFLOP per tile are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOP per multiply-add) and,
for medseg's nets, checked against an analytic count over the conv layers. Prints medians over
``--repeats`` timed runs (after one warm-up), GFLOP/s achieved, time per output megapixel/megavoxel and
the ratio BasicUNet / medseg in the same run.

    python benchmarks/bench_unet.py [--repeats 3] [--device cpu|cuda] [--threads N] [--amp] [--channels-last]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
from monai.networks.nets import BasicUNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medseg.networks import UNet


@dataclass
class Case:
    name: str
    net: nn.Module
    shape: tuple[int, ...]


def count_gflop(net: nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward, on the meta device (no arithmetic is done)."""
    meta = _meta_copy(net)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(shape, device="meta"))
    return counter.get_total_flops() / 1e9


def analytic_gflop(net: nn.Module, shape: tuple[int, ...]) -> float:
    """Sum over conv / up-conv layers of 2 * (weights per output unit) * (output units); norm, ReLU and
    pooling are ignored (as FlopCounterMode does)."""
    meta = _meta_copy(net)
    total = 0

    def hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            # every input unit scatters in_ch * out_ch * prod(k) products (stride == kernel: no overlap)
            inp = _inp[0]
            total += 2 * inp[0].numel() // m.in_channels * m.weight.numel() * inp.shape[0]
        elif isinstance(m, nn.modules.conv._ConvNd):
            per_unit = m.weight[0].numel()  # in_ch / groups * prod(k)
            total += 2 * per_unit * out.numel()

    convs = [m for m in meta.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    handles = [m.register_forward_hook(hook) for m in convs]
    with torch.no_grad():
        meta(torch.empty(shape, device="meta"))
    for h in handles:
        h.remove()
    return total / 1e9


def _meta_copy(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net).to("meta")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(net: nn.Module, x: torch.Tensor, amp: bool) -> float:
    sync(x.device)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=_amp_dtype(x.device), enabled=amp):
        y = net(x)
    sync(x.device)
    dt = time.perf_counter() - t0
    del y
    return dt


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def bench_pair(a: Case, b: Case, device: torch.device, repeats: int, amp: bool, channels_last: bool) -> None:
    times: dict[str, list[float]] = {a.name: [], b.name: []}
    inputs, outputs = {}, {}
    for case in (a, b):
        case.net.eval().to(device)
        x = torch.randn(case.shape, device=device)
        if channels_last:
            fmt = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
            case.net.to(memory_format=fmt)
            x = x.contiguous(memory_format=fmt)
        inputs[case.name] = x
        with torch.no_grad():
            outputs[case.name] = tuple(case.net(x).shape[2:])  # warm-up (also oneDNN primitive creation)
    for _ in range(repeats):
        for case in (a, b):
            times[case.name].append(run_once(case.net, inputs[case.name], amp))

    print(f"\n{a.name}  vs  {b.name}   input {a.shape[2:]}, median of {repeats} (after 1 warm-up)")
    print(f"{'network':<44} {'params':>11} {'GFLOP':>8} {'median s':>9} {'GFLOP/s':>8} {'out':>14} "
          f"{'s/Mvox out':>10}  all runs (s)")
    med = {}
    for case in (a, b):
        gflop = count_gflop(case.net, case.shape)
        check = ""
        if isinstance(case.net, UNet):
            analytic = analytic_gflop(case.net, case.shape)
            check = f" (analytic {analytic:.2f})"
        med[case.name] = statistics.median(times[case.name])
        out_mvox = math.prod(outputs[case.name]) / 1e6
        params = sum(p.numel() for p in case.net.parameters())
        t = med[case.name]
        print(f"{case.name:<44} {params:>11,} {gflop:>8.1f} {t:>9.3f} {gflop / t:>8.1f} "
              f"{'x'.join(map(str, outputs[case.name])):>14} {t / out_mvox:>10.3f}  "
              f"{', '.join(f'{t:.3f}' for t in times[case.name])}{check}")
    print(f"ratio time {b.name.split()[0]} / {a.name.split()[0]}: {med[b.name] / med[a.name]:.2f}")
    for case in (a, b):
        case.net.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--only", choices=["2d", "3d"], default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads, {os.cpu_count()} cores, load avg {load:.1f}")
          + f", amp={args.amp}, channels_last={args.channels_last}")

    if args.only in (None, "2d"):
        bench_pair(
            Case("medseg UNet 2D paper (valid, 64-1024)", UNet(spatial_dims=2), (1, 1, 572, 572)),
            Case("BasicUNet 2D (64-1024, padded)", BasicUNet(2, 1, 2, (64, 128, 256, 512, 1024, 64)),
                 (1, 1, 572, 572)),
            device, args.repeats, args.amp, args.channels_last,
        )
    if args.only in (None, "3d"):
        bench_pair(
            Case("medseg UNet 3D (same, instance, 32-512)",
                 UNet(spatial_dims=3, features=32, padding="same", norm="instance"), (1, 1, 96, 96, 96)),
            Case("BasicUNet 3D (32-512, instance)", BasicUNet(3, 1, 2, (32, 64, 128, 256, 512, 32)),
                 (1, 1, 96, 96, 96)),
            device, args.repeats, args.amp, args.channels_last,
        )


if __name__ == "__main__":
    main()
