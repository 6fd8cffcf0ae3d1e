"""medseg.data: DICOM / .mat readers registered with MONAI's ``LoadImage``, a faster NIfTI reader, writers,
sample data.

Import-light: ``import medseg.data`` imports neither MONAI nor pydicom; the readers load on first
attribute access, and :mod:`medseg.data.registration` hooks them into ``LoadImage`` as soon as MONAI's
``monai.transforms.io.array`` is imported (see there).
"""

from __future__ import annotations

from medseg._lazy import lazy_exports
from medseg.data.errors import ReadError
from medseg.data.registration import install as _install_readers

# public name -> defining module (imported on first access)
_LAZY: dict[str, str] = {
    "DicomReader": "medseg.data.dicom.reader",
    "DicomVolume": "medseg.data.dicom.reader",
    "SliceHeader": "medseg.data.dicom.headers",
    "scan_file": "medseg.data.dicom.headers",
    "MatReader": "medseg.data.mat_reader",
    "NiftiReader": "medseg.data.nifti_reader",
    "register_readers": "medseg.data.registration",
    "load_datalist": "medseg.data.datalist",
    "StrictLoadImage": "medseg.data.loading",
    "StrictLoadImaged": "medseg.data.loading",
    "preflight": "medseg.data.loading",
    "area_weights": "medseg.data.sampling",
    **{
        name: "medseg.data.writers"
        for name in (
            "DICOM_SERIES_UID_KEY",
            "DICOM_SOURCE_FILES_KEY",
            "DICOM_SOURCE_FRAMES_KEY",
            "mask_to_source_grid",
            "write_dicom_seg",
            "write_nifti_mask",
        )
    },
}

__all__ = ["ReadError", *_LAZY]

_install_readers()


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, eager=("ReadError",))
