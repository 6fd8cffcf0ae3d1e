"""Quality-control overlay PNGs: a few slices of the source scan with the mask outline drawn on top.

Slices are taken along the last spatial axis (axial for CT in MONAI's ``(x, y, z)`` convention): the
one with the largest mask area and two more around it (or three evenly spaced slices when the mask
is empty), shown side by side with row = ``y``, column = ``x``. Intensities are windowed to the 1st-99th
percentile of the image. The outline of each label is the label minus its erosion (one pixel wide),
in a fixed colour per label. Written with Pillow, atomically.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.io import atomic_target

__all__ = ["overlay_slices", "render_overlay", "save_overlay_png"]

_COLOURS = np.array(
    [[255, 64, 64], [64, 255, 64], [64, 160, 255], [255, 220, 0], [255, 0, 255], [0, 255, 255]],
    dtype=np.uint8,
)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def overlay_slices(mask: np.ndarray, n: int = 3) -> list[int]:
    """Indices along the last axis of a 3-D mask: around the largest cross-section, else evenly spaced."""
    depth = mask.shape[-1]
    area = (mask != 0).reshape(-1, depth).sum(axis=0)
    if area.max() == 0:
        return sorted({int(round(v)) for v in np.linspace(0, depth - 1, n + 2)[1:-1]})
    nz = np.flatnonzero(area)
    picks = {int(nz[len(nz) // 2]), int(np.argmax(area)), int(nz[len(nz) // 4]), int(nz[(3 * len(nz)) // 4])}
    return sorted(picks)[:n] if len(picks) > n else sorted(picks)


def render_overlay(image: Any, mask: Any, n_slices: int = 3) -> np.ndarray:
    """RGB uint8 array ``(rows, cols, 3)``: the chosen slices side by side with label outlines.

    ``image`` and ``mask`` share the source grid: ``(x, y)`` or ``(x, y, z)``, optionally channel-first
    ``(1, ...)`` (a multi-channel image shows its first channel).
    """
    img = _as_numpy(image).astype(np.float32)
    lab = _as_numpy(mask)
    if lab.ndim in (3, 4) and lab.shape[0] == 1 and img.shape[-(lab.ndim - 1) :] == lab.shape[1:]:
        lab = lab[0]  # channel-first label map
    if img.ndim == lab.ndim + 1:
        img = img[0] if img.shape[1:] == lab.shape else img[..., 0]  # first channel (or colour plane)
    if img.shape != lab.shape:
        raise ValueError(f"image {img.shape} and mask {lab.shape} are not on the same grid")
    if lab.ndim == 2:
        img, lab = img[..., None], lab[..., None]
    if lab.ndim != 3:
        raise ValueError(f"overlay needs a 2-D or 3-D image, got shape {lab.shape}")
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    panels = []
    for k in overlay_slices(lab, n_slices):
        gray = np.clip((np.nan_to_num(img[:, :, k].T) - lo) / (hi - lo), 0, 1)
        rgb = np.repeat((gray * 255).astype(np.uint8)[..., None], 3, axis=2)
        sl = lab[:, :, k].T
        for j, value in enumerate(v for v in np.unique(sl) if v != 0):
            region = sl == value
            edge = region & ~ndimage.binary_erosion(region)
            rgb[edge] = _COLOURS[j % len(_COLOURS)]
        panels.append(rgb)
        panels.append(np.zeros((rgb.shape[0], 2, 3), dtype=np.uint8))
    return np.concatenate(panels[:-1], axis=1)


def save_overlay_png(image: Any, mask: Any, path: str | os.PathLike[str], n_slices: int = 3) -> str:
    """Render :func:`render_overlay` and write it as PNG (atomically). Returns ``path``."""
    from PIL import Image

    path = os.fspath(path)
    rgb = render_overlay(image, mask, n_slices)
    with atomic_target(path, ".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path
