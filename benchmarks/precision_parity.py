"""Quality parity of bf16 vs fp32 on the sample-data bundles: training and inference.

For each bundle and seed: train with ``--precision fp32`` and with ``--precision bf16`` (the default
configs otherwise: same epochs, same data, same seed), then predict the validation split with each model
in fp32 and in bf16 (the bundle's validation inferer and post-processing) and report

* the validation Dice of each model (fp32 inference): bf16 training vs fp32 training, with wall times;
* for each model, bf16 vs fp32 inference: the fraction of pixels whose label differs, and the change of
  the Dice.

Run: ``python benchmarks/precision_parity.py [--bundles unet_nuclei_2d ...] [--seeds 0 1] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = {"unet_nuclei_2d": "nuclei_2d", "unet_brain_tumor_mri": "brain_mri_mat", "unet_ct_3d": "ct_3d"}


def train(bundle: Path, data: Path, precision: str, seed: int) -> float:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(bundle / "configs" / "train.json"), "--dataset_dir", str(data), "--precision", precision,
           "--seed", str(seed)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - t0


def predict_validation(bundle: Path, data: Path, precision: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(label maps, reference labels) of the validation split with the trained model in ``precision``."""
    from monai.bundle import ConfigParser

    from medseg.predict.engine import load_checkpoint

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["precision"] = precision
    parser["dataset_dir"] = str(data)
    net = parser.get_parsed_content("network")
    load_checkpoint(net, bundle / "models" / "model.pt")
    net.eval()
    dataset = parser.get_parsed_content("validate#dataset")
    inferer = parser.get_parsed_content("validate#inferer")
    post = parser.get_parsed_content("validate#postprocessing")
    preds, labels = [], []
    with torch.no_grad():
        for item in dataset:
            d = dict(item)
            d["pred"] = inferer(d["image"][None].float(), net)[0]
            d = post(d)
            pred, lab = d["pred"], d["label"]
            # one-hot (argmax + to_onehot) or sigmoid-thresholded single channel -> a label map
            pred = pred.argmax(0) if pred.shape[0] > 1 else pred[0] > 0.5
            lab = lab.argmax(0) if lab.shape[0] > 1 else lab[0] > 0.5
            preds.append(np.asarray(pred).astype(np.int64))
            labels.append(np.asarray(lab).astype(np.int64))
    return preds, labels


def dice(preds: list[np.ndarray], labels: list[np.ndarray]) -> float:
    """Mean over cases of the foreground Dice (all non-zero labels as foreground)."""
    out = []
    for p, g in zip(preds, labels, strict=True):
        p, g = p > 0, g > 0
        out.append(2.0 * (p & g).sum() / max(1, p.sum() + g.sum()))
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", nargs="+", default=list(DATA))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="precision_parity_"))
    print("| bundle | seed | trained in | train s | val Dice (fp32 inference) | Dice, bf16 inference | "
          "pixels differing, bf16 vs fp32 inference |")
    print("|---|---|---|---|---|---|---|")
    try:
        for name in args.bundles:
            for seed in args.seeds:
                for trained in ("fp32", "bf16"):
                    bundle = tmp / f"{trained}-{seed}" / name
                    shutil.copytree(ROOT / "bundles" / name / "configs", bundle / "configs")
                    data = ROOT / "sample_data" / DATA[name]
                    seconds = train(bundle, data, trained, seed)
                    p32, labels = predict_validation(bundle, data, "fp32")
                    p16, _ = predict_validation(bundle, data, "bf16")
                    differ = sum(int((a != b).sum()) for a, b in zip(p32, p16, strict=True)) / sum(
                        a.size for a in p32
                    )
                    row = {"bundle": name, "seed": seed, "trained": trained, "train_s": seconds,
                           "dice_fp32": dice(p32, labels), "dice_bf16": dice(p16, labels),
                           "differ": differ}  # fmt: skip
                    results.append(row)
                    print(
                        f"| {name} | {seed} | {trained} | {seconds:.0f} | {row['dice_fp32']:.4f} | "
                        f"{row['dice_bf16']:.4f} ({row['dice_bf16'] - row['dice_fp32']:+.4f}) | "
                        f"{100 * differ:.3f}% |",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
