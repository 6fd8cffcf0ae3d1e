"""Quality of the EM membrane bundle on held-out ISBI 2012 slices, against a threshold baseline, same run.

Runs ``bundles/unet_em_isbi2012`` (its ``models/model.pt``, or ``--ckpt``) through ``medseg predict``'s
engine over slices 25-29 of the ISBI 2012 training stack (the bundle's held-out split,
``configs/isbi2012_datalist.json``), and scores the membrane maps it writes with the challenge's metrics
(``medseg.metrics``): pixel error (``1 -`` pixel accuracy) and Rand error (``1 -`` foreground-restricted
Rand F-score of the cell regions, predicted borders thinned away). In the same run: the bundle with the
plain threshold of the cell probability (``seed_threshold`` off: no membrane closing), and a baseline, a
Gaussian-smoothed image thresholded (membranes are dark), smoothing and threshold chosen on the training
slices 0-24 for the lowest pixel error. Per-slice rows, then the mean over the slices.

``--fit`` instead sweeps the bundle's ``cell_threshold`` and ``seed_threshold`` on the training slices 0-24
(never on the held-out ones): the cell threshold with the lowest pixel error, then the seed threshold with
the lowest Rand error. Run:
``python benchmarks/em_quality.py --data ../shared/datasets/isbi2012_em [--fit]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg.metrics import pixel_error, rand_scores  # noqa: E402

BUNDLE = ROOT / "bundles" / "unet_em_isbi2012"
#: the challenge's figures for U-Net on its hidden test stack (paper, Table 1)
PAPER = {"pixel_error": 0.0611, "rand_error": 0.0382, "warping_error": 0.000353}


def smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """The baseline's Gaussian smoothing (``sigma`` in pixels)."""
    return ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), sigma)


def fit_threshold_baseline(
    images: list[np.ndarray], labels: list[np.ndarray], sigmas: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)
) -> tuple[float, float]:
    """``(sigma, threshold)`` with the lowest pixel error on the given (training) slices.

    Cell = smoothed intensity above the threshold; every integer threshold 0-255 is tried for each sigma.
    """
    best = (np.inf, 0.0, 0.0)
    truth = np.concatenate([np.asarray(lab).ravel() > 0 for lab in labels])
    for sigma in sigmas:
        values = np.concatenate([smooth(im, sigma).ravel() for im in images])
        # pixel error of "cell = value > t" for all t at once: histograms of cell and membrane pixels
        bins = np.arange(257) - 0.5
        cell_hist = np.histogram(values[truth], bins)[0]
        memb_hist = np.histogram(values[~truth], bins)[0]
        # value > t: cells below or at t and membranes above t are wrong
        wrong = np.cumsum(cell_hist) + (memb_hist.sum() - np.cumsum(memb_hist))
        t = int(np.argmin(wrong))
        err = wrong[t] / truth.size
        if err < best[0]:
            best = (err, sigma, float(t))
    return best[1], best[2]


def threshold_baseline(image: np.ndarray, sigma: float, threshold: float) -> np.ndarray:
    """The baseline's cell map: smoothed image above ``threshold``."""
    return smooth(image, sigma) > threshold


def cell_probabilities(bundle: str, ckpt: str | None, images: list[str]) -> list[np.ndarray]:
    """The bundle's softmax cell probability of each image (its network, preprocessing and inferer)."""
    import torch
    from monai.bundle import ConfigParser

    from medseg.predict import load_checkpoint

    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network")
    load_checkpoint(net, ckpt or str(Path(bundle) / "models" / "model.pt"))
    net.eval()
    pre, inferer = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")
    out = []
    with torch.no_grad():
        for path in images:
            logits = inferer(pre({"image": path})["image"][None], net)
            out.append(torch.softmax(logits.float(), 1)[0, 1].cpu().numpy())
    return out


def fit_thresholds(
    probs: list[np.ndarray],
    labels: list[np.ndarray],
    cell: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5),
    seed: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95),
) -> tuple[float, float]:
    """``(cell_threshold, seed_threshold)``: the lowest mean pixel error, then the lowest mean Rand error."""
    from medseg.transforms import separate_cells

    table = {}
    for c in cell:
        for s in seed:
            maps = [separate_cells(p, c, s) for p in probs]
            px = float(np.mean([pixel_error(m, t) for m, t in zip(maps, labels, strict=True)]))
            rand = float(np.mean([rand_scores(m, t).error for m, t in zip(maps, labels, strict=True)]))
            table[c, s] = (px, rand)
            print(f"| {c} | {s} | {px:.4f} | {rand:.4f} |", flush=True)
    best_cell = min(cell, key=lambda c: np.mean([table[c, s][0] for s in seed]))
    best_seed = min(seed, key=lambda s: table[best_cell, s][1])
    return best_cell, best_seed


