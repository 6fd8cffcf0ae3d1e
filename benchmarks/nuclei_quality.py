"""Quality of the nuclei bundle on labelled images: object metrics against an Otsu baseline, same run.

Runs ``bundles/unet_nuclei_2d`` (its ``models/model.pt``, or ``--ckpt``) through ``medseg predict``'s
engine over the images of ``--data`` (``--split`` of its datalist, or of ``--datalist``), reads the
instance labels it writes, and compares them with the true instance labels:

* object accuracy TP / (TP + FP + FN) and F1 at IoU 0.5, 0.7, 0.9 (a predicted and a true nucleus match
  at IoU > t), the mean accuracy over IoU 0.5:0.95 (the DSB 2018 score), foreground IoU;
* the unmatched objects at IoU 0.5 by cause (``medseg.metrics.object_errors``: missed, merged, split,
  inexact true nuclei; extra, merging, fragment, inexact predictions), pooled;
* the same for a baseline: Otsu's threshold of the image + connected components (4-neighbour) with the
  bundle's minimum object size (``min_object_size``).

Counts are pooled over all images ("overall", as StarDist's ``matching_dataset``); the per-image mean of
the per-image scores is printed too. Run:
``python benchmarks/nuclei_quality.py --data ../shared/datasets/dsb2018_fluo
--datalist bundles/unet_nuclei_2d/configs/dsb2018_fluo_datalist.json [--split validation]``.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from medseg.metrics import (  # noqa: E402
    ERROR_KINDS,
    IOU_THRESHOLDS,
    foreground_iou,
    object_errors,
    object_scores,
)


def otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance) of the image's histogram."""
    values = np.asarray(image, dtype=np.float64).ravel()
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def otsu_instances(image: np.ndarray, min_size: int = 10) -> np.ndarray:
    """The baseline: foreground above Otsu's threshold, 4-connected components of >= ``min_size`` px."""
    fg = np.asarray(image) > otsu_threshold(image)
    labels, n = ndimage.label(fg)
    if n:
        sizes = np.bincount(labels.ravel())
        labels[sizes[labels] < min_size] = 0
    return labels


def scores(pred: np.ndarray, true: np.ndarray) -> dict:
    s = object_scores(pred, true, IOU_THRESHOLDS)
    e = dataclasses.asdict(object_errors(pred, true, 0.5))
    return {"counts": {f"{x.threshold:.2f}": (x.tp, x.fp, x.fn) for x in s},
            "acc50": s[0].accuracy, "f1_50": s[0].f1, "mean_acc": float(np.mean([x.accuracy for x in s])),
            "fg_iou": foreground_iou(pred, true), "objects": int(len(np.unique(pred)) - 1),
            "errors": {k: e[k] for k in ERROR_KINDS}}  # fmt: skip


