"""The batch-prediction engine: a MONAI bundle's inference pipeline over many cases, pipelined.

:class:`BatchPredictor` takes the four pieces every MONAI inference bundle defines (``network_def``,
``preprocessing``, ``inferer``, ``postprocessing``; the ids MONAI Label reads too) and runs them over
the cases of :func:`~medseg.predict.discovery.discover_cases`:

``load + preprocess`` (``workers`` threads, up to ``workers + 1`` cases ahead) -> ``inference`` (the
calling thread; model loaded once, on CUDA when present: pinned host memory, ``non_blocking`` copies;
in the chosen :mod:`medseg.precision`: bf16 autocast and channels-last layout on CPUs with native
bf16) -> ``postprocess + write`` (``writers`` threads; at most ``writers + 1`` cases queued so memory
stays bounded). Loading of the next cases and writing of finished ones therefore overlap with
inference, as nnU-Net's preprocessing / export processes do. Heavy work in all three
stages (file decoding, torch resampling, zlib) releases the GIL, so threads suffice and share the
transforms and the model without pickling.

Per case the mask is brought back to the **source grid** (shape and affine of the scan as read):
``Invertd`` in the bundle's postprocessing, else a nearest-neighbour resample by
:func:`medseg.data.writers.mask_to_source_grid`; it is written as NIfTI, as DICOM SEG (DICOM input) and
as a QC overlay PNG on request. ``SaveImage(d)`` in the bundle's postprocessing is dropped (the engine
writes its own outputs, atomically), as MONAI Label does.

Failure isolation: any error of a case (unreadable file, wrong dimensionality, too small, NaN voxels,
CUDA out of memory, ...) becomes a *failed* row with a one-line message; its partial outputs are
removed; the batch goes on. Finished cases carry a done marker (:mod:`medseg.predict.state`) keyed by
the input fingerprint and the model key (checkpoint sha256 + bundle config + output options), so a
killed run started again skips them and redoes the rest.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from medseg.data.errors import ReadError
from medseg.precision import Precision, resolve_precision
from medseg.predict.discovery import Case, discover_cases, fingerprint, select_shard, shard_from_env
from medseg.predict.report import CaseResult, exit_code, label_stats, write_report
from medseg.predict.state import clean_case, is_done, mark_done, output_paths, unmark

__all__ = ["BatchPredictor", "FORMATS", "SetupError", "load_checkpoint"]

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom-seg")


class SetupError(RuntimeError):
    """The run cannot start (bundle, checkpoint or arguments unusable): exit status 2."""


class CaseError(RuntimeError):
    """A case-level failure whose message is already complete."""


@dataclass
class _Prepared:
    case: Case
    fingerprint: str
    source_meta: dict[str, Any]
    source: Any  # the image as loaded (kept for overlays only)
    data: dict[str, Any]  # after preprocessing
    batch: torch.Tensor  # (1, C, *spatial), pinned when CUDA
    load_s: float


# ----------------------------------------------------------------------------------------- helpers
def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(network: torch.nn.Module, path: str | os.PathLike[str]) -> str:
    """Load a state dict (``torch.load(weights_only=True)``) into ``network``; returns the file's sha256.

    Accepts a bare state dict, ``{"model": sd}`` (MONAI ``CheckpointSaver`` / MONAI Label) or
    ``{"state_dict": sd}``, with or without a DDP ``module.`` prefix.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SetupError(f"{path}: checkpoint not found (train the bundle first, or pass --ckpt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SetupError(
            f"{path}: cannot load the checkpoint with weights_only=True: {type(e).__name__}: {e}"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "network"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise SetupError(f"{path}: expected a state dict, got {type(obj).__name__}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    try:
        network.load_state_dict(sd)
    except RuntimeError as e:
        raise SetupError(f"{path}: checkpoint does not fit network_def: {str(e).splitlines()[0]}") from None
    return _sha256_file(path)


def channel_argmax(
    t: torch.Tensor, dim: int = 0, keepdim: bool = True, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """``torch.argmax(t, dim)`` (first maximal index, int64) for finite ``t``, fast on CPU.

    ``torch.argmax`` over the leading channel axis of a ``(C, *spatial)`` tensor reduces across
    whole-volume strides: 0.3 s for 2x160x160x64 with torch 2.x, ``max(dim).indices`` 33 ms for
    2x192x192x80 on one core; for two channels (binary segmentation) one contiguous comparison
    ``t[1] > t[0]`` costs 6 ms (strict ``>`` keeps the first maximum on ties, as ``torch.argmax``).
    ``dtype``: of the result (the label map's, so that no int64 copy is made on the way).
    """
    if t.shape[dim] == 2:
        lo, hi = t.unbind(dim)
        idx = torch.gt(hi, lo).to(dtype)
        return idx.unsqueeze(dim) if keepdim else idx
    return t.max(dim=dim, keepdim=keepdim).indices.to(dtype)


@functools.cache
def _fast_as_discrete() -> type:
    """A MONAI ``AsDiscrete`` whose argmax is :func:`channel_argmax` (same result for finite values:
    the first maximal index, as ``torch.argmax``; the engine rejects non-finite network outputs)."""
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


def _prepare_postprocessing(transform: Any) -> Any:
    """Drop ``SaveImage`` / ``SaveImaged`` from a (possibly nested) ``Compose``; give ``AsDiscrete(d)``
    the fast argmax of :func:`_fast_as_discrete` (copies: the caller's transforms are left untouched)."""
    from monai.transforms import AsDiscrete, AsDiscreted, Compose, SaveImage, SaveImaged

    if isinstance(transform, (SaveImage, SaveImaged)):
        return None
    if isinstance(transform, Compose):
        kept = [t for t in (_prepare_postprocessing(t) for t in transform.transforms) if t is not None]
        out = copy.copy(transform)
        out.transforms = kept
        return out
    if type(transform) is AsDiscrete:
        out = copy.copy(transform)
        out.__class__ = _fast_as_discrete()
        return out
    if type(transform) is AsDiscreted and type(transform.converter) is AsDiscrete:
        out = copy.copy(transform)
        out.converter = _prepare_postprocessing(transform.converter)
        return out
    return transform


def _error_text(stage: str, case: Case, e: BaseException) -> str:
    if isinstance(e, (ReadError, CaseError)):
        msg = str(e)
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"{case.input}: {stage} failed: {type(e).__name__}: {first}"
    return msg[:1000]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local % torch.cuda.device_count()}")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"device {device} requested but CUDA is not available")
    return dev


# ------------------------------------------------------------------------------------------ engine
class BatchPredictor:
    """Run a bundle's inference pipeline over a batch of cases (see the module docstring).

    Args:
        network: the network (``network_def``), weights loaded from ``checkpoint`` when given.
        preprocessing: dictionary transform producing ``image`` from ``{"image": path}``; normally a
            ``Compose`` starting with ``LoadImaged`` (DICOM cases are then loaded with medseg's
            :class:`~medseg.data.DicomReader`, picking the case's series, and the rest applied).
        inferer: a MONAI ``Inferer`` (``SlidingWindowInferer``, ``OverlapTileInferer``, ...).
        postprocessing: dictionary transform on ``{"image", "pred"}`` (``Activationsd``, ``Invertd``,
            ``AsDiscreted``); savers are dropped. Must end with a one-channel label map. An instance
            label map it adds under ``instance_key`` (``medseg.transforms.LabelInstancesd``) is written
            as ``<id>_instances.nii.gz`` and counted in the report's ``objects``.
        output_dir: where masks, overlays, the report and the resume state go.
        checkpoint: ``model.pt`` (state dict), loaded with ``weights_only=True``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default CUDA (``LOCAL_RANK``) when available.
        formats: any of ``"nifti"``, ``"dicom-seg"`` (the latter for DICOM cases only).
        overlays: also write ``<id>_overlay.png`` QC images.
        workers: loader threads (0: everything in the calling thread, one case after the other).
        writers: postprocess/write threads (1 keeps ``Invertd`` calls serial).
        shard: ``(i, n)``: process every n-th case from i; default ``(RANK, WORLD_SIZE)`` under torchrun.
        labels: label value -> name (the bundle's ``channel_def``); names the report's columns and the
            DICOM SEG segments.
        spatial_dims, in_channels: what the network takes; images of another dimensionality or
            channel count fail with a clear message instead of a convolution error.
        min_tile_fraction: images whose preprocessed size is below this fraction of the inferer's
            ``roi_size`` in some axis fail as "too small" (0 disables the check).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` (:mod:`medseg.precision`), resolved for
            ``device``; the inferer's forward passes run in it, post-processing in fp32.
        config_digest: text folded into the model key (the bundle config), so a changed pipeline redoes
            finished cases.
        progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        preprocessing: Callable,
        inferer: Callable,
        postprocessing: Callable | None,
        output_dir: str | os.PathLike[str],
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        formats: Sequence[str] = ("nifti",),
        overlays: bool = False,
        workers: int = 2,
        writers: int = 1,
        shard: tuple[int, int] | None = None,
        labels: Mapping[int | str, str] | None = None,
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        min_tile_fraction: float = 0.25,
        precision: str | Precision = "auto",
        config_digest: str = "",
        progress: bool = True,
        image_key: str = "image",
        pred_key: str = "pred",
        instance_key: str = "instances",
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        from monai.transforms import Compose, LoadImaged

        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise SetupError(f"unknown output format(s) {bad}; choose from {list(FORMATS)}")
        if workers < 0 or writers < 1:
            raise SetupError("workers must be >= 0 and writers >= 1")
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.device = _resolve_device(device)
        self.network = network.to(self.device).eval()
        ckpt_hash = load_checkpoint(self.network, checkpoint) if checkpoint is not None else "untrained"
        self.checkpoint_sha256 = ckpt_hash
        try:
            self.precision = resolve_precision(precision, self.device)
        except ValueError as e:
            raise SetupError(str(e)) from None
        self.precision.prepare(self.network)
        self.preprocessing = preprocessing
        self.inferer = inferer
        self._inferer = _with_precision(inferer, self.precision)
        self.postprocessing = _prepare_postprocessing(postprocessing) if postprocessing is not None else None
        self.formats = tuple(dict.fromkeys(formats))
        self.overlays = overlays
        self.workers, self.writers = int(workers), int(writers)
        self.shard = shard
        self.labels = {int(k): str(v) for k, v in (labels or {}).items() if int(k) != 0}
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.min_tile_fraction = float(min_tile_fraction)
        self.progress = progress
        self.image_key, self.pred_key, self.instance_key = image_key, pred_key, instance_key
        self.summary = dict(summary or {})
        self.model_key = hashlib.sha256(
            json.dumps([ckpt_hash, config_digest, self.formats, overlays, self.precision.name]).encode()
        ).hexdigest()
        # split "LoadImaged + rest" so that DICOM cases can be loaded with a series-specific reader
        self._load: Any = None
        self._rest: Callable = preprocessing
        if isinstance(preprocessing, Compose) and preprocessing.transforms:
            first = preprocessing.transforms[0]
            if isinstance(first, LoadImaged) and image_key in first.keys:
                self._load = first
                self._rest = Compose(
                    list(preprocessing.transforms[1:]),
                    map_items=getattr(preprocessing, "map_items", True),
                    unpack_items=getattr(preprocessing, "unpack_items", False),
                    lazy=getattr(preprocessing, "lazy", False),
                    overrides=getattr(preprocessing, "overrides", None),
                )
        self._nifti_loader = _fast_nifti_loader(self._load._loader) if self._load is not None else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.rows: list[CaseResult] = []
        self.exit_code: int | None = None

    # ------------------------------------------------------------------ construction from a bundle
    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | os.PathLike[str],
        output_dir: str | os.PathLike[str],
        *,
        config_file: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> BatchPredictor:
        """Build from a MONAI bundle folder through ``ConfigParser`` (ids ``network_def``,
        ``preprocessing``, ``inferer``, ``postprocessing``; ``configs/metadata.json`` for labels)."""
        from monai.bundle import ConfigParser

        bundle_dir = os.path.abspath(os.fspath(bundle_dir))
        files = config_file or os.path.join(bundle_dir, "configs", "inference.json")
        files = [os.fspath(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
        for f in files:
            if not os.path.isfile(f):
                raise SetupError(f"{f}: bundle config not found")
        parser = ConfigParser()
        try:
            parser.read_config(files)
        except Exception as e:
            raise SetupError(f"{files}: cannot read the bundle config: {type(e).__name__}: {e}") from None
        missing = [k for k in ("network_def", "preprocessing", "inferer") if k not in parser]
        if missing:
            raise SetupError(f"{files[0]}: the bundle config lacks the id(s) {missing}")
        parser["bundle_root"] = bundle_dir
        parser["output_dir"] = os.fspath(output_dir)
        dev = _resolve_device(device if device is not None else None)
        parser["device"] = f"$torch.device('{dev}')"
        raw = {k: parser.get(k) for k in ("network_def", "preprocessing", "inferer", "postprocessing")}
        try:
            network = parser.get_parsed_content("network_def")
            preprocessing = parser.get_parsed_content("preprocessing")
            inferer = parser.get_parsed_content("inferer")
            postprocessing = (
                parser.get_parsed_content("postprocessing") if "postprocessing" in parser else None
            )
            if "precision" in parser:
                precision = parser.get_parsed_content("precision")
            else:  # a bundle with MONAI's boolean ``amp`` only: False keeps fp32
                precision = "auto" if "amp" not in parser or parser.get_parsed_content("amp") else "fp32"
        except Exception as e:
            raise SetupError(
                f"{files[0]}: cannot build the bundle's components: {type(e).__name__}: {e}"
            ) from None
        net_cfg = raw["network_def"] if isinstance(raw["network_def"], Mapping) else {}
        meta = _read_metadata(os.path.join(bundle_dir, "configs", "metadata.json"))
        fmt = meta.get("network_data_format", {})
        inp = next(iter(fmt.get("inputs", {}).values()), {})
        out = next(iter(fmt.get("outputs", {}).values()), {})
        spatial_dims = net_cfg.get("spatial_dims") or (
            len(inp["spatial_shape"]) if "spatial_shape" in inp else None
        )
        in_channels = net_cfg.get("in_channels") or inp.get("num_channels")
        kwargs.setdefault("labels", out.get("channel_def"))
        if kwargs.get("precision") is None:
            kwargs["precision"] = precision
        kwargs.setdefault("spatial_dims", spatial_dims if isinstance(spatial_dims, int) else None)
        kwargs.setdefault("in_channels", in_channels if isinstance(in_channels, int) else None)
        summary = {"bundle": bundle_dir, **kwargs.pop("summary", {})}
        ckpt = checkpoint if checkpoint is not None else os.path.join(bundle_dir, "models", "model.pt")
        return cls(
            network, preprocessing, inferer, postprocessing, output_dir, ckpt, device=dev,
            config_digest=json.dumps(raw, sort_keys=True, default=str), summary=summary, **kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------------------- stages
    def _prepare(self, case: Case, fp: str) -> _Prepared:
        t0 = time.perf_counter()
        if case.error:
            raise CaseError(case.error)
        key = self.image_key
        if self._load is not None:
            if case.is_dicom:
                from medseg.data.dicom_reader import DicomReader

                # a discovered series: its files are known, so the reader scans no other series' headers
                files = case.files if case.series_uid else None
                reader = DicomReader(series_uid=case.series_uid, recursive=False, files=files)
                data: dict[str, Any] = {key: _loader_like(self._load._loader, reader)(case.path)}
            elif self._nifti_loader is not None and case.path.lower().endswith(".nii.gz"):
                data = {key: self._nifti_loader(case.path)}
            else:
                data = dict(self._load({key: case.path}))
            source = data[key]
            _check_finite(source, case, "the image")
            source_meta = dict(getattr(source, "meta", {}))
            data = dict(self._rest(data))
        else:
            data = dict(self.preprocessing({key: case.path}))
            source = None
            source_meta = dict(getattr(data[key], "meta", {}))
        image = data[key]
        if not isinstance(image, torch.Tensor):
            raise CaseError(f"{case.input}: preprocessing did not produce a tensor '{key}'")
        self._check_image(image, case)
        batch = image.as_tensor() if hasattr(image, "as_tensor") else image
        batch = batch.unsqueeze(0).float()
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        keep = source if self.overlays else None
        return _Prepared(case, fp, source_meta, keep, data, batch, time.perf_counter() - t0)

    def _check_image(self, image: torch.Tensor, case: Case) -> None:
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
        roi = getattr(self.inferer, "roi_size", None)
        if roi is not None and self.min_tile_fraction > 0:
            roi = [int(r) for r in (roi if isinstance(roi, Sequence) else [roi] * len(spatial))]
            for ax, (n, r) in enumerate(zip(spatial, roi, strict=False)):
                if r > 0 and n < self.min_tile_fraction * r:
                    raise CaseError(
                        f"{case.input}: image too small: {n} voxels along axis {ax} after preprocessing "
                        f"(size {spatial}) is less than {self.min_tile_fraction:g} of the inference tile "
                        f"{tuple(roi)}"
                    )
        _check_finite(image, case, "the preprocessed image")

    def _infer(self, prep: _Prepared) -> tuple[Any, float]:
        from monai.data import MetaTensor

        t0 = time.perf_counter()
        x = prep.batch.to(self.device, non_blocking=True)
        with torch.no_grad():
            out = self._inferer(x, self.network)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, Mapping):
            out = next(iter(out.values()))
        out = out[0].float()
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        out = out.to("cpu", non_blocking=False)
        image = prep.data[self.image_key]
        pred = MetaTensor(out, meta=copy.deepcopy(dict(getattr(image, "meta", {}))))
        pred.applied_operations = copy.deepcopy(getattr(image, "applied_operations", []))
        if not torch.isfinite(out).all():
            raise CaseError(f"{prep.case.input}: the network produced NaN or infinite values")
        return pred, time.perf_counter() - t0

    def _finish(self, prep: _Prepared, pred: Any) -> tuple[dict[str, Any], float]:
        from medseg.data.writers import mask_to_source_grid, write_dicom_seg, write_nifti_mask
        from medseg.overlays import save_overlay_png

        t0 = time.perf_counter()
        case = prep.case
        d = {**prep.data, self.pred_key: pred}
        if self.postprocessing is not None:
            d = dict(self.postprocessing(d))
        mask, affine = mask_to_source_grid(d[self.pred_key], prep.source_meta)
        ref = {**prep.source_meta, "affine": affine, "original_affine": affine,
               "spatial_shape": np.asarray(mask.shape)}  # fmt: skip
        paths = output_paths(self.output_dir, case.id)
        written: list[str] = []
        objects: int | None = None
        try:
            if "nifti" in self.formats:
                written.append(write_nifti_mask(mask, ref, paths["nifti"]))
            instances = d.get(self.instance_key)
            if instances is not None:  # instance labels from the bundle's post-processing
                inst, _ = mask_to_source_grid(instances, prep.source_meta)
                objects = int(inst.max()) if inst.size else 0
                written.append(write_nifti_mask(inst, ref, paths["instances"], dtype=np.uint16))
            if "dicom-seg" in self.formats and case.is_dicom:
                labels = self.labels or None
                present = set(np.flatnonzero(np.bincount(mask.ravel())).tolist()) - {0}  # mask: uint8/16
                if labels is not None and not present <= set(labels):
                    labels = None
                written.append(write_dicom_seg(mask, None, paths["dicom-seg"], labels, reference=ref))
            if self.overlays:
                src = prep.source if prep.source is not None else prep.data[self.image_key]
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

    def _finish_case(self, prep: _Prepared, pred: Any, load_s: float, infer_s: float) -> CaseResult:
        case = prep.case
        try:
            extra, write_s = self._finish(prep, pred)
        except Exception as e:
            logger.debug("case %s failed in postprocess/write", case.id, exc_info=True)
            return CaseResult(case.id, case.input, "failed", _error_text("postprocess/write", case, e),
                              load_s + infer_s, load_s, infer_s)  # fmt: skip
        row = CaseResult(
            case.id, case.input, "ok", "", load_s + infer_s + write_s, load_s, infer_s, write_s, **extra
        )
        try:
            mark_done(self.output_dir, case.id, prep.fingerprint, self.model_key, row.to_dict())
        except Exception as e:
            unmark(self.output_dir, case.id, [os.path.join(self.output_dir, o) for o in row.outputs])
            return CaseResult(
                case.id, case.input, "failed", _error_text("marking done", case, e), row.seconds
            )
        return row

    # ---------------------------------------------------------------------------------- run
    def _pending(self, case: Case) -> tuple[str, CaseResult | None]:
        """(fingerprint, skipped row or None); cleans leftovers of a killed run for a case to redo."""
        fp = fingerprint(case)
        marker = is_done(self.output_dir, case.id, fp, self.model_key)
        clean_case(self.output_dir, case.id)
        if marker is not None:
            row = CaseResult.from_dict(marker["row"])
            row.status, row.error, row.input = "skipped", "", case.input
            row.seconds = row.load_s = row.infer_s = row.write_s = 0.0
            return fp, row
        unmark(self.output_dir, case.id, list(output_paths(self.output_dir, case.id).values()))
        return fp, None

    def run(
        self, source: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | dict]
    ) -> list[CaseResult]:
        """Discover the cases of ``source``, process this shard's share, write the report.

        Returns the rows (also in ``self.rows``); ``self.exit_code`` is 0 when none failed, else 1.
        """
        from tqdm.auto import tqdm

        started = datetime.now(timezone.utc)
        t_start = time.perf_counter()
        os.makedirs(self.output_dir, exist_ok=True)
        cases = discover_cases(source, exclude=[self.output_dir])
        shard = self.shard if self.shard is not None else shard_from_env()
        mine = select_shard(cases, shard)
        rows: dict[str, CaseResult] = {}
        lock = threading.Lock()
        bar = tqdm(total=len(mine), unit="case", disable=not self.progress, desc="medseg predict")

        def record(row: CaseResult) -> None:
            with lock:
                rows[row.id] = row
                bar.update(1)
                if row.status == "failed":
                    logger.warning("%s", row.error)

        def fail(case: Case, stage: str, e: BaseException, load_s: float = 0.0, infer_s: float = 0.0) -> None:
            logger.debug("case %s failed in %s", case.id, stage, exc_info=True)
            unmark(self.output_dir, case.id, list(output_paths(self.output_dir, case.id).values()))
            record(CaseResult(case.id, case.input, "failed", _error_text(stage, case, e), load_s + infer_s,
                              load_s, infer_s))  # fmt: skip

        def prepare(case: Case, fp: str) -> _Prepared | BaseException:
            t0 = time.perf_counter()
            try:
                return self._prepare(case, fp)
            except Exception as e:
                e.__dict__["_medseg_load_s"] = time.perf_counter() - t0
                return e

        todo: list[tuple[Case, str]] = []
        for case in mine:
            fp, skipped = self._pending(case)
            if skipped is not None:
                record(skipped)
            else:
                todo.append((case, fp))

        threads = torch.get_num_threads()
        init = _background_thread if self.device.type == "cpu" else None
        pool = functools.partial(ThreadPoolExecutor, initializer=init)
        loaders = pool(self.workers, thread_name_prefix="medseg-load") if self.workers else None
        writers = pool(self.writers, thread_name_prefix="medseg-write") if self.workers else None
        loads: deque[tuple[Case, Future | _Prepared | BaseException]] = deque()
        writes: deque[Future] = deque()
        it = iter(todo)
        try:

            def refill() -> None:
                while len(loads) < (self.workers + 1 if loaders else 1):
                    nxt = next(it, None)
                    if nxt is None:
                        return
                    c, fp = nxt
                    loads.append((c, loaders.submit(prepare, c, fp) if loaders else prepare(c, fp)))

            refill()
            while loads:
                case, fut = loads.popleft()
                prep = fut.result() if isinstance(fut, Future) else fut
                refill()
                if isinstance(prep, BaseException):
                    fail(case, "loading/preprocessing", prep, prep.__dict__.get("_medseg_load_s", 0.0))
                    continue
                try:
                    pred, infer_s = self._infer(prep)
                except Exception as e:
                    if isinstance(e, torch.cuda.OutOfMemoryError):
                        torch.cuda.empty_cache()
                    fail(case, "inference", e, prep.load_s)
                    continue
                prep.batch = torch.empty(0)  # free the input early
                if writers is None:
                    record(self._finish_case(prep, pred, prep.load_s, infer_s))
                else:
                    while len(writes) > self.writers:
                        writes.popleft().result()
                    fut_w = writers.submit(self._finish_case, prep, pred, prep.load_s, infer_s)
                    fut_w.add_done_callback(lambda f: record(f.result()) if f.exception() is None else None)
                    writes.append(fut_w)
            for f in writes:
                f.result()
        finally:
            if loaders:
                loaders.shutdown(wait=True, cancel_futures=True)
            if writers:
                writers.shutdown(wait=True)
            torch.set_num_threads(threads)  # the default for threads started later
            bar.close()
            self.rows = sorted(rows.values(), key=lambda r: r.id)
            wall = time.perf_counter() - t_start
            summary = {
                **self.summary,
                "input": os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<list>",
                "output": self.output_dir,
                "device": str(self.device),
                "precision": str(self.precision),
                "model_sha256": self.checkpoint_sha256,
                "formats": list(self.formats),
                "overlays": self.overlays,
                "workers": self.workers,
                "discovered_cases": len(cases),
                "started": started.isoformat(timespec="seconds"),
                "wall_s": round(wall, 3),
                "cases_per_s": round(len(self.rows) / wall, 4) if wall > 0 else None,
            }
            write_report(self.rows, self.output_dir, summary, shard)
        self.exit_code = exit_code(self.rows)
        return self.rows


def _with_precision(inferer: Any, precision: Precision) -> Any:
    """``inferer`` running its forward passes in ``precision``: a copy with that ``precision`` when it
    has the setting (:class:`~medseg.inferers.OverlapTileInferer`), else wrapped in a
    :class:`~medseg.inferers.MixedPrecisionInferer` (MONAI's inferers)."""
    from medseg.inferers import MixedPrecisionInferer

    if hasattr(inferer, "precision"):
        out = copy.copy(inferer)
        out.precision = precision
        return out
    return MixedPrecisionInferer(precision, inferer)


def _background_thread() -> None:
    """Loader/writer threads when inference runs on the CPU: the cores belong to inference, so their
    torch ops run single-threaded (a per-thread OpenMP setting) instead of oversubscribing the cores."""
    torch.set_num_threads(1)


def _fast_nifti_loader(loader: Any) -> Any:
    """A ``LoadImage`` like the bundle's, reading ``.nii.gz`` with :class:`~medseg.data.NiftiReader`
    (MONAI's ``NibabelReader`` settings carried over); ``None`` when the bundle names its own reader."""
    from monai.data import NibabelReader

    from medseg.data.nifti_reader import NiftiReader

    if not getattr(loader, "auto_select", False):
        return None
    base = next((r for r in reversed(loader.readers) if type(r) is NibabelReader), None)
    if base is None:
        return None
    reader = NiftiReader(
        channel_dim=base.channel_dim,
        as_closest_canonical=base.as_closest_canonical,
        squeeze_non_spatial_dims=base.squeeze_non_spatial_dims,
        **base.kwargs,
    )
    return _loader_like(loader, reader)


def _loader_like(loader: Any, reader: Any) -> Any:
    """A ``LoadImage`` with the bundle's ``loader`` settings (dtype, channel-first, metadata pruning) and
    the given ``reader``: how the engine loads DICOM series and ``.nii.gz`` files."""
    from monai.transforms import LoadImage

    return LoadImage(
        reader=reader,
        image_only=True,
        dtype=getattr(loader, "dtype", np.float32),
        ensure_channel_first=getattr(loader, "ensure_channel_first", False),
        simple_keys=getattr(loader, "simple_keys", False),
        prune_meta_pattern=getattr(loader, "pattern", None),
        prune_meta_sep=getattr(loader, "sep", "."),
    )


def _check_finite(x: Any, case: Case, what: str) -> None:
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


def _read_metadata(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}
