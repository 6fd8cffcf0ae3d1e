"""Helpers shared by the sample-data generators."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage


def make_rng(seed: int, stream: int) -> np.random.Generator:
    """An independent PCG64 stream per (seed, dataset); identical under NumPy 1.26 and 2.x."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]
) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation (float64)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    std = float(field.std())
    return field / std if std > 0 else field


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_dataset(
    dest: Path, generate: Callable[[Path, np.random.Generator, int], None], *, seed: int, stream: int
) -> Path:
    """Run ``generate(tmp_dir, rng, seed)`` in a temporary folder, then move it to ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        generate(tmp, make_rng(seed, stream), seed)
        os.chmod(tmp, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest
