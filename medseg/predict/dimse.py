"""DIMSE C-STORE (PS3.4 Annex B, PS3.7 9.1.1) as a sink of batch prediction, with ``pynetdicom``.

``dimse://AET@host:port`` names the peer: its AE title and the host and port of its DICOM service.
:class:`CStoreStore` opens one association per object (PS3.8 7.1: A-ASSOCIATE, then the C-STORE, then
A-RELEASE), proposing the object's SOP class with its own transfer syntax and the two uncompressed ones
(PS3.5 10.1, A.2). Success is status 0x0000 or a warning 0xB000 / 0xB006 / 0xB007 (PS3.4 B.2.3); every
other status, a rejected or aborted association, and a peer that does not answer are failures with a
message naming the peer and the cause.
"""

from __future__ import annotations

import re
import socket

from medseg.predict.pacs import StoreError

__all__ = ["CStoreStore", "parse_dimse_url"]

_URL = re.compile(r"^dimse://(?P<aet>[^@/]{1,16})@(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d{1,5})/?$", re.I)
#: C-STORE statuses that mean stored (PS3.4 B.2.3): success, coercion of data elements, elements discarded,
#: data set does not match the SOP class
STORED = (0x0000, 0xB000, 0xB006, 0xB007)


def parse_dimse_url(url: str) -> tuple[str, str, int]:
    """``dimse://AET@host:port`` -> ``(AET, host, port)``; raises ``ValueError`` otherwise."""
    m = _URL.match(url.strip())
    if not m or not 0 < int(m.group("port")) < 65536:
        raise ValueError(f"{url!r}: expected dimse://AET@host:port (AE title of at most 16 characters)")
    return m.group("aet"), m.group("host").strip("[]"), int(m.group("port"))


class CStoreStore:
    """Store DICOM files on a peer with C-STORE (see the module docstring).

    Args:
        url: ``dimse://AET@host:port``.
        ae_title: the calling AE title (ours).
        timeout: seconds for the connection, the association and each DIMSE message.
    """

    def __init__(self, url: str, ae_title: str = "MEDSEG", timeout: float = 30.0) -> None:
        self.called, self.host, self.port = parse_dimse_url(url)
        self.ae_title = ae_title
        self.timeout = timeout
        self.destination = f"dimse://{self.called}@{self.host}:{self.port}"

    def store(self, path: str) -> None:
        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ds = pydicom.dcmread(path)
        syntax = ds.file_meta.TransferSyntaxUID
        ae = AE(ae_title=self.ae_title)
        ae.connection_timeout = self.timeout
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(ds.SOPClassUID, list(dict.fromkeys([syntax, ExplicitVRLittleEndian,
                                                                      ImplicitVRLittleEndian])))  # fmt: skip
        peer = f"{self.called}@{self.host}:{self.port}"
        try:  # pynetdicom reports a refused connection as an aborted association: tell them apart
            socket.create_connection((self.host, self.port), timeout=self.timeout).close()
        except OSError as e:
            err = StoreError(f"C-STORE to {peer}: no DICOM service answers ({e.strerror or e})")
            err.unreachable = True  # type: ignore[attr-defined]
            raise err from None
        assoc = ae.associate(self.host, self.port, ae_title=self.called)
        if not assoc.is_established:
            if assoc.is_rejected:
                err = StoreError(f"C-STORE to {peer}: the peer rejected the association (called AE title "
                                 f"{self.called}, calling AE title {self.ae_title})")  # fmt: skip
            elif assoc.is_aborted:
                err = StoreError(f"C-STORE to {peer}: the peer aborted the association")
            else:
                err = StoreError(f"C-STORE to {peer}: no DICOM service answers (down or unreachable)")
                err.unreachable = True  # type: ignore[attr-defined]
            ae.shutdown()
            raise err
        try:
            status = assoc.send_c_store(ds)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        code = getattr(status, "Status", None)
        if code is None:
            raise StoreError(f"C-STORE to {peer}: no response (connection lost or timed out)")
        if int(code) not in STORED:
            comment = str(getattr(status, "ErrorComment", "") or "")
            detail = f" ({comment})" if comment else ""
            raise StoreError(f"C-STORE to {peer}: refused with status 0x{int(code):04X}{detail}")
