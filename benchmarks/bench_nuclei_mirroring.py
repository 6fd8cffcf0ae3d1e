"""Benchmark: the nuclei bundle's test-time mirroring of the border network alone vs of both networks.

``unet_nuclei_2d`` mirrors the input of its border network only (``flip_members: "border"``: the
``BorderGatedEnsemble`` averages that network's logits over the mirrorings of ``flip_axes``, three passes
per tile for one axis); ``flip_members: "both"`` mirrors the whole ensemble in the inferer (four passes),
what the bundle did before; ``none`` turns the flips off (``configs/no_flips.json``: two passes). This
runs the bundle's ``tile_inferer`` on one real 520x696 DSB 2018 field (or a random one without the data)
with the shipped weights, folded batch norms and the bundle's precision as ``medseg predict`` runs them,
the settings interleaved within each repeat, and prints the median seconds, their ratios to ``both``, how
many pixels change class against the default (``border``), and the work per call
(``torch.utils.flop_counter``) with the throughput it implies. Run:
``python benchmarks/bench_nuclei_mirroring.py [--repeats 7] [--precision auto] [--settings border both none]
[--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_precision import matmul_peak  # noqa: E402

from medseg.bundle import load_weights  # noqa: E402
from medseg.networks import fold_batch_norm  # noqa: E402

BUNDLE = ROOT / "bundles" / "unet_nuclei_2d"
FIELD = ROOT.parent / "shared" / "datasets" / "dsb2018_fluo" / "images" / "f4faa3a409014db1.png"  # 520x696


def build(members: str, precision: str) -> tuple[torch.nn.Module, object, torch.Tensor]:
    cp = ConfigParser()
    cp.read_config(str(BUNDLE / "configs" / "inference.json"))
    cp["bundle_root"] = str(BUNDLE)
    cp["device"] = "$torch.device('cpu')"
    cp["precision"] = precision
    if members == "none":
        cp["flip_tta"] = False
    else:
        cp["flip_members"] = members
    net = cp.get_parsed_content("network_def").eval()
    load_weights(net, BUNDLE / "models" / "model.pt")
    fold_batch_norm(net)
    net = cp.get_parsed_content("precision_plan").prepare(net)
    if FIELD.is_file():
        x = cp.get_parsed_content("preprocessing")({"image": str(FIELD)})["image"][None].float()
    else:
        x = torch.rand(1, 1, 520, 696, generator=torch.Generator().manual_seed(0))
    return net, cp.get_parsed_content("tile_inferer"), x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--settings", nargs="+", choices=("border", "both", "none"), default=["border", "both"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    runs = {m: build(m, args.precision) for m in dict.fromkeys(["border", "both", *args.settings])}
    times: dict[str, list[float]] = {m: [] for m in runs}
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        gflop = {}
        for m, (net, inferer, x) in runs.items():  # warm-up, its work counted
            with FlopCounterMode(display=False) as counter:
                out[m] = inferer(x, net)
            gflop[m] = counter.get_total_flops() / 1e9
        for _ in range(args.repeats):
            for m, (net, inferer, x) in runs.items():
                t = time.perf_counter()
                inferer(x, net)
                times[m].append(time.perf_counter() - t)
    med = {m: statistics.median(v) for m, v in times.items()}
    changed = {m: (out[m].argmax(1) != out["border"].argmax(1)).float().mean().item() for m in runs}
    result = {
        "input": str(FIELD.name if FIELD.is_file() else "random 520x696"),
        "precision": args.precision,
        "median_s": med,
        "all_s": times,
        "speedup_vs_both": {m: med["both"] / med[m] for m in runs},
        "pixels_changing_class_vs_border": changed,
        "gflop": gflop,
        "matmul_gflops_fp32": matmul_peak(3, dtypes=("fp32",))["fp32"],
        "threads": torch.get_num_threads(),
    }
    n = result["threads"]
    print(f"{result['input']}, precision {args.precision}, {args.repeats} repeats, {n} threads")
    print("| mirrored | median s | all s | vs both | pixels changing class vs border | GFLOP | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for m in runs:
        gf = gflop[m]
        print(f"| {m} | {med[m]:.3f} | {', '.join(f'{v:.2f}' for v in times[m])} | "
              f"{med['both'] / med[m]:.2f}x | {changed[m]:.2e} | {gf:.0f} | {gf / med[m]:.0f} |")  # fmt: skip
    print(f"border-only mirroring: {result['speedup_vs_both']['border']:.2f}x faster than both; "
          f"fp32 matmul on this CPU: {result['matmul_gflops_fp32']:.0f} GFLOP/s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
