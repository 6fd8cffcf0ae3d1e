"""Benchmark: the bundles' inference with batch norms as layers vs folded into the convolutions.

``medseg predict`` folds every eval-mode batch norm that follows a convolution into it
(``medseg.networks.fold_batch_norm``). For each bundle whose network has batch norms this runs the
bundle's own inferer (its tiles, test-time flips and precision, from ``inference.json``) on one input of
the size named below, the unfolded and the folded network interleaved within each repeat, and prints the
median seconds, the ratio and the largest difference of the softmax probabilities. Shipped weights
(``models/model.pt``) are used where the bundle has them, random weights with random batch-norm
statistics otherwise. Run: ``python benchmarks/bench_batch_norm_folding.py [--repeats 5]
[--precision auto] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg.bundle import load_weights  # noqa: E402
from medseg.networks import fold_batch_norm  # noqa: E402

#: bundle -> (inferer id in inference.json, input size: a DSB 2018 field, an ISBI 2012 slice, an MRI slice)
CASES = {
    "unet_nuclei_2d": ("tile_inferer", (520, 696)),
    "unet_em_isbi2012": ("inferer", (512, 512)),
    "unet_brain_tumor_mri": ("inferer", (240, 240)),
}


def _randomise_batch_norms(net: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def run_case(bundle: str, inferer_id: str, size: tuple[int, int], precision: str, repeats: int) -> dict:
    folder = ROOT / "bundles" / bundle
    cp = ConfigParser()
    cp.read_config(str(folder / "configs" / "inference.json"))
    cp["bundle_root"] = str(folder)
    cp["device"] = "$torch.device('cpu')"
    cp["precision"] = precision
    net = cp.get_parsed_content("network_def").eval()
    weights = folder / "models" / "model.pt"
    if weights.is_file():
        load_weights(net, weights)
    else:
        _randomise_batch_norms(net)
    folded = copy.deepcopy(net)
    n = fold_batch_norm(folded)
    plan = cp.get_parsed_content("precision_plan")
    plan.prepare(net)
    plan.prepare(folded)
    inferer = cp.get_parsed_content(inferer_id)
    x = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"layers": [], "folded": []}
    outs = {}
    with torch.no_grad():
        for name, m in (("layers", net), ("folded", folded)):  # warm-up
            outs[name] = torch.softmax(inferer(x, m).float(), 1)
        for _ in range(repeats):
            for name, m in (("layers", net), ("folded", folded)):
                t = time.perf_counter()
                inferer(x, m)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = float((outs["layers"] - outs["folded"]).abs().max())
    return {"bundle": bundle, "input": list(size), "precision": str(plan), "batch_norms_folded": n,
            "weights": "shipped" if weights.is_file() else "random", "seconds_layers": med["layers"],
            "seconds_folded": med["folded"], "speedup": med["layers"] / med["folded"],
            "max_abs_probability_difference": diff}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="auto", help="auto / fp32 / bf16 (the bundles' setting)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    for bundle, (inferer_id, size) in CASES.items():
        r = run_case(bundle, inferer_id, size, args.precision, args.repeats)
        rows.append(r)
        print(f"{bundle:22s} {r['input'][0]}x{r['input'][1]}  {r['precision']}  {r['weights']} weights  "
              f"{r['batch_norms_folded']} folded  layers {r['seconds_layers']:.3f} s  "
              f"folded {r['seconds_folded']:.3f} s  {r['speedup']:.2f}x  "
              f"max |dp| {r['max_abs_probability_difference']:.2e}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
