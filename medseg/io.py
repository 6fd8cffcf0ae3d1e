"""Atomic file writes: every output medseg writes appears whole or not at all.

A file is written under a temporary name in its target folder (``.<name>.<random>.tmp<suffix>``) and
renamed onto the target with ``os.replace`` (atomic on POSIX and Windows within one file system), so a
failure or a killed process never leaves a half-written output under the final name. Standard library
only: writers of every kind (NIfTI, DICOM SEG, PNG, reports, markers) import it at no cost.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_target", "atomic_write_text"]


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike[str], suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to ``path``; ``os.replace`` it onto ``path`` when the block succeeds.

    The temporary file is removed when the block raises. ``suffix`` ends the temporary name (writers that
    choose their format by the file name, e.g. ``.nii.gz`` or ``.png``).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str, suffix: str = "") -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_target(path, suffix) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return os.fspath(path)