def pooled(rows: list[dict]) -> dict:
    out = {}
    accs = []
    for t in IOU_THRESHOLDS:
        tp, fp, fn = (sum(r["counts"][f"{t:.2f}"][i] for r in rows) for i in range(3))
        acc = tp / max(1, tp + fp + fn)
        accs.append(acc)
        if t in (0.5, 0.7, 0.9):
            out[f"acc{int(t * 100)}"] = acc
            out[f"f1_{int(t * 100)}"] = 2 * tp / max(1, 2 * tp + fp + fn)
    out["mean_acc"] = float(np.mean(accs))
    out["fg_iou_mean"] = float(np.mean([r["fg_iou"] for r in rows]))
    out["per_image_acc50"] = float(np.mean([r["acc50"] for r in rows]))
    out["per_image_mean_acc"] = float(np.mean([r["mean_acc"] for r in rows]))
    out["errors_50"] = {k: int(sum(r["errors"][k] for r in rows)) for k in ERROR_KINDS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset folder (images + instance labels)")
    ap.add_argument("--datalist", default=None, help="datalist JSON (paths relative to --data)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--bundle", default=str(ROOT / "bundles" / "unet_nuclei_2d"))
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument(
        "--set",
        nargs="*",
        action="extend",
        default=[],
        metavar="ID=JSON",
        help='inference config overrides, e.g. flip_members="both" target_diameter=19.7',
    )
    ap.add_argument("--quiet", action="store_true", help="no per-image lines")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from monai.transforms import LoadImage

    from medseg.data.datalist import load_datalist
    from medseg.predict import BatchPredictor

    items = load_datalist(args.data, args.split, datalist=args.datalist, limit=args.limit)
    load = LoadImage(image_only=True)  # the engine's axes convention, so arrays line up
    out = Path(tempfile.mkdtemp(prefix="nuclei_quality_"))
    try:
        configs = [str(Path(args.bundle) / "configs" / "inference.json")]
        if args.set:
            override = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
            (out / "override.json").write_text(json.dumps(override))
            configs.append(str(out / "override.json"))
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(configs)
        min_size = int(parser.get_parsed_content("min_object_size")) if "min_object_size" in parser else 10
        predictor = BatchPredictor.from_bundle(
            args.bundle, out / "pred", config_file=configs, checkpoint=args.ckpt, precision=args.precision,
            progress=False,
        )  # fmt: skip
        t0 = time.perf_counter()
        rows = {Path(r.input).name: r for r in predictor.run([{"image": it["image"]} for it in items])}
        wall = time.perf_counter() - t0
        model, base = [], []
        if not args.quiet:
            print(
                "| image | size | nuclei | U-Net objects | acc@0.5 | F1@0.5 | mean acc | fg IoU | "
                "Otsu objects | acc@0.5 | F1@0.5 | mean acc | fg IoU | s |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for it in items:
            row = rows[Path(it["image"]).name]
            if row.status != "ok":
                raise RuntimeError(f"{it['image']}: {row.error}")
            inst = np.asarray(nib.load(out / "pred" / f"{row.id}_instances.nii.gz").dataobj).squeeze()
            inst = inst.astype(np.int64)
            true = np.asarray(load(it["label"])).squeeze().astype(np.int64)
            image = np.asarray(load(it["image"])).squeeze()
            if image.ndim == 3:  # RGB(A) stored grey images
                image = image[..., :3].mean(-1)
            m, b = scores(inst, true), scores(otsu_instances(image, min_size), true)
            model.append(m)
            base.append(b)
            if not args.quiet:
                size = "x".join(map(str, true.shape))
                print(f"| {Path(it['image']).stem} | {size} | {len(np.unique(true)) - 1} | "
                      f"{m['objects']} | {m['acc50']:.3f} | {m['f1_50']:.3f} | {m['mean_acc']:.3f} | "
                      f"{m['fg_iou']:.3f} | {b['objects']} | {b['acc50']:.3f} | {b['f1_50']:.3f} | "
                      f"{b['mean_acc']:.3f} | {b['fg_iou']:.3f} | {row.seconds:.2f} |")  # fmt: skip
        overall = {"U-Net (medseg unet_nuclei_2d)": pooled(model),
                   "Otsu + connected components": pooled(base)}  # fmt: skip
        per_image = wall / max(1, len(items))
        print(f"\n{len(items)} images ({args.split}), {wall:.1f} s end to end "
              f"({per_image:.2f} s per image), precision {predictor.precision}\n")  # fmt: skip
        keys = ["acc50", "f1_50", "acc70", "f1_70", "acc90", "f1_90", "mean_acc", "fg_iou_mean",
                "per_image_acc50", "per_image_mean_acc"]  # fmt: skip
        print("| method | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for name, o in overall.items():
            print(f"| {name} | " + " | ".join(f"{o[k]:.3f}" for k in keys) + " |")
        print("\nUnmatched objects at IoU 0.5 by cause (true nuclei | predictions), pooled:\n")
        print("| method | " + " | ".join(ERROR_KINDS) + " |")
        print("|---|" + "---|" * len(ERROR_KINDS))
        for name, o in overall.items():
            print(f"| {name} | " + " | ".join(str(o["errors_50"][k]) for k in ERROR_KINDS) + " |")
        if args.json:
            doc = {"overall": overall, "seconds": wall, "n": len(items)}
            Path(args.json).write_text(json.dumps(doc, indent=2))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
