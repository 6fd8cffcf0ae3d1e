"""Fast reversal of the first three axes: ``(z, y, x[, c])`` <-> ``(x, y, z[, c])`` copies.

DICOM and NIfTI store x fastest, MONAI's arrays are ``(x, y, z)`` C-ordered (z fastest): every read and
write of a volume needs one reversed copy. numpy's plain transposed copy walks the source with a whole-
slice stride and is 4-7x slower than copying tile by tile so that source and destination lines of a
tile stay in cache.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["transposed_copy"]

_TILE = (64, 4, 64)  # (x, y, z) tile of the transposed copy: 32 KiB of int16, fits L1/L2


def transposed_copy(
    raw: np.ndarray,
    dtype: np.dtype | type | None = None,
    pool: ThreadPoolExecutor | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """C-contiguous copy of ``raw`` with its first three axes reversed, cast to ``dtype`` (default: same).

    ``raw`` ``(z, y, x[, c])`` gives ``(x, y, z[, c])`` and vice versa; trailing axes are kept. The
    copy goes tile by tile (slabs along the output's first axis run on ``pool`` when given). ``out``: an
    array (or a view, e.g. a slab of a larger volume) of the reversed shape to copy into instead.
    """
    if raw.ndim < 3:
        raise ValueError(f"transposed_copy needs at least 3 axes, got shape {raw.shape}")
    nz, ny, nx = raw.shape[:3]
    if out is None:
        dtype = raw.dtype if dtype is None else np.dtype(dtype)
        out = np.empty((nx, ny, nz, *raw.shape[3:]), dtype=dtype)
    elif out.shape != (nx, ny, nz, *raw.shape[3:]):
        raise ValueError(f"out has shape {out.shape}, the reversed copy of {raw.shape} needs another")
    perm = (2, 1, 0, *range(3, raw.ndim))
    tx, ty, tz = _TILE

    def slab(x0: int) -> None:
        x1 = x0 + tx
        for y0 in range(0, ny, ty):
            y1 = y0 + ty
            for z0 in range(0, nz, tz):
                src = raw[z0 : z0 + tz, y0:y1, x0:x1].transpose(perm)
                np.copyto(out[x0:x1, y0:y1, z0 : z0 + tz], src, casting="unsafe")

    if pool is None or nx <= tx:
        for x0 in range(0, nx, tx):
            slab(x0)
    else:
        list(pool.map(slab, range(0, nx, tx)))
    return out