def score(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    r = rand_scores(pred, true)
    return {"pixel_error": pixel_error(pred, true), "rand_error": r.error, "split": r.split, "merge": r.merge}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the ISBI 2012 folder (images/<k>.png, labels/<k>.png)")
    ap.add_argument("--bundle", default=str(BUNDLE))
    ap.add_argument("--ckpt", default=None, help="weights instead of the bundle's models/model.pt")
    ap.add_argument("--precision", default=None)
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="ID=JSON",
        help="inference config overrides, e.g. tile_size=[700,700]",
    )
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--fit", action="store_true", help="choose the thresholds on slices 0-24 instead")
    args = ap.parse_args()

    from monai.transforms import LoadImage

    from medseg.data.datalist import load_datalist
    from medseg.predict import BatchPredictor

    datalist = Path(args.bundle) / "configs" / "isbi2012_datalist.json"
    train = load_datalist(args.data, "training", datalist=datalist)
    held_out = load_datalist(args.data, "validation", datalist=datalist)
    load = LoadImage(image_only=True)  # the engine's axes convention, so arrays line up
    array = lambda path: np.asarray(load(path)).squeeze()  # noqa: E731
    if args.fit:
        print("| cell_threshold | seed_threshold | pixel error (slices 0-24) | Rand error (slices 0-24) |")
        print("|---|---|---|---|")
        probs = cell_probabilities(args.bundle, args.ckpt, [it["image"] for it in train])
        best = fit_thresholds(probs, [array(it["label"]) > 0 for it in train])
        print(f"\nchosen on slices 0-24: cell_threshold {best[0]}, seed_threshold {best[1]}")
        return

    sigma, threshold = fit_threshold_baseline(
        [array(i["image"]) for i in train], [array(i["label"]) for i in train]
    )
    out = Path(tempfile.mkdtemp(prefix="em_quality_"))
    try:
        configs = [str(Path(args.bundle) / "configs" / "inference.json")]
        if args.set:
            override = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
            (out / "override.json").write_text(json.dumps(override))
            configs.append(str(out / "override.json"))
        (out / "plain.json").write_text(json.dumps({"seed_threshold": None}))

        def run(folder: str, extra: list[str]) -> tuple[dict, float, str]:
            predictor = BatchPredictor.from_bundle(
                args.bundle,
                out / folder,
                config_file=configs + extra,
                checkpoint=args.ckpt,
                precision=args.precision,
                progress=False,
            )
            t0 = time.perf_counter()
            rows = {Path(r.input).name: r for r in predictor.run([{"image": it["image"]} for it in held_out])}
            return rows, time.perf_counter() - t0, str(predictor.precision)

        rows, wall, precision = run("pred", [])
        plain_rows, _, _ = run("plain", [str(out / "plain.json")])
        model, plain, base = [], [], []
        print("| slice | U-Net pixel error | U-Net Rand error (split / merge) | baseline pixel error | "
              "baseline Rand error | s |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for it in held_out:
            row = rows[Path(it["image"]).name]
            if row.status != "ok":
                raise RuntimeError(f"{it['image']}: {row.error}")
            pred = np.asarray(nib.load(out / "pred" / f"{row.id}_seg.nii.gz").dataobj).squeeze() > 0
            true = array(it["label"]) > 0
            m = score(pred, true)
            prow = plain_rows[Path(it["image"]).name]
            plain.append(
                score(
                    np.asarray(nib.load(out / "plain" / f"{prow.id}_seg.nii.gz").dataobj).squeeze() > 0, true
                )
            )
            b = score(threshold_baseline(array(it["image"]), sigma, threshold), true)
            model.append(m)
            base.append(b)
            print(f"| {Path(it['image']).stem} | {m['pixel_error']:.4f} | {m['rand_error']:.4f} "
                  f"({m['split']:.3f} / {m['merge']:.3f}) | {b['pixel_error']:.4f} | {b['rand_error']:.4f} | "
                  f"{row.seconds:.2f} |")  # fmt: skip
        mean = {
            "U-Net (medseg unet_em_isbi2012)": {k: float(np.mean([r[k] for r in model])) for k in model[0]},
            "same, plain threshold (no membrane closing)": {
                k: float(np.mean([r[k] for r in plain])) for k in plain[0]
            },
            f"smoothed-image threshold (sigma {sigma:g}, t {threshold:g}, fitted on slices 0-24)": {
                k: float(np.mean([r[k] for r in base])) for k in base[0]
            },
        }
        print(f"\n{len(held_out)} held-out slices, {wall:.1f} s end to end, precision {precision}\n")
        print("| method (mean over slices 25-29) | pixel error | Rand error | Rand split | Rand merge |")
        print("|---|---|---|---|---|")
        for name, o in mean.items():
            figures = " | ".join(f"{o[k]:{f}}" for k, f in (("pixel_error", ".4f"), ("rand_error", ".4f"),
                                                           ("split", ".3f"), ("merge", ".3f")))  # fmt: skip
            print(f"| {name} | {figures} |")
        print(f"| paper (hidden test stack) | {PAPER['pixel_error']} | {PAPER['rand_error']} | | |")
        if args.json:
            doc = {
                "mean": mean,
                "per_slice": model,
                "baseline_per_slice": base,
                "seconds": wall,
                "paper": PAPER,
            }
            Path(args.json).write_text(json.dumps(doc, indent=2))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
