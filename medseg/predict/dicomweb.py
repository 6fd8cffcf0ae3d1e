"""DICOMweb (PS3.18) as a source and a sink of batch prediction, with ``dicomweb-client``.

Source, :class:`DicomwebSource`:

* QIDO-RS (PS3.18 10.6) lists the series: of the given studies, or all those matching the query
  (``--query KEY=VALUE``: QIDO-RS attribute matching, PS3.18 8.3.4), results paged to the end; series of
  another modality than the bundle's (``network_data_format.inputs.*.modality``) and SEG objects are
  left out;
* WADO-RS (PS3.18 10.4) retrieves each series into ``OUT/.medseg/dicomweb/<id>/``, one file per
  instance (named by a hash of its SOPInstanceUID), each written atomically: a run killed during the
  retrieval keeps what it had; when the cache does not hold as many instances as QIDO-RS counts, the
  next run asks QIDO-RS which instances the series holds and fetches only the missing ones (instances
  gone from the PACS are dropped from the cache);
* the cached series are the cases of the usual engine (ids ``series-<hash>``, free of patient data).

Sink, :class:`StowStore`: STOW-RS (PS3.18 10.5) of a DICOM SEG; a response without the instance in its
ReferencedSOPSequence (or with it in the FailedSOPSequence) is a failure (PS3.18 10.5.3).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from medseg.io import atomic_target
from medseg.predict.discovery import Case, select_shard
from medseg.predict.pacs import (
    StoreError,
    instance_file_name,
    redact_url,
    series_case,
    series_case_id,
)

__all__ = ["DicomwebError", "DicomwebSource", "RemoteSeries", "StowStore", "make_client", "parse_query"]

logger = logging.getLogger(__name__)

_SOP_UID = "SOPInstanceUID"
#: a cached series folder is ``<cache>/<id>/``
CACHE_DIR = os.path.join(".medseg", "dicomweb")


class DicomwebError(RuntimeError):
    """The DICOMweb service cannot be used (unreachable, refused the query): the run cannot start."""


def make_session(url: str) -> Any:
    """A ``requests.Session`` for ``url`` (user:password in the URL become HTTP basic auth)."""
    from urllib.parse import urlsplit

    import requests

    parts = urlsplit(url)
    session = requests.Session()
    if parts.username is not None:
        session.auth = (parts.username, parts.password or "")
    return session


def make_client(url: str, timeout: float = 60.0, session: Any = None) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` (user:password in the URL become basic auth)."""
    from dicomweb_client.api import DICOMwebClient

    session = session if session is not None else make_session(url)
    client = DICOMwebClient(redact_url(url).rstrip("/"), session=session, timeout=timeout)
    # dicomweb-client retries 429 / 408 / 503 / 504 answers and every connection error with exponential
    # back-off (5 attempts: 30 s for a service that is down); 3 attempts, 0.4 s then 0.8 s apart
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=200)
    return client


