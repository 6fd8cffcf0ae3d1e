"""medseg.data: DICOM / .mat readers registered with MONAI's ``LoadImage``, writers, sample data.

Import-light: ``import medseg.data`` imports neither MONAI nor pydicom; the readers load on first
attribute access, and :mod:`medseg.data.registration` hooks them into ``LoadImage`` as soon as MONAI's
``monai.transforms.io.array`` is imported (see there).
"""

from __future__ import annotations

import importlib
from typing import Any

from medseg.data.errors import ReadError
from medseg.data.registration import install as _install_readers

# public name -> defining module (imported on first access)
_LAZY: dict[str, str] = {
    "DicomReader": "medseg.data.dicom_reader",
    "DicomVolume": "medseg.data.dicom_reader",
    "MatReader": "medseg.data.mat_reader",
    "register_readers": "medseg.data.registration",
}
_OPTIONAL: dict[str, str] = {}  # names of modules other helpers add: see _extend_optional()


def _extend_optional() -> None:
    """Expose the public names of the writer modules if they exist (they are written separately)."""
    import importlib.util

    for module in ("medseg.data.writers",):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            _OPTIONAL[module] = module


_extend_optional()

__all__ = ["ReadError", *_LAZY]

_install_readers()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        for opt in _OPTIONAL:
            mod = importlib.import_module(opt)
            if name in getattr(mod, "__all__", ()):
                value = getattr(mod, name)
                globals()[name] = value
                return value
        raise AttributeError(f"module 'medseg.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    names = set(__all__)
    for opt in _OPTIONAL:
        try:
            names.update(getattr(importlib.import_module(opt), "__all__", ()))
        except ImportError:
            pass
    return sorted(names)
