"""Nucleus diameters of a labelled split: where the nuclei bundle's ``target_diameter`` comes from.

The diameter of a nucleus is that of the disc of its area, ``2 * sqrt(area / pi)`` (the estimate
:func:`medseg.inferers.median_diameter` makes from predicted instances at test time; nuclei under
``--min_size`` px are left out as there). Prints the median over all nuclei of the split, the median of
the per-image medians and the area-weighted median, with their spread over the images. Run:
``python benchmarks/nuclei_diameter.py --data ../shared/datasets/dsb2018_fluo
--datalist bundles/unet_nuclei_2d/configs/dsb2018_fluo_datalist.json [--split training]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset folder (images + instance labels)")
    ap.add_argument("--datalist", default=None, help="datalist JSON (paths relative to --data)")
    ap.add_argument("--split", default="training")
    ap.add_argument("--min_size", type=int, default=25, help="nuclei under this many pixels are left out")
    args = ap.parse_args()

    from monai.transforms import LoadImage

    from medseg.data.datalist import load_datalist
    from medseg.inferers import median_diameter

    items = load_datalist(args.data, args.split, datalist=args.datalist)
    load = LoadImage(image_only=True)
    per_image, diameters = [], []
    for it in items:
        labels = np.asarray(load(it["label"])).squeeze().astype(np.int64)
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas >= args.min_size]
        if areas.size == 0:
            continue
        d = 2.0 * np.sqrt(areas / np.pi)
        diameters.append(d)
        per_image.append(median_diameter(labels, min_size=args.min_size))
    d = np.concatenate(diameters)
    order = np.argsort(d)
    cum = np.cumsum((d**2)[order])  # area-weighted: the diameter of the nucleus under the median pixel
    weighted = float(d[order][np.searchsorted(cum, cum[-1] / 2)])
    per_image = np.asarray(per_image)
    q = np.percentile(per_image, [5, 25, 50, 75, 95])
    print(f"{args.split}: {len(items)} images, {d.size} nuclei >= {args.min_size} px")
    print(f"median diameter over all nuclei:      {np.median(d):.1f} px")
    print(f"median of the per-image medians:      {np.median(per_image):.1f} px")
    print(f"area-weighted median diameter:        {weighted:.1f} px")
    print("per-image median diameter, 5/25/50/75/95th percentiles: " + " / ".join(f"{v:.1f}" for v in q))


if __name__ == "__main__":
    main()
