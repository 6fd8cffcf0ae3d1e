"""The DICOM reader's former single module, kept so that existing imports keep working.

The reader lives in the package :mod:`medseg.data.dicom` (header scan, series choice, geometry, pixel
decoding, the MONAI ``ImageReader``); this module re-exports its public names.
"""

from __future__ import annotations

from medseg.data.dicom import DICOM_SUFFIXES
from medseg.data.dicom.headers import KEPT_TAGS
from medseg.data.dicom.reader import DicomReader, DicomVolume

__all__ = ["DICOM_SUFFIXES", "KEPT_TAGS", "DicomReader", "DicomVolume"]
