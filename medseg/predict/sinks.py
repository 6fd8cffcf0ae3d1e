"""The sink side of batch prediction: post-processing and the writers, chosen from one output table.

:class:`FileSink` applies the bundle's post-processing (``SaveImage(d)`` dropped: the sink writes its
own outputs, atomically, as MONAI Label does), brings the mask back to the **source grid** (``Invertd``
in the bundle's post-processing, else a nearest-neighbour resample by
:func:`medseg.data.writers.mask_to_source_grid`) and writes the case's outputs (named by
:data:`medseg.predict.state.OUTPUT_SUFFIXES`). A failure removes what the case had written so far: no
partial output survives.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medseg.predict.report import label_stats
from medseg.predict.sources import Loaded
from medseg.predict.state import output_paths, unmark

__all__ = ["FORMATS", "FileSink", "channel_argmax", "prepare_postprocessing"]

#: ``--formats`` choices: the mask as NIfTI, and as DICOM SEG (DICOM cases only)
FORMATS = ("nifti", "dicom-seg")


def channel_argmax(
    t: torch.Tensor, dim: int = 0, keepdim: bool = True, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """``torch.argmax(t, dim)`` (first maximal index) for finite ``t``, fast on CPU.

    ``torch.argmax`` over the leading channel axis of a ``(C, *spatial)`` tensor reduces across
    whole-volume strides; ``max(dim).indices`` is several times faster, and for two channels (binary
    segmentation) one contiguous comparison ``t[1] > t[0]`` is (strict ``>`` keeps the first maximum on
    ties, as ``torch.argmax``). ``dtype``: of the result (no int64 copy on the way).
    """
    if t.shape[dim] == 2:
        lo, hi = t.unbind(dim)
        idx = torch.gt(hi, lo).to(dtype)
        return idx.unsqueeze(dim) if keepdim else idx
    return t.max(dim=dim, keepdim=keepdim).indices.to(dtype)


@functools.cache
def _fast_as_discrete() -> type:
    """A MONAI ``AsDiscrete`` whose argmax is :func:`channel_argmax` (same result for finite values:
    the first maximal index, as ``torch.argmax``; the runner rejects non-finite network outputs)."""
    from monai.data import MetaTensor
    from monai.data.meta_obj import get_track_meta
    from monai.transforms import AsDiscrete
    from monai.utils.type_conversion import convert_to_dst_type, convert_to_tensor

    class _FastArgmaxAsDiscrete(AsDiscrete):
        def __call__(self, img: Any, argmax: bool | None = None, *args: Any, **kwargs: Any) -> Any:
            if self.argmax if argmax is None else argmax:
                t = convert_to_tensor(img, track_meta=get_track_meta())
                raw = t.as_tensor() if isinstance(t, MetaTensor) else t
                dim, keep = self.kwargs.get("dim", 0), self.kwargs.get("keepdim", True)
                dtype = self.kwargs.get("dtype", torch.float)  # AsDiscrete's output dtype
                labels = channel_argmax(raw, dim=dim, keepdim=keep, dtype=dtype)
                img, *_ = convert_to_dst_type(labels, t, dtype=dtype)
            return super().__call__(img, False, *args, **kwargs)

    return _FastArgmaxAsDiscrete


def prepare_postprocessing(transform: Any) -> Any:
    """Drop ``SaveImage`` / ``SaveImaged`` from a (possibly nested) ``Compose``; give ``AsDiscrete(d)``
    the fast argmax of :func:`channel_argmax`; run ``Invertd`` + ``AsDiscreted`` on one key as one
    :class:`medseg.transforms.InvertToLabelsd` (same labels, no full-size score map on the source grid).
    Copies: the caller's transforms are left untouched."""
    from monai.transforms import AsDiscrete, AsDiscreted, Compose, SaveImage, SaveImaged

    from medseg.transforms import InvertToLabelsd

    if isinstance(transform, (SaveImage, SaveImaged)):
        return None
    if isinstance(transform, Compose):
        kept: list[Any] = []
        for t in (prepare_postprocessing(t) for t in transform.transforms):
            if t is None:
                continue
            if kept and InvertToLabelsd.fusable(kept[-1], t):
                kept[-1] = InvertToLabelsd(kept[-1], t)
            else:
                kept.append(t)
        out = copy.copy(transform)
        out.transforms = kept
        return out
    if type(transform) is AsDiscrete:
        out = copy.copy(transform)
        out.__class__ = _fast_as_discrete()
        return out
    if type(transform) is AsDiscreted and type(transform.converter) is AsDiscrete:
        out = copy.copy(transform)
        out.converter = prepare_postprocessing(transform.converter)
        return out
    return transform


