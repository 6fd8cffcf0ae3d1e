"""Deterministic sample datasets: ``medseg sample-data --out DIR`` writes ``DIR/<name>/``.

The committed ``sample_data/`` folder of the repository is exactly what
``generate_sample_data("sample_data")`` writes with the default seed 0: same arrays, same geometry,
same UIDs (derived from the seed), and no time stamps anywhere.

- ``nuclei_2d``: fluorescence-microscopy-like 2D images with touching nuclei, instance labels.
- ``brain_mri_mat``: MRI slices with a tumour, one MATLAB file per slice as the figshare set.
- ``ct_3d``: CT volumes with a liver-like organ, as DICOM series and NIfTI, NIfTI labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from medseg.data.sample_data import brain_mri, ct, nuclei
from medseg.data.sample_data._common import write_dataset

__all__ = ["DATASETS", "generate_sample_data"]

_GENERATORS: dict[str, tuple[int, Callable[..., None]]] = {
    "nuclei_2d": (1, nuclei.generate),
    "brain_mri_mat": (2, brain_mri.generate),
    "ct_3d": (3, ct.generate),
}

#: names of the sample datasets, in the order they are generated
DATASETS: tuple[str, ...] = tuple(_GENERATORS)


def generate_sample_data(out: str | Path, names: Sequence[str] | None = None, seed: int = 0) -> list[Path]:
    """Write the sample datasets ``names`` (default: all) to ``out/<name>/``; return those folders.

    Each dataset is built in a temporary folder next to its destination and then moved into
    place, replacing an older ``out/<name>/`` completely, so no stale or half-written files remain.
    The content depends only on ``seed`` (and each dataset's own stream is independent of which
    other datasets are generated).
    """
    names = list(DATASETS if names is None else names)
    unknown = [n for n in names if n not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown sample dataset(s) {unknown}; choose from {list(DATASETS)}")
    out = Path(out)
    written: list[Path] = []
    for name in dict.fromkeys(names):
        stream, generate = _GENERATORS[name]
        written.append(write_dataset(out / name, generate, seed=seed, stream=stream))
    return written
