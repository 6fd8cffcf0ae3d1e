"""What the PACS modes share: series cases with ids free of patient data, and the store stage.

A series that arrives from a PACS (retrieved with DICOMweb WADO-RS, :mod:`~medseg.predict.dicomweb`, or
received by the C-STORE listener, :mod:`~medseg.predict.listener`) is kept in a folder of its own,
``<cache>/<id>/``, one file per instance named by a hash of its SOPInstanceUID; its case id is
``series-`` + a hash of the SeriesInstanceUID (PS3.3 C.7.3.1): stable, and free of patient data.

The store stage sends each finished case's DICOM SEG to a PACS, with STOW-RS (PS3.18 10.5,
:class:`~medseg.predict.dicomweb.StowStore`) or C-STORE (PS3.4 Annex B, PS3.7 9.1.1,
:class:`~medseg.predict.dimse.CStoreStore`). A ledger (``OUT/.medseg/stored/<id>.json``) records which
SEG (by SOPInstanceUID) reached which destination; a SEG is sent only after its case is finished (done
marker), and the ledger is written only after the peer confirmed the store. A failed store is a failed
row (exit status 1) whose outputs stay in place; the next run skips the inference and sends it again.
Since the SEG's UIDs are derived from the source instances and the model
(:func:`medseg.data.writers.write_dicom_seg`'s ``sop_instance_uid``), a store repeated after a kill -9
between the peer's confirmation and the ledger carries the same SOPInstanceUID, which a PACS keeps once
(PS3.4 B.4.1: a SOP Instance is identified by its UID).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from medseg.io import atomic_target
from medseg.predict.discovery import Case
from medseg.predict.report import CaseResult
from medseg.predict.state import STATE_DIR

__all__ = [
    "Store",
    "StoreError",
    "bundle_modality",
    "instance_file_name",
    "open_store",
    "redact_url",
    "series_case",
    "series_case_id",
    "store_rows",
]

logger = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A DICOM object could not be stored on the peer; the message names the peer and the reason."""


class Store(Protocol):
    """A destination for DICOM SEG objects."""

    #: the destination as shown in reports and the ledger (no credentials)
    destination: str

    def store(self, path: str) -> None:
        """Send the DICOM file ``path``; raise :class:`StoreError` unless the peer confirmed it."""
        ...


# ----------------------------------------------------------------------------------------------- ids
def series_case_id(series_uid: str) -> str:
    """``series-`` + 16 hex digits of sha256(SeriesInstanceUID): stable, free of patient data."""
    return "series-" + hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def instance_file_name(sop_instance_uid: str) -> str:
    """File name of a cached / received instance: a hash of its SOPInstanceUID (one file per instance)."""
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:24] + ".dcm"


def redact_url(url: str) -> str:
    """``url`` without user name and password."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def bundle_modality(metadata: Mapping[str, Any]) -> str | None:
    """The Modality (PS3.3 C.7.3.1.1.1) the bundle's network takes: ``network_data_format.inputs.*.modality``
    of ``configs/metadata.json``, upper case; ``None`` when the metadata does not say."""
    fmt = metadata.get("network_data_format", {}) if isinstance(metadata, Mapping) else {}
    inputs = fmt.get("inputs", {}) if isinstance(fmt, Mapping) else {}
    for spec in inputs.values() if isinstance(inputs, Mapping) else ():
        if isinstance(spec, Mapping) and isinstance(spec.get("modality"), str) and spec["modality"].strip():
            return spec["modality"].strip().upper()
    return None


def series_case(folder: str, case_id: str, label: str, series_uid: str | None = None) -> Case:
    """The case of one series folder (every ``*.dcm`` in it): header scans done here, once, and handed to
    the reader. An instance whose header cannot be read fails the whole series (a series with a hole is
    not segmented): the row names the instance file and the reason."""
    from medseg.predict.discovery import _scan

    try:
        files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                       if n.endswith(".dcm") and not n.startswith("."))  # not a killed write's temp file
    except OSError as e:
        return Case(case_id, label, folder, "dicom-series", (), series_uid, f"{label}: {e.strerror or e}")
    if not files:
        return Case(case_id, label, folder, "dicom-series", (), series_uid, f"{label}: no instances")
    headers: list[Any] = []
    error = None
    uids = set()
    for f in files:
        uid, slices, reason = _scan(f)
        if uid is None:
            error = error or f"{label}: instance {os.path.basename(f)} is unreadable: {reason}"
            continue
        uids.add(uid)
        headers.extend(slices)
    if error is None and len(uids) > 1:
        error = f"{label}: the folder holds {len(uids)} series"
    uid = series_uid or (next(iter(uids)) if len(uids) == 1 else None)
    return Case(case_id, label, folder, "dicom-series", tuple(files), uid, error, tuple(headers))


# ------------------------------------------------------------------------------------------- stores
def open_store(url: str, ae_title: str = "MEDSEG", timeout: float = 30.0) -> Store:
    """A store for ``url``: ``http(s)://host:port/dicom-web`` (STOW-RS) or ``dimse://AET@host:port``
    (C-STORE, calling AE title ``ae_title``). Raises ``ValueError`` for anything else."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        from medseg.predict.dicomweb import StowStore

        return StowStore(url, timeout=timeout)
    if scheme == "dimse":
        from medseg.predict.dimse import CStoreStore

        return CStoreStore(url, ae_title=ae_title, timeout=timeout)
    raise ValueError(f"--store {url!r}: expected http(s)://host:port/dicom-web or dimse://AET@host:port")


