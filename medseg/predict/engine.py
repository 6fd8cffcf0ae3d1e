"""The batch-prediction runner: a MONAI bundle's inference pipeline over many cases, pipelined.

Data flows one way, as in nnU-Net's predictor: **source -> runner -> sink**.

* source: :mod:`~medseg.predict.discovery` (which paths are cases) and
  :class:`~medseg.predict.sources.CaseLoader` (strict loading + the bundle's preprocessing);
* runner (this module): :class:`BatchPredictor` schedules ``load + preprocess`` (``workers`` threads,
  up to ``workers + 1`` cases ahead) -> ``inference`` (the calling thread; model loaded once, on CUDA
  when present: pinned host memory, ``non_blocking`` copies; in the chosen :mod:`medseg.precision`)
  -> ``postprocess + write`` (``writers`` threads; at most ``writers + 1`` cases queued so memory stays
  bounded), so loading and writing overlap with inference. Heavy work in all three stages releases the
  GIL, so threads suffice and share the transforms and the model without pickling;
* sink: :class:`~medseg.predict.sinks.FileSink` (post-processing, source grid, writers).

Failure isolation: any error of a case (unreadable file, wrong dimensionality, too small, NaN voxels,
CUDA out of memory, ...) becomes a *failed* row with a one-line message naming the input and the cause;
its partial outputs are removed; the batch goes on. Finished cases carry a done marker
(:mod:`medseg.predict.state`) keyed by the input fingerprint and the model key (checkpoint sha256 +
bundle config + output options), so a killed run started again skips them and redoes the rest.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import torch

from medseg.allocator import retain_freed_memory
from medseg.bundle import BundleError, load_weights, network_io, read_metadata
from medseg.networks.batch_norm_folding import fold_batch_norm
from medseg.precision import Precision, resolve_precision
from medseg.predict.discovery import Case, discover_cases, fingerprint, select_shard, shard_from_env
from medseg.predict.errors import CaseError, SetupError, error_text
from medseg.predict.report import CaseResult, exit_code, write_report
from medseg.predict.sinks import FORMATS, FileSink, channel_argmax
from medseg.predict.sources import CaseLoader, Loaded
from medseg.predict.state import clean_case, is_done, mark_done, output_paths, unmark

__all__ = ["BatchPredictor", "FORMATS", "SetupError", "channel_argmax", "load_checkpoint"]

logger = logging.getLogger(__name__)


def load_checkpoint(network: torch.nn.Module, path: str | os.PathLike[str]) -> str:
    """Load a checkpoint (any layout :func:`medseg.bundle.read_state_dict` reads) into ``network``
    strictly; returns the file's sha256. Unusable checkpoints raise :class:`SetupError`."""
    try:
        return load_weights(network, path)
    except BundleError as e:
        raise SetupError(str(e)) from None


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
        retain_freed_memory: keep freed memory in the process while :meth:`run` runs
            (:func:`medseg.allocator.retain_freed_memory`, glibc): forward passes over large images then
            reuse their pages instead of faulting them in again, and the process holds its peak memory until
            the run ends, when the C library's default policy is restored. A bundle sets it with the config
            id ``retain_freed_memory``.
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
        retain_freed_memory: bool = False,
    ) -> None:
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise SetupError(f"unknown output format(s) {bad}; choose from {list(FORMATS)}")
        if workers < 0 or writers < 1:
            raise SetupError("workers must be >= 0 and writers >= 1")
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        check_output_dir(self.output_dir)
        self.device = _resolve_device(device)
        self.network = network.to(self.device).eval()
        ckpt_hash = load_checkpoint(self.network, checkpoint) if checkpoint is not None else "untrained"
        self.checkpoint_sha256 = ckpt_hash
        folded = copy.deepcopy(self.network)  # the caller's network keeps its layers
        if fold_batch_norm(folded):
            self.network = folded
        try:
            self.precision = resolve_precision(precision, self.device)
        except ValueError as e:
            raise SetupError(str(e)) from None
        self.precision.prepare(self.network)
        self.preprocessing = preprocessing
        self.inferer = inferer
        self._inferer = _with_precision(inferer, self.precision)
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
        self.retain_freed_memory = bool(retain_freed_memory)
        self.model_key = hashlib.sha256(
            json.dumps([ckpt_hash, config_digest, self.formats, overlays, self.precision.name]).encode()
        ).hexdigest()
        self.loader = CaseLoader(
            preprocessing, image_key, spatial_dims=spatial_dims, in_channels=in_channels,
            roi_size=getattr(inferer, "roi_size", None), min_tile_fraction=self.min_tile_fraction,
            pin_memory=self.device.type == "cuda", keep_source=overlays,
        )  # fmt: skip
        keys = (image_key, pred_key, instance_key)
        self.sink = FileSink(self.output_dir, postprocessing, self.formats, overlays, self.labels, *keys,
                             uid_seed=self.model_key)  # fmt: skip
        self.postprocessing = self.sink.postprocessing  # as applied: savers dropped, fast argmax
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
            if "retain_freed_memory" in parser and kwargs.get("retain_freed_memory") is None:
                kwargs["retain_freed_memory"] = bool(parser.get_parsed_content("retain_freed_memory"))
            if "precision" in parser:
                precision = parser.get_parsed_content("precision")
            else:  # a bundle with MONAI's boolean ``amp`` only: False keeps fp32
                precision = "auto" if "amp" not in parser or parser.get_parsed_content("amp") else "fp32"
        except Exception as e:
            raise SetupError(
                f"{files[0]}: cannot build the bundle's components: {type(e).__name__}: {e}"
            ) from None
        io = network_io(read_metadata(bundle_dir), raw["network_def"])
        kwargs.setdefault("labels", io["labels"])
        if kwargs.get("precision") is None:
            kwargs["precision"] = precision
        kwargs.setdefault("spatial_dims", io["spatial_dims"])
        kwargs.setdefault("in_channels", io["in_channels"])
        summary = {"bundle": bundle_dir, **kwargs.pop("summary", {})}
        ckpt = checkpoint if checkpoint is not None else os.path.join(bundle_dir, "models", "model.pt")
        return cls(
            network, preprocessing, inferer, postprocessing, output_dir, ckpt, device=dev,
            config_digest=json.dumps(raw, sort_keys=True, default=str), summary=summary, **kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------------------- stages
    def _infer(self, prep: Loaded) -> tuple[Any, float]:
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

    def _finish_case(self, prep: Loaded, pred: Any, load_s: float, infer_s: float) -> CaseResult:
        case = prep.case
        try:
            extra, write_s = self.sink.write(prep, pred)
        except Exception as e:
            logger.debug("case %s failed in postprocess/write", case.id, exc_info=True)
            return CaseResult(case.id, case.input, "failed", error_text("postprocess/write", case.input, e),
                              load_s + infer_s, load_s, infer_s)  # fmt: skip
        row = CaseResult(
            case.id, case.input, "ok", "", load_s + infer_s + write_s, load_s, infer_s, write_s, **extra
        )
        try:
            mark_done(self.output_dir, case.id, prep.fingerprint, self.model_key, row.to_dict())
        except Exception as e:
            unmark(self.output_dir, case.id, [os.path.join(self.output_dir, o) for o in row.outputs])
            return CaseResult(
                case.id, case.input, "failed", error_text("marking done", case.input, e), row.seconds
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
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | dict],
        cases: Sequence[Case] | None = None,
    ) -> list[CaseResult]:
        """Discover the cases of ``source`` (or take ``cases``, discovered from it already), process this
        shard's share, write the report.

        Returns the rows (also in ``self.rows``); ``self.exit_code`` is 0 when none failed, else 1.
        """
        retained = self.retain_freed_memory and retain_freed_memory(True)
        try:
            return self._run(source, cases)
        finally:
            if retained:
                retain_freed_memory(False)

    def _run(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | dict],
        cases: Sequence[Case] | None,
    ) -> list[CaseResult]:
        from tqdm.auto import tqdm

        started = datetime.now(timezone.utc)
        t_start = time.perf_counter()
        if isinstance(source, (str, os.PathLike)):
            check_output_dir(self.output_dir, source)
        if cases is None:
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
            msg = error_text(stage, case.input, e)
            record(CaseResult(case.id, case.input, "failed", msg, load_s + infer_s, load_s, infer_s))

        def prepare(case: Case, fp: str) -> Loaded | BaseException:
            t0 = time.perf_counter()
            try:
                return self.loader.load(case, fp)
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
        loads: deque[tuple[Case, Future | Loaded | BaseException]] = deque()
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
                    # nothing left to infer: this case's post-processing may use every core
                    cores = threads if init is not None and not loads else None
                    fut_w = writers.submit(
                        _with_threads, cores, self._finish_case, prep, pred, prep.load_s, infer_s
                    )
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


def check_output_dir(output_dir: str, source: str | os.PathLike[str] | None = None) -> None:
    """Refuse an output folder that cannot be written, or that is the input folder itself (a second run
    would segment the first run's outputs); one inside the input is excluded from discovery."""
    out = os.path.realpath(output_dir)
    if source is not None and os.path.isdir(source) and os.path.realpath(source) == out:
        raise SetupError(f"{output_dir}: the output folder is the input folder; choose another output folder")
    try:
        os.makedirs(out, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".medseg-write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise SetupError(f"{output_dir}: cannot write to the output folder ({e.strerror or e})") from None


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


def _with_threads(n: int | None, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with this thread's torch ops on ``n`` threads (``None``: as they are)."""
    if n is None:
        return fn(*args)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def _background_thread() -> None:
    """Loader/writer threads when inference runs on the CPU: the cores belong to inference, so their
    torch ops run single-threaded (a per-thread OpenMP setting) instead of oversubscribing the cores."""
    torch.set_num_threads(1)
