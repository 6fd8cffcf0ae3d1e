"""DICOM reading in four steps, one module each.

* :mod:`~medseg.data.dicom.headers`: the per-file header scan, done once (:func:`scan_file`,
  :class:`SliceHeader`);
* :mod:`~medseg.data.dicom.series`: the files of a folder and the choice of one series;
* :mod:`~medseg.data.dicom.geometry`: slice order along the normal (PS3.3 C.7.6.2.1.1), gaps, affine;
* :mod:`~medseg.data.dicom.pixels`: pixel decoding (PS3.5 transfer syntaxes) and rescale;
* :mod:`~medseg.data.dicom.reader`: :class:`DicomReader`, the MONAI ``ImageReader`` built from them.

Import-light: the names load on first access (the reader imports MONAI, the header scan pydicom).
"""

from __future__ import annotations

from medseg._lazy import lazy_exports
from medseg.data import formats

#: file suffixes taken as DICOM without looking inside (from the format table)
DICOM_SUFFIXES: tuple[str, ...] = formats.image_suffixes("dicom")

_LAZY: dict[str, str] = {
    "KEPT_TAGS": "medseg.data.dicom.headers",
    "SliceHeader": "medseg.data.dicom.headers",
    "scan_file": "medseg.data.dicom.headers",
    "DicomReader": "medseg.data.dicom.reader",
    "DicomVolume": "medseg.data.dicom.reader",
}

__all__ = ["DICOM_SUFFIXES", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, eager=("DICOM_SUFFIXES",))