def parse_query(items: Sequence[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> QIDO-RS matching keys (DICOM keywords or tags, PS3.18 8.3.4)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--query {item!r}: expected KEY=VALUE (e.g. StudyDate=20240101-20240131)")
        out[key.strip()] = value.strip()
    return out


def _value(item: Mapping[str, Any], tag: str) -> str | None:
    """First value of a DICOM JSON attribute (PS3.18 F.2), as text."""
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


@dataclass(frozen=True)
class RemoteSeries:
    """One series as QIDO-RS listed it."""

    study_uid: str
    series_uid: str
    modality: str | None
    n_instances: int | None

    @property
    def id(self) -> str:
        return series_case_id(self.series_uid)


class DicomwebSource:
    """Series of a DICOMweb service as cases (see the module docstring).

    Args:
        url: the service root, e.g. ``http://pacs:8042/dicom-web``.
        output_dir: the run's output folder; the cache is ``OUT/.medseg/dicomweb/``.
        modality: the bundle's modality; series of other modalities are left out (``None``: all but SEG).
        studies: StudyInstanceUIDs to take (default: every study the query matches).
        query: QIDO-RS matching keys (``{"StudyDate": "20240101-20240131"}``).
        workers: series retrieved at the same time.
        timeout: seconds per HTTP request.
    """

    def __init__(
        self,
        url: str,
        output_dir: str,
        *,
        modality: str | None = None,
        studies: Sequence[str] = (),
        query: Mapping[str, str] | None = None,
        workers: int = 4,
        timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.cache_dir = os.path.join(os.path.abspath(output_dir), CACHE_DIR)
        self.modality = modality.upper() if modality else None
        self.studies = list(studies)
        self.query = dict(query or {})
        self.workers = max(1, int(workers))
        self.timeout = timeout
        self._local = threading.local()

    @property
    def session(self) -> Any:
        """One HTTP session per thread."""
        if getattr(self._local, "session", None) is None:
            self._local.session = make_session(self.url)
        return self._local.session

    @property
    def client(self) -> Any:
        """One client per thread, on :attr:`session`."""
        if getattr(self._local, "client", None) is None:
            self._local.client = make_client(self.url, self.timeout, self.session)
        return self._local.client

    # -------------------------------------------------------------------------------- QIDO-RS
    def list_series(self) -> list[RemoteSeries]:
        """QIDO-RS ``/studies/{uid}/series`` per study, or ``/series`` with the query (PS3.18 10.6.1);
        sorted by id. Raises :class:`DicomwebError` when the service does not answer."""
        filters = dict(self.query)
        if self.modality and not any(k in ("Modality", "00080060") for k in filters):
            filters["Modality"] = self.modality
        fields = ["Modality", "NumberOfSeriesRelatedInstances", "StudyInstanceUID"]
        found: dict[str, RemoteSeries] = {}
        try:
            for study in self.studies or [None]:
                items = self.client.search_for_series(
                    study_instance_uid=study, search_filters=filters, fields=fields, get_remaining=True
                )
                for item in items:
                    s = RemoteSeries(
                        _value(item, "0020000D") or study or "",
                        _value(item, "0020000E") or "",
                        (_value(item, "00080060") or "").upper() or None,
                        int(n) if (n := _value(item, "00201209")) and n.isdigit() else None,
                    )
                    if not s.series_uid or not s.study_uid:
                        continue
                    if s.modality == "SEG" or (self.modality and s.modality not in (None, self.modality)):
                        continue  # SEG objects and series the bundle does not take
                    found[s.id] = s
        except Exception as e:
            raise DicomwebError(f"{redact_url(self.url)}: QIDO-RS search failed: {_reason(e)}") from None
        return sorted(found.values(), key=lambda s: s.id)

    # -------------------------------------------------------------------------------- WADO-RS
    def fetch(self, series: RemoteSeries) -> str:
        """Bring ``series`` into the cache (only the instances not there yet); returns its folder.

        An empty cache takes the whole series in one WADO-RS response; a cache holding as many instances
        as QIDO-RS counts (NumberOfSeriesRelatedInstances) is taken as it is; otherwise (a retrieval cut
        short, a series changed in the PACS, no count) the instance list (QIDO-RS) decides what to fetch
        and what to drop."""
        folder = os.path.join(self.cache_dir, series.id)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if name.startswith("."):  # temporary files of writes a killed run left
                os.remove(os.path.join(folder, name))
        base = f"{redact_url(self.url).rstrip('/')}/studies/{series.study_uid}/series/{series.series_uid}"
        if not os.listdir(folder):
            self._retrieve(base, folder, None)
        if series.n_instances is not None and len(os.listdir(folder)) == series.n_instances:
            return folder
        listed = self.client.search_for_instances(
            series.study_uid, series.series_uid, fields=["SOPInstanceUID"], get_remaining=True
        )
        expected = {instance_file_name(u) for item in listed if (u := _value(item, "00080018"))}
        if not expected:
            raise RuntimeError("QIDO-RS lists no instances")
        have = set(os.listdir(folder))
        for name in have - expected:  # gone from the PACS since the last run
            os.remove(os.path.join(folder, name))
        missing = expected - have
        for item in listed:
            uid = _value(item, "00080018")
            if uid and instance_file_name(uid) in missing:
                self._retrieve(f"{base}/instances/{uid}", folder, expected)
        absent = expected - set(os.listdir(folder))
        if absent:
            raise RuntimeError(f"WADO-RS returned {len(expected) - len(absent)} of {len(expected)} instances")
        return folder

    def _retrieve(self, url: str, folder: str, expected: set[str] | None) -> None:
        """WADO-RS Retrieve Series / Instance (PS3.18 10.4.1): the Part 10 bytes of each instance written as
        they arrive, unparsed (only the SOPInstanceUID is read, to name the file)."""
        import io

        import pydicom

        accept = 'multipart/related; type="application/dicom"'
        with self.session.get(url, headers={"Accept": accept}, stream=True, timeout=self.timeout) as r:
            r.raise_for_status()
            for body in _parts(r):
                ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True, specific_tags=[_SOP_UID])
                name = instance_file_name(str(ds.SOPInstanceUID))
                if expected is None or name in expected:
                    _write_instance(os.path.join(folder, name), body)

    def cases(self, shard: tuple[int, int] | None = None) -> list[Case]:
        """Cases of every listed series; the series of this shard (``(i, n)``) are retrieved, in
        parallel; a series that cannot be retrieved is a case with the reason (a failed row)."""
        listed = self.list_series()
        placeholders = [self._case(s, None) for s in listed]
        mine = {c.id for c in select_shard(placeholders, shard)}
        by_id = {s.id: s for s in listed}

        def one(s: RemoteSeries) -> Case:
            try:
                return self._case(s, self.fetch(s))
            except Exception as e:
                return dataclasses.replace(
                    self._case(s, None), error=f"{self._label(s)}: WADO-RS retrieval failed: {_reason(e)}"
                )

        with ThreadPoolExecutor(self.workers, thread_name_prefix="medseg-wado") as pool:
            fetched = {c.id: c for c in pool.map(one, [by_id[i] for i in sorted(mine)])}
        return [fetched.get(c.id, c) for c in placeholders]

    def _label(self, s: RemoteSeries) -> str:
        return f"{redact_url(self.url).rstrip('/')}/studies/{s.study_uid}/series/{s.series_uid}"

    def _case(self, s: RemoteSeries, folder: str | None) -> Case:
        if folder is None:
            path = os.path.join(self.cache_dir, s.id)
            return Case(s.id, self._label(s), path, "dicom-series", (), s.series_uid)
        return series_case(folder, s.id, self._label(s), s.series_uid)


def _parts(response: Any, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Bodies of a ``multipart/related`` response (RFC 2387; PS3.18 8.7.3.1), streamed."""
    ctype = response.headers.get("Content-Type", "")
    boundary = next((v.strip().strip('"') for k, _, v in (p.strip().partition("=") for p in ctype.split(";"))
                     if k.lower() == "boundary"), None)  # fmt: skip
    if not ctype.lower().startswith("multipart/related") or not boundary:
        raise RuntimeError(f"WADO-RS answered {ctype or 'without a Content-Type'}, not multipart/related")
    delimiter = b"\r\n--" + boundary.encode()
    buf = bytearray(b"\r\n")  # the first delimiter may open the body without a preceding CRLF
    start = 0
    for chunk in response.iter_content(chunk_size):
        buf += chunk
        while True:
            i = buf.find(delimiter, start)
            if i < 0:
                start = max(0, len(buf) - len(delimiter) + 1)
                break
            part = bytes(buf[:i])
            del buf[: i + len(delimiter)]
            start = 0
            head_end = part.find(b"\r\n\r\n")
            if head_end >= 0:  # not the preamble before the first delimiter
                yield part[head_end + 4 :]


def _write_instance(path: str, data: bytes) -> None:
    """Write a retrieved instance (a Part 10 file, PS3.10 7) atomically, byte for byte."""
    with atomic_target(path, ".dcm") as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def _reason(e: BaseException) -> str:
    """One line for an HTTP / connection error."""
    import requests

    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code} {e.response.reason}"
    if isinstance(e, requests.ConnectionError):
        return "cannot connect (service down or unreachable)"
    if isinstance(e, requests.Timeout):
        return "no answer (timed out)"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# -------------------------------------------------------------------------------------- STOW-RS
class StowStore:
    """Store DICOM files with STOW-RS (PS3.18 10.5) at ``url`` (the service root)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url
        self.destination = redact_url(url).rstrip("/")
        self.timeout = timeout
        self._local = threading.local()

    def store(self, path: str) -> None:
        import pydicom

        ds = pydicom.dcmread(path)
        uid = str(ds.SOPInstanceUID)
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = make_client(self.url, self.timeout)
        try:
            response = client.store_instances([ds])
        except Exception as e:
            import requests

            err = StoreError(f"STOW-RS to {self.destination}: {_reason(e)}")
            err.unreachable = isinstance(e, (requests.ConnectionError, requests.Timeout))  # type: ignore[attr-defined]
            raise err from None
        failures = list(response.get("FailedSOPSequence", []))
        failed = [str(getattr(i, "ReferencedSOPInstanceUID", "")) for i in failures]
        stored = response.get("ReferencedSOPSequence", [])
        ok = [str(getattr(i, "ReferencedSOPInstanceUID", "")) for i in stored]
        if uid in failed or uid not in ok:
            reasons = [str(getattr(i, "FailureReason", "")) for i in failures]
            raise StoreError(
                f"STOW-RS to {self.destination}: the service did not accept the instance"
                + (f" (failure reason {', '.join(reasons)})" if any(reasons) else "")
            )


def remote_cases(
    url: str,
    output_dir: str,
    bundle_dir: str,
    studies: Sequence[str] = (),
    query: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
) -> list[Case]:
    """``medseg predict --input http(s)://...``: the cases of the service's series that the bundle takes
    (its metadata's modality), this shard's retrieved into the cache. Raises
    :class:`~medseg.predict.errors.SetupError` when the service cannot be queried or the query is
    malformed."""
    from medseg.bundle import read_metadata
    from medseg.predict.errors import SetupError
    from medseg.predict.pacs import bundle_modality

    try:
        source = DicomwebSource(url, output_dir, modality=bundle_modality(read_metadata(bundle_dir)),
                                studies=studies, query=parse_query(query))  # fmt: skip
        return source.cases(shard)
    except (DicomwebError, ValueError) as e:
        raise SetupError(str(e)) from None