def seg_uids(case: Any, seed: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of a case's DICOM SEG: ``2.25.`` + a name-based UUID (PS3.5
    B.2; RFC 4122 version 5) of ``seed``, the source SeriesInstanceUID and the names of the source files."""
    import uuid

    name = "\n".join([seed, case.series_uid or "", *sorted(os.path.basename(f) for f in case.files)])
    series, sop = (uuid.uuid5(uuid.NAMESPACE_OID, name + kind).int for kind in ("\nseries", "\nsop"))
    return f"2.25.{series}", f"2.25.{sop}"


@functools.cache
def segment_code(name: str) -> Any:
    """The SNOMED CT concept named like a segment label (``"liver"`` -> Liver, 10200004), from pydicom's
    code dictionary of the DICOM content mapping resource (PS3.16), or ``None``."""
    import re

    from pydicom.sr.codedict import codes

    key = "".join(w[:1].upper() + w[1:].lower() for w in re.split(r"[^A-Za-z0-9]+", name) if w)
    try:
        return getattr(codes.SCT, key) if key and key[0].isalpha() else None
    except AttributeError:
        return None


def segment_codes(labels: Mapping[int, str] | None) -> tuple[Any, Any]:
    """(category, type) code maps for :func:`medseg.data.writers.write_dicom_seg`: a label whose name is a
    SNOMED CT concept gets it as its Segmented Property Type, in the category Anatomical Structure (PS3.3
    C.8.20.2; CID 7150 / 7151); the others keep the writer's default, Tissue."""
    from pydicom.sr.codedict import codes

    found = {k: c for k, n in (labels or {}).items() if (c := segment_code(n)) is not None}
    if not found:
        return None, None
    types = {k: found.get(k, codes.SCT.Tissue) for k in labels or {}}
    cats = {k: codes.SCT.AnatomicalStructure if k in found else codes.SCT.Tissue for k in labels or {}}
    return cats, types


class FileSink:
    """Post-process a prediction and write the case's outputs (see the module docstring).

    Args:
        output_dir: where the outputs go (``<id><suffix>``, :data:`medseg.predict.state.OUTPUT_SUFFIXES`).
        postprocessing: the bundle's dictionary post-processing (``None``: the prediction is the mask).
        formats: any of :data:`FORMATS`.
        overlays: also write a QC overlay PNG.
        labels: label value -> name (the bundle's ``channel_def``; DICOM SEG segments, report columns).
        uid_seed: text (the model key) from which, with the source series and its files, the DICOM SEG's
            UIDs are derived: the same result of the same series gets the same SOPInstanceUID.
    """

    def __init__(
        self,
        output_dir: str,
        postprocessing: Callable | None,
        formats: Sequence[str] = ("nifti",),
        overlays: bool = False,
        labels: Mapping[int, str] | None = None,
        image_key: str = "image",
        pred_key: str = "pred",
        instance_key: str = "instances",
        uid_seed: str = "",
    ) -> None:
        self.output_dir = output_dir
        self.uid_seed = uid_seed
        self.postprocessing = prepare_postprocessing(postprocessing) if postprocessing is not None else None
        self.formats = tuple(formats)
        self.overlays = overlays
        self.labels = dict(labels or {})
        self.image_key, self.pred_key, self.instance_key = image_key, pred_key, instance_key

    def write(self, loaded: Loaded, pred: Any) -> tuple[dict[str, Any], float]:
        """Post-process and write; returns the row's output fields and the seconds it took."""
        from medseg.data.writers import mask_to_source_grid, write_dicom_seg, write_nifti_mask

        t0 = time.perf_counter()
        case = loaded.case
        d = {**loaded.data, self.pred_key: pred}
        if self.postprocessing is not None:
            d = dict(self.postprocessing(d))
        mask, affine = mask_to_source_grid(d[self.pred_key], loaded.source_meta)
        ref = {**loaded.source_meta, "affine": affine, "original_affine": affine,
               "spatial_shape": np.asarray(mask.shape)}  # fmt: skip
        paths = output_paths(self.output_dir, case.id)
        written: list[str] = []
        objects: int | None = None
        try:
            if "nifti" in self.formats:
                written.append(write_nifti_mask(mask, ref, paths["nifti"]))
            instances = d.get(self.instance_key)
            if instances is not None:  # instance labels from the bundle's post-processing
                inst, _ = mask_to_source_grid(instances, loaded.source_meta)
                objects = int(inst.max()) if inst.size else 0
                dtype = np.uint16 if objects < 65536 else np.uint32
                written.append(write_nifti_mask(inst, ref, paths["instances"], dtype=dtype))
            if "dicom-seg" in self.formats and case.is_dicom:
                labels = self.labels or None
                present = set(np.flatnonzero(np.bincount(mask.ravel())).tolist()) - {0}  # mask: uint8/16
                if labels is not None and not present <= set(labels):
                    labels = None
                series_uid, sop_uid = seg_uids(case, self.uid_seed)
                category, prop = segment_codes(labels)
                written.append(
                    write_dicom_seg(
                        mask,
                        None,
                        paths["dicom-seg"],
                        labels,
                        reference=ref,
                        segmented_property_category=category,
                        segmented_property_type=prop,
                        series_instance_uid=series_uid,
                        sop_instance_uid=sop_uid,
                    )
                )
            if self.overlays:
                from medseg.overlays import save_overlay_png

                src = loaded.source if loaded.source is not None else loaded.data[self.image_key]
                written.append(save_overlay_png(src, mask, paths["overlay"]))
            voxels, volume = label_stats(mask, affine, self.labels)
        except BaseException:
            unmark(self.output_dir, case.id, written)
            raise
        row = {
            "outputs": [os.path.relpath(p, self.output_dir) for p in written],
            "voxels": voxels,
            "volume_ml": volume,
            "objects": objects,
        }
        return row, time.perf_counter() - t0
