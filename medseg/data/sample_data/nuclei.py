"""``nuclei_2d``: fluorescence-microscopy-like images of cell nuclei with instance labels.

Each image holds many elliptical nuclei with wavy outlines; about a third of them are placed in
touching clusters (pairs, triples and chains that share a border, the case the U-Net paper's border
weights are made for). Nuclei have chromatin texture and varying brightness; the image gets
uneven illumination, dim out-of-focus nuclei (not labelled), optical blur, Poisson shot noise and
read noise. Images are 8-bit PNG, labels 16-bit PNG instance masks (0 = background, 1..N).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medseg.data.sample_data._common import smooth_noise, write_json

N_IMAGES = 12
SIZES: tuple[tuple[int, int], ...] = ((256, 256), (256, 320), (320, 320), (320, 384), (384, 384), (288, 352))
SPLITS = {"training": range(0, 8), "validation": range(8, 10), "test": range(10, 12)}


def _nucleus_field(
    rng: np.random.Generator, shape: tuple[int, int], cy: float, cx: float, a: float, b: float
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Normalised radius rho (< 1 inside) of a rotated ellipse with a wavy outline, in its bbox."""
    angle = rng.uniform(0, np.pi)
    harmonics = [(k, rng.uniform(0.0, 0.06), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
    pad = int(np.ceil(max(a, b) * 1.3)) + 2
    y0, y1 = max(0, int(cy) - pad), min(shape[0], int(cy) + pad + 1)
    x0, x1 = max(0, int(cx) - pad), min(shape[1], int(cx) + pad + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(amp * np.cos(k * theta + phase) for k, amp, phase in harmonics)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    return (slice(y0, y1), slice(x0, x1)), rho


def _place_nuclei(
    rng: np.random.Generator, shape: tuple[int, int]
) -> list[tuple[float, float, float, float]]:
    """Centres and semi-axes: isolated nuclei plus touching pairs/triples (overlapping ellipses)."""
    h, w = shape
    target = int(h * w / 900)  # ~70 nuclei in 256x256
    nuclei: list[tuple[float, float, float, float]] = []

    def radius() -> tuple[float, float]:
        a = rng.uniform(7.0, 12.0)
        return a, a * rng.uniform(0.65, 0.95)

    def fits(cy: float, cx: float, r: float, factor: float, skip: set[int]) -> bool:
        if not (3 <= cy < h - 3 and 3 <= cx < w - 3):
            return False
        for j, (oy, ox, oa, _) in enumerate(nuclei):
            if j not in skip and np.hypot(cy - oy, cx - ox) < factor * (r + oa):
                return False
        return True

    attempts = 0
    while len(nuclei) < target and attempts < target * 60:
        attempts += 1
        a, b = radius()
        if nuclei and rng.uniform() < 0.4:  # grow a touching cluster from an existing nucleus
            parent = int(rng.integers(len(nuclei)))
            py, px, pa, pb = nuclei[parent]
            phi = rng.uniform(0, 2 * np.pi)
            dist = (0.5 * (pa + pb) + 0.5 * (a + b)) * rng.uniform(0.72, 0.88)
            cy, cx = py + dist * np.sin(phi), px + dist * np.cos(phi)
            if fits(cy, cx, a, 0.62, set()) and fits(cy, cx, a, 1.2, {parent}):
                nuclei.append((cy, cx, a, b))
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            if fits(cy, cx, a, 1.25, set()):
                nuclei.append((cy, cx, a, b))
    return nuclei


def make_image(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8, instance labels uint16) pair."""
    h, w = shape
    best = np.full(shape, 1.0)  # smallest rho so far; pixels with rho < 1 are nuclei
    owner = np.zeros(shape, dtype=np.int32)
    brightness: list[float] = []
    for i, (cy, cx, a, b) in enumerate(_place_nuclei(rng, shape), start=1):
        box, rho = _nucleus_field(rng, shape, cy, cx, a, b)
        take = rho < best[box]
        best[box][take] = rho[take]
        owner[box][take] = i
        brightness.append(rng.uniform(0.45, 1.0))

    # clean up: keep each instance's largest component, drop tiny ones, number 1..N
    labels = np.zeros(shape, dtype=np.uint16)
    level = np.zeros(shape)
    n = 0
    for i, (sl_y, sl_x) in enumerate(ndimage.find_objects(owner), start=1):
        if sl_y is None:
            continue
        comp, k = ndimage.label(owner[sl_y, sl_x] == i)
        if k == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(comp), comp, index=np.arange(1, k + 1))
        keep = comp == (int(np.argmax(sizes)) + 1)
        if keep.sum() < 30:
            continue
        n += 1
        labels[sl_y, sl_x][keep] = n
        level[sl_y, sl_x][keep] = brightness[i - 1]

    fg = labels > 0
    texture = 1.0 + 0.12 * smooth_noise(rng, shape, 1.2) + 0.06 * smooth_noise(rng, shape, 3.0)
    rim = 0.78 + 0.22 * np.clip(1.0 - best**2, 0.0, 1.0) ** 0.5  # dimmer towards the nuclear envelope
    signal = np.where(fg, level * texture * rim, 0.0)
    # chromatin spots: small bright dots inside nuclei
    spots = np.zeros(shape)
    n_spots = int(fg.sum() / 60)
    ys, xs = np.nonzero(fg)
    pick = rng.integers(0, len(ys), size=n_spots)
    spots[ys[pick], xs[pick]] = rng.uniform(0.5, 1.5, size=n_spots)
    signal += 0.25 * ndimage.gaussian_filter(spots, 1.0) * fg * 6.0
    # dim, blurred out-of-focus nuclei in the background (not labelled)
    ghosts = np.zeros(shape)
    for _ in range(int(h * w / 9000)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        a = rng.uniform(7, 12)
        box, rho = _nucleus_field(rng, shape, cy, cx, a, a * rng.uniform(0.7, 0.95))
        ghosts[box] = np.maximum(ghosts[box], np.where(rho < 1, rng.uniform(0.06, 0.14), 0.0))
    ghosts = ndimage.gaussian_filter(ghosts, 3.0)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    gy, gx = rng.uniform(-1, 1, size=2)
    illumination = 1.0 + 0.15 * (gy * (yy - 0.5) + gx * (xx - 0.5)) + 0.05 * smooth_noise(rng, shape, 40.0)
    clean = (0.05 + ghosts + signal) * illumination
    clean = ndimage.gaussian_filter(clean, rng.uniform(0.8, 1.3))  # optical blur
    photons = rng.poisson(np.clip(clean, 0, None) * 120.0) / 120.0
    noisy = photons + 0.012 * rng.standard_normal(shape)
    image = np.clip(np.round(noisy * 210.0 + 4.0), 0, 255).astype(np.uint8)
    return image, labels


def generate(out: Path, rng: np.random.Generator, seed: int) -> None:
    """Write ``images/nuclei_XX.png``, ``labels/nuclei_XX.png``, ``datalist.json``, ``README.md``."""
    (out / "images").mkdir()
    (out / "labels").mkdir()
    entries: list[dict[str, str]] = []
    counts: list[int] = []
    touching: list[int] = []
    for i in range(N_IMAGES):
        shape = SIZES[i % len(SIZES)]
        image, labels = make_image(rng, shape)
        name = f"nuclei_{i:02d}.png"
        Image.fromarray(image).save(out / "images" / name, optimize=False, compress_level=9)
        Image.fromarray(labels.astype("<u2")).save(out / "labels" / name, compress_level=9)
        entries.append({"image": f"images/{name}", "label": f"labels/{name}"})
        counts.append(int(labels.max()))
        touching.append(_n_touching(labels))
    datalist = {split: [entries[i] for i in idx] for split, idx in SPLITS.items()}
    write_json(out / "datalist.json", datalist)
    (out / "README.md").write_text(_readme(seed, counts, sum(touching)), encoding="utf-8")


def _n_touching(labels: np.ndarray) -> int:
    """Number of instances that share a border with another instance (4-neighbourhood)."""
    ids: set[int] = set()
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:], labels[:-1])):
        m = (a > 0) & (b > 0) & (a != b)
        ids |= set(a[m].tolist()) | set(b[m].tolist())
    return len(ids)


def _readme(seed: int, counts: list[int], n_touching: int) -> str:
    sizes = ", ".join(f"{h}x{w}" for h, w in SIZES)
    return f"""# nuclei_2d: synthetic fluorescence microscopy of cell nuclei

{N_IMAGES} single-channel 2D images of a DAPI-like nuclear stain (sizes {sizes} px,
rows x columns), with {min(counts)}-{max(counts)} nuclei per image ({sum(counts)} in all). Nuclei are
wavy ellipses with chromatin texture and varying brightness; {n_touching} of them
({100 * n_touching / sum(counts):.0f}%) touch another nucleus (clusters sharing a border).
The image has uneven illumination, dim
out-of-focus nuclei in the background (not labelled), optical blur, Poisson shot noise and
read noise.

Made by `medseg sample-data --out sample_data --datasets nuclei_2d` (seed {seed}); the
generator is `medseg/data/sample_data/nuclei.py`. It is synthetic: no real cells, no patients.

## Layout

- `images/nuclei_XX.png`: 8-bit grayscale PNG.
- `labels/nuclei_XX.png`: 16-bit grayscale PNG **instance** mask, same size: 0 = background,
  1..N = one value per nucleus. Touching nuclei have different values and share a border
  (no background gap). A binary mask is `label > 0`.
- `datalist.json`: MONAI decathlon-style lists of `{{"image", "label"}}` paths relative to this
  folder.

## Splits

training: images 00-07, validation: 08-09, test: 10-11.
"""
