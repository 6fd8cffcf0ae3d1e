"""The source side of batch prediction: cases (from :mod:`~medseg.predict.discovery`) loaded strictly.

:class:`CaseLoader` turns a case into the network's input with the bundle's own preprocessing, with
one rule: the reader that reads a case is the one meant for it, and its failure is the case's failure.
The bundle's ``LoadImaged`` is split off the preprocessing and applied through a
:class:`~medseg.data.StrictLoadImage` with the same settings:

* a DICOM case is read by :class:`~medseg.data.DicomReader` for exactly the discovered series (its
  files, and the headers discovery already scanned: no header is read twice);
* a ``.nii.gz`` file is read by medseg's faster :class:`~medseg.data.NiftiReader` with the settings of
  the bundle's NIfTI reader, unless the bundle designates its own reader;
* anything else by the bundle's designated reader, or the one reader the format table picks.

The image is then checked before it costs inference time: finite values, the dimensionality and
channel count the network takes, a size of at least a fraction of the inference tile.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medseg.predict.discovery import Case
from medseg.predict.errors import CaseError

__all__ = ["CaseLoader", "Loaded", "check_finite"]


@dataclass
class Loaded:
    """A case ready for inference."""

    case: Case
    fingerprint: str
    source_meta: dict[str, Any]  # metadata of the image as read (the source grid)
    source: Any  # the image as read (kept for overlays only)
    data: dict[str, Any]  # after preprocessing
    batch: torch.Tensor  # (1, C, *spatial), pinned when CUDA
    load_s: float


class CaseLoader:
    """Load + preprocess one case (see the module docstring).

    Args:
        preprocessing: the bundle's dictionary transform producing ``image_key`` from a path.
        image_key: the input key.
        spatial_dims, in_channels: what the network takes (``None``: not checked).
        roi_size: the inferer's tile; images smaller than ``min_tile_fraction`` of it in an axis fail.
        pin_memory: pin the batch (CUDA inference).
        keep_source: keep the image as read (for overlays).
    """

    def __init__(
        self,
        preprocessing: Callable,
        image_key: str = "image",
        *,
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        roi_size: Sequence[int] | int | None = None,
        min_tile_fraction: float = 0.25,
        pin_memory: bool = False,
        keep_source: bool = False,
    ) -> None:
        from monai.transforms import Compose, LoadImaged

        from medseg.data.loading import StrictLoadImage

        self.preprocessing = preprocessing
        self.image_key = image_key
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.roi_size = roi_size
        self.min_tile_fraction = float(min_tile_fraction)
        self.pin_memory, self.keep_source = pin_memory, keep_source
        # split "LoadImaged + rest": the loader is applied strictly, with a reader chosen per case
        self._loader: Any = None
        self._rest: Callable = preprocessing
        if isinstance(preprocessing, Compose) and preprocessing.transforms:
            first = preprocessing.transforms[0]
            if isinstance(first, LoadImaged) and image_key in first.keys:
                bundle_loader = first._loader
                self._loader = StrictLoadImage.from_loader(bundle_loader, _designated_of(bundle_loader))
                self._rest = Compose(
                    list(preprocessing.transforms[1:]),
                    map_items=getattr(preprocessing, "map_items", True),
                    unpack_items=getattr(preprocessing, "unpack_items", False),
                    lazy=getattr(preprocessing, "lazy", False),
                    overrides=getattr(preprocessing, "overrides", None),
                )
        self._nifti_reader = _fast_nifti_reader(self._loader) if self._loader is not None else None
        # when the first step that reads values is a resampling to float (after channel/orientation steps,
        # which only move voxels), NIfTI and DICOM volumes are loaded in their own dtype (int16 CT: half of
        # float32) and converted slab by slab by the resampler: no whole-volume float32 copy
        self._volume_loader: Any = self._loader  # NIfTI and DICOM volumes
        if self._loader is not None and _resamples_to_float_first(self._rest, image_key):
            self._volume_loader = copy.copy(self._loader)
            self._volume_loader.dtype = None

    # ------------------------------------------------------------------------------------ loading
    def read(self, case: Case) -> Any:
        """The image of ``case`` as read (before the rest of the preprocessing)."""
        if case.error:
            raise CaseError(case.error)
        if case.is_dicom:
            from medseg.data.dicom_reader import DicomReader

            # a discovered series: exactly its files, with the headers discovery scanned
            if case.headers:
                scanned: dict[str, Any] = {"headers": list(case.headers)}
            else:
                scanned = {"files": case.files if case.series_uid else None}
            reader = DicomReader(series_uid=case.series_uid, recursive=False, **scanned)
            return self._volume_loader(case.path, reader=reader)  # StrictLoadImage: preflight included
        if self._nifti_reader is not None and case.path.lower().endswith(".nii.gz"):
            if not any(r.verify_suffix(case.path) for r in self._loader.designated):
                return self._volume_loader(case.path, reader=self._nifti_reader)
        return self._loader(case.path)

    def load(self, case: Case, fingerprint: str) -> Loaded:
        t0 = time.perf_counter()
        key = self.image_key
        if case.error:
            raise CaseError(case.error)
        if self._loader is not None:
            source = self.read(case)
            check_finite(source, case, "the image")
            source_meta = dict(getattr(source, "meta", {}))
            data = dict(self._rest({key: source}))
        else:  # preprocessing without a leading LoadImaged: it loads the path itself
            from medseg.data.loading import preflight

            preflight(case.path)
            data = dict(self.preprocessing({key: case.path}))
            source = None
            source_meta = dict(getattr(data[key], "meta", {}))
        image = data[key]
        if not isinstance(image, torch.Tensor):
            raise CaseError(f"{case.input}: preprocessing did not produce a tensor '{key}'")
        self.check_image(image, case)
        batch = image.as_tensor() if hasattr(image, "as_tensor") else image
        batch = batch.unsqueeze(0).float()
        if self.pin_memory:
            batch = batch.pin_memory()
        keep = source if self.keep_source else None
        return Loaded(case, fingerprint, source_meta, keep, data, batch, time.perf_counter() - t0)

    def check_image(self, image: torch.Tensor, case: Case) -> None:
        spatial = tuple(int(s) for s in image.shape[1:])
        if self.spatial_dims is not None and len(spatial) != self.spatial_dims:
            raise CaseError(
                f"{case.input}: wrong dimensionality: the model takes {self.spatial_dims}-D images, "
                f"this one is {len(spatial)}-D after preprocessing (shape {tuple(image.shape)})"
            )
        if self.in_channels is not None and image.shape[0] != self.in_channels:
            raise CaseError(
                f"{case.input}: wrong number of channels: the model takes {self.in_channels}, the image has "
                f"{image.shape[0]} after preprocessing (shape {tuple(image.shape)}; a 4-D/time series?)"
            )
        roi = self.roi_size
        if roi is not None and self.min_tile_fraction > 0:
            roi = [int(r) for r in (roi if isinstance(roi, Sequence) else [roi] * len(spatial))]
            for ax, (n, r) in enumerate(zip(spatial, roi, strict=False)):
                if r > 0 and n < self.min_tile_fraction * r:
                    raise CaseError(
                        f"{case.input}: image too small: {n} voxels along axis {ax} after preprocessing "
                        f"(size {spatial}) is less than {self.min_tile_fraction:g} of the inference tile "
                        f"{tuple(roi)}"
                    )
        check_finite(image, case, "the preprocessed image")


def _resamples_to_float_first(transform: Any, key: str) -> bool:
    """Whether ``transform`` (a ``Compose``) resamples ``key`` into a floating dtype (MONAI ``Spacingd``,
    medseg's ``SeparableSpacingd``) before anything else reads its values: only channel-first and
    orientation steps (which move voxels, whatever their dtype) may come first."""
    from monai.transforms import Compose, EnsureChannelFirstd, MapTransform, Orientationd, Spacingd
    from monai.utils.type_conversion import get_equivalent_dtype

    if not isinstance(transform, Compose) or getattr(transform, "lazy", False):
        return False
    for t in transform.transforms:
        if isinstance(t, MapTransform) and key not in t.keys:
            continue
        if isinstance(t, (EnsureChannelFirstd, Orientationd)) and not getattr(t, "lazy", False):
            continue
        if isinstance(t, Spacingd) and not t.lazy:
            dtype = t.dtype[list(t.keys).index(key)]
            return dtype is not None and get_equivalent_dtype(dtype, torch.Tensor).is_floating_point
        return False
    return False


def _designated_of(loader: Any) -> Any:
    """The readers a bundle's ``LoadImage`` was given explicitly (``None`` when it auto-selects)."""
    if getattr(loader, "auto_select", True):
        return None
    designated = getattr(loader, "designated", None)
    if designated is not None:  # already a StrictLoadImage
        return designated or None
    return loader.readers[-1:]  # MONAI registers the designated reader(s) last; the last is preferred


def _fast_nifti_reader(loader: Any) -> Any:
    """medseg's ``NiftiReader`` with the settings of the bundle's ``NibabelReader`` (``None`` without
    one); used for ``.nii.gz`` files that no designated reader of the bundle claims."""
    from monai.data import NibabelReader

    from medseg.data.nifti_reader import NiftiReader

    base = next((r for r in reversed(loader.readers) if type(r) is NibabelReader), None)
    if base is None:
        return None
    return NiftiReader(
        channel_dim=base.channel_dim,
        as_closest_canonical=base.as_closest_canonical,
        squeeze_non_spatial_dims=base.squeeze_non_spatial_dims,
        **base.kwargs,
    )


def check_finite(x: Any, case: Case, what: str) -> None:
    """Fail the case on NaN/inf voxels. A finite sum proves them all finite (one cheap reduction);
    only otherwise are they counted. MetaTensors are checked as plain tensors (no metadata copies)."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return
    raw = x.as_tensor() if hasattr(x, "as_tensor") else x
    if bool(torch.isfinite(raw.sum())):  # overflow to inf only sends it to the exact count below
        return
    n = int((~torch.isfinite(raw)).sum())
    if n:
        raise CaseError(f"{case.input}: {what} contains {n} NaN or infinite voxel value(s)")
