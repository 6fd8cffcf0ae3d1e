"""Write segmentation masks back for viewers and PACS: NIfTI on the source grid, DICOM SEG.

Both writers first bring the mask back onto the **source grid** (the scan as it was read: shape
``spatial_shape`` and affine ``original_affine`` in MONAI's metadata). When the pipeline changed
the grid (``Spacingd``, ``Orientationd``, crops, ...), the mask's current ``affine`` differs from
``original_affine`` and the mask is resampled back with nearest neighbour by MONAI's own
:meth:`monai.data.ImageWriter.resample_if_needed` (``SpatialResample``), the step that
``SaveImage(resample=True)`` performs; labels are never interpolated. Voxels outside the
pipeline's field of view come back as 0.

Files are written atomically: to a temporary name in the target folder, then ``os.replace``, so a
failure never leaves a half-written mask behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import ImageWriter, MetaTensor
from monai.data.utils import to_affine_nd
from monai.utils import MetaKeys

from medseg._version import __version__
from medseg.data.errors import ReadError
from medseg.data.gzip_codec import GzipMemberWriter, gzip_compress
from medseg.data.transpose import transposed_copy
from medseg.io import atomic_target

__all__ = [
    "DICOM_SERIES_UID_KEY",
    "DICOM_SOURCE_FILES_KEY",
    "DICOM_SOURCE_FRAMES_KEY",
    "mask_to_source_grid",
    "write_dicom_seg",
    "write_nifti_mask",
]

#: metadata keys the DICOM reader fills: source files in the order of the array's last spatial axis
DICOM_SOURCE_FILES_KEY = "dicom_source_files"
DICOM_SERIES_UID_KEY = "dicom_series_uid"
#: for a multi-frame source: the 1-based frame number of each slice of the last spatial axis
DICOM_SOURCE_FRAMES_KEY = "dicom_source_frames"

Reference = MetaTensor | Mapping[str, Any] | str | os.PathLike[str] | None


# --------------------------------------------------------------------------------------------------
# source grid
# --------------------------------------------------------------------------------------------------
_STREAM_BYTES = 1 << 24  # masks of this size or more are written streamed, in gzip members this large


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _reference_grid(reference: Reference) -> tuple[dict[str, Any], np.ndarray, tuple[int, ...]]:
    """(metadata, source affine, source spatial shape) of a reference image, meta dict or NIfTI path."""
    if isinstance(reference, (str, os.PathLike)):
        try:
            img = nib.load(os.fspath(reference))
        except Exception as e:
            raise ReadError(reference, f"cannot read the reference image: {type(e).__name__}: {e}") from None
        shape = tuple(int(s) for s in img.shape[:3])
        affine = np.asarray(img.affine, dtype=np.float64)
        return {MetaKeys.AFFINE: affine}, affine, shape
    meta = dict(reference.meta) if isinstance(reference, MetaTensor) else dict(reference or {})
    if MetaKeys.SPATIAL_SHAPE not in meta:
        raise ValueError(
            "the reference has no 'spatial_shape' in its metadata: pass the loaded source image "
            "(MetaTensor), its meta dict, or the source NIfTI path"
        )
    shape = tuple(int(s) for s in _as_numpy(meta[MetaKeys.SPATIAL_SHAPE]).ravel())
    affine = meta.get(MetaKeys.ORIGINAL_AFFINE, meta.get(MetaKeys.AFFINE))
    affine = np.eye(4) if affine is None else _as_numpy(affine).astype(np.float64)
    if affine.ndim == 3:  # a collated batch of one
        affine = affine[0]
    return meta, affine, shape


def _meta_of(reference: Reference) -> Mapping[str, Any] | None:
    if isinstance(reference, MetaTensor):
        return reference.meta
    return reference if isinstance(reference, Mapping) else None


def _integer_labels(arr: np.ndarray, what: str = "mask") -> np.ndarray:
    """Cast a label map to uint8 (labels <= 255) or uint16, refusing non-integer or negative values."""
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype == np.uint8:  # already what is written: no pass over the volume
        return arr
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{what} has unsupported dtype {arr.dtype}")
    lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)  # NaN propagates into both
    if arr.dtype.kind == "f" and (
        not (np.isfinite(lo) and np.isfinite(hi)) or not np.array_equal(arr, np.rint(arr))
    ):
        raise ValueError(
            f"{what} must hold integer labels (threshold probabilities or AsDiscrete(argmax=True) first)"
        )
    if lo < 0:
        raise ValueError(f"{what} has negative labels (min {lo})")
    top = int(hi)
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"{what} has labels above 65535 (max {top})")
    return arr.astype(np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16, copy=False)


def mask_to_source_grid(mask: Any, reference: Reference = None) -> tuple[np.ndarray, np.ndarray]:
    """Label map on the source grid: ``(array without channel axis, source affine)``.

    Args:
        mask: label map, channel-first ``(1, *spatial)`` or ``(*spatial)``; a ``MetaTensor`` carries
            its current grid in ``mask.affine``. A plain array/tensor is taken to lie on the grid of
            ``reference``'s current ``affine`` (i.e. the grid the pipeline produced).
        reference: the source image as loaded (MetaTensor), its metadata dict (``original_affine``,
            ``spatial_shape``, ``affine``), or the path of the source NIfTI; ``None`` uses
            ``mask.meta``.

    The resampling is nearest neighbour (MONAI ``SpatialResample`` through
    ``ImageWriter.resample_if_needed``), zeros outside; nothing is resampled when the grids agree.
    """
    if reference is None:
        if not isinstance(mask, MetaTensor):
            raise ValueError(
                "a plain array mask needs a reference (source image, its meta dict or NIfTI path)"
            )
        reference = mask
    meta, target_affine, target_shape = _reference_grid(reference)
    nd = len(target_shape)
    if isinstance(mask, MetaTensor):
        current_affine = _as_numpy(mask.affine).astype(np.float64)
        if current_affine.ndim == 3:
            current_affine = current_affine[0]
    else:
        current = meta.get(MetaKeys.AFFINE)
        current_affine = target_affine if current is None else _as_numpy(current).astype(np.float64)
    data = _as_numpy(mask.as_tensor() if isinstance(mask, MetaTensor) else mask)
    if data.ndim == nd + 1:
        if data.shape[0] != 1:
            raise ValueError(
                f"mask has {data.shape[0]} channels; write a label map with one channel "
                "(AsDiscrete(argmax=True))"
            )
        data = data[0]
    elif data.ndim != nd:
        raise ValueError(f"mask shape {data.shape} does not fit a {nd}-D source of shape {target_shape}")
    data = _integer_labels(data)
    # compare homogeneous matrices of the spatial rank; MONAI keeps 4x4 even for 2-D images
    same = np.allclose(to_affine_nd(nd, current_affine), to_affine_nd(nd, target_affine), atol=1e-4)
    if same and tuple(data.shape) == target_shape:
        return data, target_affine
    out, _ = ImageWriter.resample_if_needed(
        data_array=data.astype(np.float32),
        affine=to_affine_nd(nd, current_affine),
        target_affine=to_affine_nd(nd, target_affine),
        output_spatial_shape=target_shape,
        mode="nearest",
        padding_mode="zeros",
    )
    out = np.rint(_as_numpy(out)).astype(data.dtype)
    return out, target_affine


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------
def write_nifti_mask(
    mask: Any,
    reference: Reference,
    path: str | os.PathLike[str],
    dtype: np.dtype | type | None = None,
) -> str:
    """Write ``mask`` as NIfTI on the source grid (shape and affine of the source scan).

    Args:
        mask: label map (see :func:`mask_to_source_grid`).
        reference: the source image as loaded, its meta dict, or the source NIfTI path; ``None`` when
            ``mask`` is a MetaTensor that carries the source metadata itself.
        path: output ``.nii`` or ``.nii.gz`` file (written atomically).
        dtype: integer output dtype; default uint8, or uint16 for labels above 255.

    Returns:
        ``path`` as a string.
    """
    path = os.fspath(path)
    lower = path.lower()
    suffix = ".nii.gz" if lower.endswith(".nii.gz") else ".nii" if lower.endswith(".nii") else None
    if suffix is None:
        raise ValueError(f"{path}: a NIfTI mask path must end with .nii or .nii.gz")
    data, affine = mask_to_source_grid(mask, reference)
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt.kind not in "iu" or (data.size and int(data.max()) > np.iinfo(dt).max):
            raise ValueError(f"{path}: dtype {dt} cannot hold the labels (max {int(data.max())})")
        data = data.astype(dt)
    # NIfTI stores x fastest: hand nibabel a Fortran-ordered array (one tiled transposing copy) so that
    # it writes contiguous slabs; MONAI's NibabelWriter.create_backend_obj would make it C-ordered again
    if data.flags.f_contiguous:
        fortran = data
    else:
        fortran = transposed_copy(data).T if data.ndim >= 3 else np.asfortranarray(data)
    img = nib.Nifti1Image(fortran, to_affine_nd(3, np.asarray(affine, dtype=np.float64)))
    img.set_sform(img.affine, code=1)  # as MONAI's NibabelWriter: scanner-based sform and qform
    img.set_qform(img.affine, code=1)
    with atomic_target(path, suffix) as tmp:
        if suffix == ".nii.gz" and fortran.nbytes < _STREAM_BYTES:  # one-call deflate (ISA-L when installed)
            with open(tmp, "wb") as fh:
                fh.write(gzip_compress(img.to_bytes(), level=1))
        elif suffix == ".nii.gz":  # large: streamed, deflated in members on threads, no serialised copy
            with open(tmp, "wb") as fh, GzipMemberWriter(fh, level=1, chunk=_STREAM_BYTES) as gz:
                img.to_stream(gz)
        else:
            nib.save(img, tmp)
    return path


# --------------------------------------------------------------------------------------------------
# DICOM SEG
# --------------------------------------------------------------------------------------------------
def _label_table(labels: Mapping[int, str] | Sequence[str] | None, present: np.ndarray) -> dict[int, str]:
    if labels is None:
        return {int(v): f"Segment {int(v)}" for v in present if v != 0}
    if isinstance(labels, Mapping):
        table = {int(k): str(v) for k, v in labels.items()}
    elif isinstance(labels, str):
        table = {1: labels}
    else:
        table = {i + 1: str(name) for i, name in enumerate(labels)}
    if 0 in table:
        raise ValueError("label 0 is the background and cannot be a segment")
    missing = sorted(int(v) for v in present if v != 0 and int(v) not in table)
    if missing:
        raise ValueError(f"mask holds labels {missing} that have no name in labels={dict(table)}")
    return dict(sorted(table.items()))


def write_dicom_seg(
    mask: Any,
    source_files: Sequence[str | os.PathLike[str]] | None,
    path: str | os.PathLike[str],
    labels: Mapping[int, str] | Sequence[str] | None = None,
    *,
    reference: Reference = None,
    source_frames: Sequence[int] | None = None,
    segmented_property_category: Any = None,
    segmented_property_type: Any = None,
    algorithm_name: str = "medseg",
    algorithm_version: str = __version__,
    manufacturer: str = "medseg",
    manufacturer_model_name: str = "medseg U-Net",
    series_description: str = "Segmentation (medseg)",
    series_number: int = 300,
    omit_empty_frames: bool = True,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> str:
    """Write ``mask`` as a binary DICOM SEG (highdicom) referencing the source series.

    Args:
        mask: label map in MONAI's array convention ``(x, y, z)`` (optionally channel-first), as the
            DICOM reader returns it: array index ``[i, j, k]`` is column ``i``, row ``j`` of source
            file ``k``. A MetaTensor that was resampled by the pipeline is brought back to the source
            grid first (:func:`mask_to_source_grid`).
        source_files: source DICOM files in the order of the mask's last spatial axis (slice ``k``
            from file ``k``), or one multi-frame file; ``None`` takes ``meta["dicom_source_files"]``
            from ``mask`` (MetaTensor) or ``reference``.
        path: output file (written atomically).
        labels: segment names: ``{label value: name}`` or a sequence naming labels 1, 2, ...;
            ``None`` names each label found. Segment numbers are 1..N in increasing label order
            (DICOM binary SEG needs consecutive numbers), so ``{1: "liver", 3: "tumour"}`` gives
            segment 1 = liver and segment 2 = tumour.
        reference: source image / metadata for resampling when ``mask`` is a plain array not on the
            source grid (and a second place to look for ``dicom_source_files``).
        source_frames: for one multi-frame source file, the 1-based frame of each mask slice
            (default ``meta["dicom_source_frames"]``, else frames 1..N in order).
        segmented_property_category / segmented_property_type: a ``pydicom.sr.coding.Code`` for all
            segments or ``{label: Code}``; default SNOMED CT "Tissue".
        algorithm_name, algorithm_version: the AI algorithm identification of every segment.
        omit_empty_frames: leave out frames that hold no pixel of their segment (highdicom default).
        series_instance_uid, sop_instance_uid: the SEG's UIDs (default: new ones). Fixed UIDs make a
            repeated store of the same result the same SOP Instance for the receiving PACS (PS3.4 B.4.1).

    Returns:
        ``path`` as a string.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    path = os.fspath(path)
    metas = [m for m in (mask.meta if isinstance(mask, MetaTensor) else None, _meta_of(reference)) if m]
    if source_files is None:
        source_files = next(
            (list(m[DICOM_SOURCE_FILES_KEY]) for m in metas if m.get(DICOM_SOURCE_FILES_KEY)), None
        )
        if source_files is None:
            raise ValueError(
                f"no source_files given and no '{DICOM_SOURCE_FILES_KEY}' in the mask's metadata"
            )
        if source_frames is None:
            source_frames = next(
                (list(m[DICOM_SOURCE_FRAMES_KEY]) for m in metas if m.get(DICOM_SOURCE_FRAMES_KEY)), None
            )
    files = [os.fspath(f) for f in source_files]
    if not files:
        raise ValueError("source_files is empty")

    # the mask on the source grid, as (x, y, z) voxels
    grid: Reference = reference
    if grid is None and isinstance(mask, MetaTensor) and MetaKeys.SPATIAL_SHAPE in mask.meta:
        grid = mask
    if grid is not None:
        vol, _ = mask_to_source_grid(mask, grid)
    else:
        vol = _as_numpy(mask)
        if vol.ndim == 4 and vol.shape[0] == 1:
            vol = vol[0]
        vol = _integer_labels(vol)
    if vol.ndim == 2:
        vol = vol[..., None]
    if vol.ndim != 3:
        raise ValueError(f"mask must be a 2-D or 3-D label map, got shape {vol.shape}")

    unique_files = list(dict.fromkeys(files))
    multi_frame = len(unique_files) == 1 and (len(files) > 1 or source_frames is not None)
    if not multi_frame and len(unique_files) != len(files):
        raise ValueError(
            "source_files lists a file more than once (a resampled series?); a SEG needs one mask slice per "
            "source slice"
        )
    sources = []
    for f in unique_files:
        try:
            sources.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception as e:
            raise ReadError(f, f"cannot read source DICOM: {type(e).__name__}: {e}") from None
    first = sources[0]
    n_file_frames = int(first.get("NumberOfFrames", 1) or 1)
    rows, cols = int(first.Rows), int(first.Columns)
    if len(sources) == 1 and n_file_frames > 1:
        # one multi-frame file: mask slice k is frame source_frames[k] (1-based); SEG frames follow the file
        order = (
            list(range(1, n_file_frames + 1)) if source_frames is None else [int(f) for f in source_frames]
        )
        if sorted(order) != list(range(1, n_file_frames + 1)) or vol.shape[2] != n_file_frames:
            raise ValueError(
                f"{unique_files[0]}: {n_file_frames} frames, but the mask has {vol.shape[2]} slices "
                f"(frames {order[:8]}...)"
            )
        vol = vol[:, :, np.argsort(order)]
    n_frames = n_file_frames if len(sources) == 1 else len(sources)
    if vol.shape != (cols, rows, n_frames):
        raise ValueError(
            f"mask (x, y, z) = {vol.shape} does not match the source series: {cols} columns x {rows} rows x "
            f"{n_frames} {'frames' if len(sources) == 1 else 'files'} (resample to the source grid first)"
        )
    series = {ds.SeriesInstanceUID for ds in sources}
    if len(series) != 1:
        raise ValueError(f"source_files span {len(series)} series; a SEG references one series")
    for f, ds in zip(unique_files, sources, strict=True):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError(f"{f}: {ds.Rows}x{ds.Columns} pixels, unlike the first file's {rows}x{cols}")

    present = np.unique(vol)
    table = _label_table(labels, present)
    if not table:
        raise ValueError("no labels to write: the mask is empty and labels=None")
    seg_number = {label: i + 1 for i, label in enumerate(table)}
    lut = np.zeros(int(max(int(present.max()), max(table))) + 1, dtype=np.uint16)
    for label, number in seg_number.items():
        lut[label] = number
    # (x, y, z) -> frames (z, rows = y, columns = x), segment numbers as values
    frames = np.ascontiguousarray(np.transpose(lut[vol], (2, 1, 0)))
    frames = frames.astype(np.uint8 if len(table) < 256 else np.uint16)

    def code_for(arg: Any, label: int) -> Any:
        if arg is None:
            return codes.SCT.Tissue
        return arg[label] if isinstance(arg, Mapping) else arg

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=str(algorithm_version)
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=seg_number[label],
            segment_label=name,
            segmented_property_category=code_for(segmented_property_category, label),
            segmented_property_type=code_for(segmented_property_type, label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for label, name in table.items()
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(series_instance_uid) if series_instance_uid else hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(sop_instance_uid) if sop_instance_uid else hd.UID(),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=str(algorithm_version),
            device_serial_number="0",
            series_description=series_description,
            omit_empty_frames=omit_empty_frames and bool(frames.any()),
        )
    except (ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"{path}: highdicom cannot build the SEG from these sources: {e}") from e
    with atomic_target(path, ".dcm") as tmp:
        seg.save_as(tmp)
    return path
