"""medseg: MONAI-based medical image segmentation around the U-Net of Ronneberger et al. (2015).

Public names are importable from the top-level package; the subpackages load lazily so that
``import medseg`` stays cheap (the CLI starts fast and MONAI Label can import it early).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Any

from medseg._lazy import lazy_exports
from medseg._version import __version__

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "UNet": "medseg.networks",
    "BorderGatedEnsemble": "medseg.networks",
    "OverlapTileInferer": "medseg.inferers",
    "MixedPrecisionInferer": "medseg.inferers",
    "Precision": "medseg.precision",
    "resolve_precision": "medseg.precision",
    "prepare_network": "medseg.precision",
    "retain_freed_memory": "medseg.allocator",
    "DicomReader": "medseg.data",
    "MatReader": "medseg.data",
    "ReadError": "medseg.data",
    "WeightedCrossEntropyLoss": "medseg.losses",
    "BorderGatedEnsembleLoss": "medseg.losses",
    "write_nifti_mask": "medseg.data",
    "write_dicom_seg": "medseg.data",
    "load_datalist": "medseg.data",
    "BatchPredictor": "medseg.predict",
    "generate_sample_data": "medseg.data.sample_data",
}

__all__ = ["__version__", *_LAZY]

# The top-level ``transforms/`` folder is installed as ``medseg.transforms``. When this package is
# imported from a source checkout that was installed with ``pip install .`` (not ``-e``), e.g. when
# tests run from the repository root, mount the checkout's ``transforms/`` under that name.
_SOURCE_TRANSFORMS = Path(__file__).resolve().parent.parent / "transforms"


class _SourceTransformsFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "medseg.transforms":
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            _SOURCE_TRANSFORMS / "__init__.py",
            submodule_search_locations=[str(_SOURCE_TRANSFORMS)],
        )


if not (Path(__file__).parent / "transforms").is_dir() and (_SOURCE_TRANSFORMS / "__init__.py").is_file():
    if importlib.util.find_spec("medseg.transforms") is None:
        sys.meta_path.append(_SourceTransformsFinder())


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, eager=("__version__",))


# Eager but cheap (no MONAI import): hooks medseg's DICOM/.mat readers into MONAI's LoadImage.
import medseg.data  # noqa: E402
