"""Register medseg's readers with MONAI's ``LoadImage`` without importing MONAI eagerly.

MONAI's ``LoadImage()`` (and ``LoadImaged``) registers one instance of every entry of
``monai.transforms.io.array.SUPPORTED_READERS`` in the table's insertion order and, with no
``reader=``, tries them from last to first, taking the first whose ``verify_suffix`` accepts the
path. Appending ``dicomreader`` and ``matreader`` to that table therefore makes every
default-constructed ``LoadImage`` try them first, for the paths they claim only (DICOM suffixes,
folders and files with the ``DICM`` preamble; ``.mat``), while NIfTI and the rest still go to MONAI's
readers. ``reader="DicomReader"`` / ``reader="MatReader"`` (any case) resolve through the same table.

``import medseg`` must stay cheap (importing MONAI takes seconds), so :func:`install` only adds a
post-import hook: the table is extended right after ``monai.transforms.io.array`` has been executed,
or at once if it already has. The table entries are small factories that import the reader module on
first use, so nothing is imported while MONAI is half-way through its own imports.

``MONAI_DICOM_READER`` (MONAI >= 1.6) moves MONAI's preferred DICOM reader to the end of the order,
i.e. before ours: set it only to prefer MONAI's reader on purpose.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

__all__ = ["install", "register_readers", "READER_KEYS"]

_TARGET = "monai.transforms.io.array"

#: ``SUPPORTED_READERS`` key -> (module, class name)
READER_KEYS: dict[str, tuple[str, str]] = {
    "matreader": ("medseg.data.mat_reader", "MatReader"),
    "dicomreader": ("medseg.data.dicom.reader", "DicomReader"),
}


class _ReaderFactory:
    """Callable stand-in for a reader class in ``SUPPORTED_READERS``: imports it on first call."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.__name__, self.__qualname__ = module, name, name

    def resolve(self) -> type:
        return getattr(importlib.import_module(self.module), self.__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<lazy {self.module}.{self.__name__}>"


def _module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def register_readers(array_module: ModuleType | None = None) -> None:
    """Append medseg's readers to MONAI's ``SUPPORTED_READERS`` (idempotent; last = tried first)."""
    if array_module is None:
        array_module = importlib.import_module(_TARGET)
    table = getattr(array_module, "SUPPORTED_READERS", None)
    if not isinstance(table, dict):  # pragma: no cover - very old / future MONAI
        return
    for key, (module, name) in READER_KEYS.items():
        if not _module_available(module):
            continue
        table.pop(key, None)
        table[key] = _ReaderFactory(module, name)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register_readers(module)

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, ... of the wrapped loader
        return getattr(self._loader, name)


class _Hook(importlib.abc.MetaPathFinder):
    _busy = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _TARGET or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


_installed = False


def install() -> None:
    """Register now if MONAI's ``LoadImage`` module is loaded, else when it gets imported."""
    global _installed
    if _installed:
        return
    _installed = True
    module = sys.modules.get(_TARGET)
    if module is not None:
        register_readers(module)
    else:
        sys.meta_path.insert(0, _Hook())
