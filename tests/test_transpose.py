"""medseg.data.transpose: the tiled axis-reversing copy used by the DICOM reader and the NIfTI writer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from medseg.data.transpose import transposed_copy


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (130, 9, 70), (70, 5, 140, 3)])
@pytest.mark.parametrize("dtype", [None, np.float32, np.uint8])
@pytest.mark.parametrize("threads", [0, 2])
def test_equals_numpy_transpose(shape: tuple[int, ...], dtype, threads: int) -> None:
    a = np.random.default_rng(0).integers(-50, 200, shape).astype(np.int16)
    pool = ThreadPoolExecutor(threads) if threads else None
    try:
        out = transposed_copy(a, dtype, pool)
    finally:
        if pool:
            pool.shutdown()
    perm = (2, 1, 0, *range(3, a.ndim))
    ref = np.transpose(a, perm).astype(dtype or a.dtype)  # same unsafe cast as np.copyto
    assert out.flags.c_contiguous and out.dtype == ref.dtype and np.array_equal(out, ref)
    if dtype is None:  # reversing twice gives the input back
        assert np.array_equal(transposed_copy(out), a)


def test_rejects_fewer_than_three_axes() -> None:
    with pytest.raises(ValueError, match="at least 3 axes"):
        transposed_copy(np.zeros((4, 5)))