def _ledger(output_dir: str, case_id: str) -> str:
    return os.path.join(output_dir, STATE_DIR, "stored", f"{case_id}.json")


def stored_uid(output_dir: str, case_id: str, destination: str) -> str | None:
    """SOPInstanceUID of the SEG last confirmed by ``destination`` for this case, else ``None``."""
    try:
        with open(_ledger(output_dir, case_id), encoding="utf-8") as fh:
            return json.load(fh).get(destination)
    except (OSError, ValueError, AttributeError):
        return None


def _record_stored(output_dir: str, case_id: str, destination: str, sop_uid: str) -> None:
    path = _ledger(output_dir, case_id)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        doc = {}
    doc[destination] = sop_uid
    with atomic_target(path, ".json") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)


def store_rows(rows: Sequence[CaseResult], output_dir: str, store: Store) -> list[CaseResult]:
    """Send the DICOM SEG of every ok / skipped row to ``store`` unless the ledger says it is there.

    A row whose store fails becomes *failed* (its outputs and done marker stay: the next run sends it
    again without redoing the inference); a skipped row whose SEG is sent now becomes *ok*. Returns the
    rows (updated in place). After the first failure to reach the peer at all, the remaining rows fail
    with the same reason instead of waiting for one timeout each.
    """
    import pydicom

    from medseg.predict.state import OUTPUT_SUFFIXES

    unreachable: str | None = None
    seg_suffix = OUTPUT_SUFFIXES["dicom-seg"]
    for row in rows:
        if row.status not in ("ok", "skipped"):
            continue
        segs = [o for o in row.outputs if o.endswith(seg_suffix)]
        if not segs:
            continue
        path = os.path.join(output_dir, segs[0])
        try:
            sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        except Exception as e:
            row.status, row.error = "failed", f"{row.input}: store: cannot read {segs[0]}: {e}"
            continue
        if stored_uid(output_dir, row.id, store.destination) == sop_uid:
            continue
        if unreachable is not None:
            row.status = "failed"
            row.error = f"{row.input}: store to {store.destination} failed: {unreachable}"
            continue
        try:
            store.store(path)
        except StoreError as e:
            logger.warning("%s", e)
            row.status, row.error = "failed", f"{row.input}: store to {store.destination} failed: {e}"
            if getattr(e, "unreachable", False):
                unreachable = str(e)
            continue
        _record_stored(output_dir, row.id, store.destination, sop_uid)
        if row.status == "skipped":
            row.status = "ok"
    return list(rows)


def rewrite_report(rows: Sequence[CaseResult], output_dir: str, shard: tuple[int, int] | None = None) -> None:
    """Write the report again with ``rows`` (after the store stage), keeping the run's summary."""
    from medseg.predict.report import read_report, report_paths, write_report

    try:
        summary, _ = read_report(report_paths(output_dir, shard)[0])
    except (OSError, ValueError):
        summary = {}
    write_report(rows, output_dir, summary, shard)
