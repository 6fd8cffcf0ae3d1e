"""``medseg listen``: a DICOM C-STORE SCP (PS3.4 Annex B) that segments the series it receives.

* Associations: accepted only when addressed to our AE title (PS3.8 7.1.1.6, Called AE Title) and,
  when ``calling_aets`` is given, only from those AE titles (PS3.8 7.1.1.7); every storage SOP class is
  accepted in every transfer syntax pynetdicom knows, plus Verification (C-ECHO, PS3.4 Annex A).
* Each received instance is written to ``OUT/.medseg/received/<id>/`` (atomically, flushed to disk)
  *before* the C-STORE response is sent: an acknowledged instance is never lost. Instances of another
  modality than the bundle's, and SEG objects, are acknowledged and left out.
* A series is complete when no instance of it arrived for ``series_timeout`` seconds (DIMSE has no
  "end of series": PS3.4 B.2 stores one instance per operation). It is then segmented by the usual
  engine (:class:`~medseg.predict.engine.BatchPredictor`; id ``series-<hash>``, free of patient data),
  its DICOM SEG is stored back (STOW-RS or C-STORE, :func:`~medseg.predict.pacs.store_rows`) and its row
  is added to ``OUT/report.json`` / ``report.csv``, which hold every series the listener has seen.
* A store that fails is retried every ``store_retry`` seconds (without redoing the inference).
* A restart picks up every received series: finished and stored ones are skipped, the others are
  segmented and stored. SIGTERM (or SIGINT) lets the current case finish, then the listener stops
  (exit status 0).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from medseg.predict.command import add_memory_option, memory_policy
from medseg.predict.pacs import Store, instance_file_name, series_case, series_case_id, store_rows

__all__ = ["Listener", "add_listen_parser", "run_listen"]

logger = logging.getLogger(__name__)

RECEIVED_DIR = os.path.join(".medseg", "received")
#: C-STORE failure status "Out of Resources" (PS3.4 B.2.3): the instance could not be written
_OUT_OF_RESOURCES = 0xA700
#: C-STORE failure status "Data Set does not match SOP Class" (PS3.4 B.2.3)
_NO_MATCH = 0xA900


class Listener:
    """A C-STORE SCP feeding :class:`~medseg.predict.engine.BatchPredictor` (see the module docstring).

    Args:
        predictor: the engine (its output folder is the listener's).
        ae_title: our AE title (called, and calling for C-STORE back).
        port: the TCP port to listen on; ``host``: the address (default all interfaces).
        store: where SEG objects go (``None``: kept in the output folder only).
        series_timeout: seconds without a new instance after which a series is complete.
        calling_aets: accept associations only from these AE titles (default any).
        modality: the bundle's modality; instances of other modalities are left out.
        store_retry: seconds between attempts to store a SEG whose store failed.
    """

    def __init__(
        self,
        predictor: Any,
        ae_title: str,
        port: int,
        *,
        host: str = "0.0.0.0",
        store: Store | None = None,
        series_timeout: float = 10.0,
        calling_aets: list[str] | None = None,
        modality: str | None = None,
        store_retry: float = 30.0,
        poll: float = 0.2,
    ) -> None:
        self.predictor = predictor
        self.output_dir = predictor.output_dir
        self.received_dir = os.path.join(self.output_dir, RECEIVED_DIR)
        self.ae_title, self.host, self.port = ae_title, host, int(port)
        self.store = store
        self.series_timeout = float(series_timeout)
        self.calling_aets = list(calling_aets or [])
        self.modality = modality.upper() if modality else None
        self.store_retry = float(store_retry)
        self.poll = float(poll)
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._due: dict[str, float] = {}  # case id -> monotonic time after which it is processed
        self._rows: dict[str, Any] = {}
        self._server: Any = None

    # ------------------------------------------------------------------------------ C-STORE SCP
    def _ae(self) -> Any:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.calling_aets:
            ae.require_calling_aet = self.calling_aets
        ae.maximum_pdu_size = 0  # no limit on what the peer sends per PDU
        return ae

    def _on_store(self, event: Any) -> int:
        """EVT_C_STORE: write the instance, then acknowledge (PS3.4 B.2.3 status)."""
        try:
            ds = event.dataset
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            sop_uid = str(event.request.AffectedSOPInstanceUID or ds.get("SOPInstanceUID", "") or "")
            modality = str(ds.get("Modality", "") or "").upper()
        except Exception:
            logger.warning("received an instance that cannot be decoded", exc_info=True)
            return _NO_MATCH
        if not series_uid or not sop_uid:
            return _NO_MATCH
        if modality == "SEG" or (self.modality and modality and modality != self.modality):
            logger.info("left out an instance of modality %s", modality or "?")
            return 0x0000
        case_id = series_case_id(series_uid)
        path = os.path.join(self.received_dir, case_id, instance_file_name(sop_uid))
        try:
            _write_durably(path, event.encoded_dataset())
        except Exception:
            logger.error("cannot write a received instance to %s", path, exc_info=True)
            return _OUT_OF_RESOURCES
        with self._lock:
            self._due[case_id] = time.monotonic() + self.series_timeout
        return 0x0000

    # ------------------------------------------------------------------------------- processing
    def _recover(self) -> None:
        """Queue every received series (those left by an earlier run included)."""
        try:
            names = sorted(os.listdir(self.received_dir))
        except FileNotFoundError:
            return
        now_wall, now = time.time(), time.monotonic()
        for name in names:
            folder = os.path.join(self.received_dir, name)
            try:
                newest = max(os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder))
            except (OSError, ValueError):
                continue
            with self._lock:
                self._due.setdefault(name, now + max(0.0, self.series_timeout - (now_wall - newest)))

    def _load_report(self) -> None:
        from medseg.predict.report import read_report

        try:
            _, rows = read_report(os.path.join(self.output_dir, "report.json"))
        except (OSError, ValueError):
            return
        self._rows = {r.id: r for r in rows}

    def process(self, case_id: str) -> Any:
        """Segment one received series, store its SEG, record the row; returns the row."""
        from medseg.predict.report import write_report

        folder = os.path.join(self.received_dir, case_id)
        case = series_case(folder, case_id, f"received/{case_id}")
        rows = self.predictor.run(folder, cases=[case])
        before = {r.id: r.status for r in rows}
        if self.store is not None:
            rows = store_rows(rows, self.output_dir, self.store)
        for row in rows:
            if before[row.id] in ("ok", "skipped") and row.status == "failed":  # the store failed
                with self._lock:
                    self._due.setdefault(row.id, time.monotonic() + self.store_retry)
            old = self._rows.get(row.id)
            if row.status == "skipped" and old is not None and old.status == "ok":
                continue  # done by an earlier run: keep its row
            self._rows[row.id] = row
        summary = {**self.predictor.summary, "mode": "listen", "ae_title": self.ae_title, "port": self.port,
                   "output": self.output_dir, "store": getattr(self.store, "destination", None)}  # fmt: skip
        write_report(list(self._rows.values()), self.output_dir, summary)
        for row in rows:
            level = logging.WARNING if row.status == "failed" else logging.INFO
            logger.log(level, "%s: %s %s", row.id, row.status, row.error)
        return rows[0] if rows else None

    def _next_due(self) -> str | None:
        now = time.monotonic()
        with self._lock:
            due = sorted((t, cid) for cid, t in self._due.items() if t <= now)
            if not due:
                return None
            cid = due[0][1]
            del self._due[cid]
            return cid

    def start(self) -> None:
        """Start accepting associations (in background threads)."""
        from pynetdicom import evt

        os.makedirs(self.received_dir, exist_ok=True)
        self._load_report()
        self._recover()
        self._server = self._ae().start_server(
            (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        logger.warning("medseg listen: AE title %s on %s:%d, output %s", self.ae_title, self.host, self.port,
                       self.output_dir)  # fmt: skip

    def serve(self) -> int:
        """Process series as they complete until :attr:`stop` is set; returns the exit status 0."""
        if self._server is None:
            self.start()
        try:
            while not self.stop.is_set():
                cid = self._next_due()
                if cid is None:
                    self.stop.wait(self.poll)
                    continue
                try:
                    self.process(cid)
                except Exception:  # never let one series stop the listener
                    logger.error("series %s could not be processed", cid, exc_info=True)
        finally:
            self._server.shutdown()
            self._server = None
        return 0


def _write_durably(path: str, data: bytes) -> None:
    """Write ``data`` atomically and flush it to the disk before returning."""
    from medseg.io import atomic_target

    with atomic_target(path, ".dcm") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------- command line
def add_listen_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``listen`` subcommand on an ``add_subparsers()`` object."""
    p = sub.add_parser(
        "listen",
        help="DICOM listener (C-STORE SCP): segment each series received, store the SEG back",
        description="A DICOM C-STORE SCP: each received instance is written to disk before it is "
        "acknowledged; a series is segmented once no instance arrived for --series-timeout seconds, its "
        "DICOM SEG stored back (--store) and recorded in OUTPUT/report.json. SIGTERM finishes the current "
        "case and exits 0; a restart picks up received, unprocessed series.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder (configs/inference.json, models/model.pt)")
    p.add_argument("--ae-title", required=True, help="our AE title (associations to another are rejected)")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all interfaces)")
    p.add_argument("--output", required=True, help="output folder (received instances, masks, report)")
    p.add_argument("--store", default=None,
                   help="dimse://AET@host:port (C-STORE) or http(s)://host/dicom-web (STOW-RS)")  # fmt: skip
    p.add_argument("--series-timeout", type=float, default=10.0,
                   help="seconds without a new instance that complete a series (default 10)")  # fmt: skip
    p.add_argument("--calling-ae", nargs="+", action="extend", default=[], metavar="AET",
                   help="accept associations only from these calling AE titles (default any)")  # fmt: skip
    p.add_argument("--formats", default="nifti,dicom-seg", help="comma list of nifti, dicom-seg")
    p.add_argument("--config-file", nargs="+", default=None, help="inference config file(s), merged in order")
    p.add_argument("--ckpt", default=None, help="checkpoint (default <bundle>/models/model.pt)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None)
    p.add_argument("--workers", type=int, default=0, help="loader threads (default 0: one series at a time)")
    p.add_argument("--store-retry", type=float, default=30.0, help="seconds between store retries")
    add_memory_option(p)
    p.set_defaults(func=run_listen)
    return p


def run_listen(args: argparse.Namespace) -> int:
    """Run ``medseg listen``; returns the exit status (0 after SIGTERM, 2 when it cannot start)."""
    from medseg.bundle import read_metadata
    from medseg.predict.engine import BatchPredictor, SetupError
    from medseg.predict.pacs import bundle_modality, open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "monai", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        store = open_store(args.store, ae_title=args.ae_title) if args.store else None
        if store is not None and "dicom-seg" not in formats:
            formats.append("dicom-seg")
        predictor = BatchPredictor.from_bundle(
            args.bundle, args.output, config_file=args.config_file, checkpoint=args.ckpt, device=args.device,
            precision=args.precision, formats=formats, workers=args.workers, progress=False,
            retain_freed_memory=memory_policy(args),
        )  # fmt: skip
        listener = Listener(
            predictor, args.ae_title, args.port, host=args.host, store=store,
            series_timeout=args.series_timeout, calling_aets=args.calling_ae,
            modality=bundle_modality(read_metadata(args.bundle)), store_retry=args.store_retry,
        )  # fmt: skip
        listener.start()
    except (SetupError, ValueError, OSError) as e:
        print(f"medseg listen: {e}", file=sys.stderr)
        return 2

    def _stop(signum: int, frame: Any) -> None:
        logger.warning("medseg listen: signal %d, stopping after the current case", signum)
        listener.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return listener.serve()
