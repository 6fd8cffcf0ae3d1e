"""Benchmark: peak memory of many-class sliding-window inference, label map vs stitched probabilities.

A 14-class 3D U-Net (same padding, small: memory, not accuracy, is measured) over a CT-sized volume
(default 512x512x500 float32), each method in its own process so that the peak resident memory
(``ru_maxrss``) is its own:

1. MONAI ``sliding_window_inference`` (constant blending, overlap 0.25) + ``argmax``: the usual way;
2. medseg ``OverlapTileInferer`` stitching the 14 channels (``output="logits"``) + ``argmax``;
3. medseg ``OverlapTileInferer(output="labels")``: each tile's argmax written into a uint8 label map.

Prints the peak RSS of each, the part above the input volume, the time, and whether the label maps agree.
Run: ``python benchmarks/bench_label_output.py [--size 512 512 500] [--classes 14] [--roi 128]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(method: str, size: list[int], classes: int, roi: int, out: str) -> None:
    import torch
    from monai.inferers import sliding_window_inference

    from medseg.inferers import OverlapTileInferer
    from medseg.networks import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, classes, features=4, depth=2, padding="same").eval()
    x = torch.randn(1, 1, *size)
    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        if method == "monai":
            y = sliding_window_inference(x, (roi,) * 3, 2, net, overlap=0.25, mode="constant")
            labels = y.argmax(1, keepdim=True).to(torch.uint8)
            del y
        elif method == "medseg-logits":
            y = OverlapTileInferer(roi, sw_batch_size=2, overlap=0.25, precision="fp32")(x, net)
            labels = y.argmax(1, keepdim=True).to(torch.uint8)
            del y
        else:
            kw = {"sw_batch_size": 2, "overlap": 0.25, "precision": "fp32"}
            labels = OverlapTileInferer(roi, **kw, output="labels")(x, net)
    seconds = time.perf_counter() - t0
    np.save(out + ".npy", labels[0, 0, ::4, ::4, ::4].numpy())  # a subsample, to compare the methods
    with open(out + ".json", "w") as fh:
        json.dump({"peak_mb": _rss_mb(), "input_mb": base, "seconds": seconds}, fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 500])
    ap.add_argument("--classes", type=int, default=14)
    ap.add_argument("--roi", type=int, default=128)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.size, args.classes, args.roi, args.out)
        return
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench_labels_")
    vol_mb = np.prod(args.size) * 4 / 2**20
    print(f"volume {'x'.join(map(str, args.size))} float32 ({vol_mb:.0f} MiB), {args.classes} classes, "
          f"tile {args.roi}^3, overlap 0.25")  # fmt: skip
    results = {}
    for method in ("monai", "medseg-logits", "medseg-labels"):
        out = os.path.join(tmp, method)
        cmd = [sys.executable, __file__, "--child", method, "--out", out, "--size", *map(str, args.size),
               "--classes", str(args.classes), "--roi", str(args.roi)]  # fmt: skip
        subprocess.run(cmd, check=True)
        with open(out + ".json") as fh:
            results[method] = json.load(fh)
        results[method]["labels"] = np.load(out + ".npy")
    print("| method | peak RSS (MiB) | above the process before inference (MiB) | s |")
    print("|---|---|---|---|")
    for method, r in results.items():
        print(f"| {method} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['input_mb']:.0f} | {r['seconds']:.1f} |")
    ref = results["monai"]
    for method in ("medseg-logits", "medseg-labels"):
        r = results[method]
        agree = float((r["labels"] == ref["labels"]).mean())
        ratio = (r["peak_mb"] - r["input_mb"]) / max(1.0, ref["peak_mb"] - ref["input_mb"])
        print(f"{method}: peak above input {ratio:.2f}x MONAI's; label agreement with MONAI {agree:.4f}")


if __name__ == "__main__":
    main()
