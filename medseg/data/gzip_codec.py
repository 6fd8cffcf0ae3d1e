"""gzip with Intel ISA-L (``isal``) when installed, the standard library otherwise: whole-buffer deflate,
streamed reading, and a streamed writer of members deflated on threads.

``.nii.gz`` reading and writing is mostly (de)compression: for a 192x192x80 CT, inflating takes
26 ms with zlib and 13 ms with ISA-L; deflating a mask at level 1, 24 ms and 6 ms. Both produce and
accept ordinary gzip streams (RFC 1952), so files stay readable by every tool.
"""

from __future__ import annotations

import gzip
import io
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

try:  # optional accelerator (a dependency of medseg; absent on platforms without wheels)
    from isal import igzip as _igzip
    from isal import igzip_threaded as _igzip_threaded
except ImportError:  # pragma: no cover - the tests reach the fallback by setting _igzip = None
    _igzip = _igzip_threaded = None

__all__ = ["HAS_ISAL", "GzipMemberWriter", "gzip_compress", "gzip_open"]

HAS_ISAL = _igzip is not None


def gzip_open(path: str | os.PathLike[str]) -> BinaryIO:
    """A gzip file opened for streamed reading (``readinto`` straight into the caller's buffer; members
    concatenated). With ISA-L the file is read and inflated on a second thread, overlapped with the
    caller's copying."""
    if _igzip is not None and _igzip_threaded is not None:
        return _igzip_threaded.open(path, "rb", threads=1)  # type: ignore[no-any-return]
    return gzip.open(path, "rb")  # type: ignore[return-value]


def gzip_compress(data: bytes | memoryview, level: int = 1) -> bytes:
    """gzip stream of ``data`` (``level`` 0-9; ISA-L caps it at its highest level, 3)."""
    if _igzip is not None:
        return _igzip.compress(data, min(max(level, 0), 3))
    return gzip.compress(data, compresslevel=level)


class GzipMemberWriter(io.RawIOBase):
    """Write-only stream that gzips what it is given into ``fileobj`` as independent members of ``chunk``
    bytes, compressed on ``threads`` threads (ISA-L and zlib release the GIL) and written in order. A
    multi-member file is one valid gzip file (RFC 1952, 2.2): every reader inflates it whole. ``seek`` only
    goes to the current position (writers then pad forward with zeros, as for any gzip stream). Closing
    writes the rest; leaving a ``with`` block on an error drops what is pending."""

    def __init__(
        self, fileobj: BinaryIO, level: int = 1, chunk: int = 1 << 24, threads: int | None = None
    ) -> None:
        super().__init__()
        self._out, self._level, self._chunk = fileobj, level, int(chunk)
        self._threads = max(1, threads if threads is not None else min(4, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None  # started with the first whole chunk
        self._pending: deque[Future[bytes] | bytes] = deque()
        self._parts: list[memoryview] = []  # written, not yet submitted: at most about one chunk
        self._held = 0
        self._pos = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset}.get(whence)
        if target != self._pos:
            raise OSError("a gzip stream being written only seeks to its current position")
        return self._pos

    def write(self, b: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed GzipMemberWriter")
        view = memoryview(b).cast("B")
        n = len(view)
        self._pos += n
        if not isinstance(b, bytes):  # a buffer the caller may reuse: keep a copy (bytes are kept as is)
            view = memoryview(bytes(view))
        while len(view) >= self._chunk and not self._parts:  # whole chunks of a large write: no copy
            self._submit(view[: self._chunk])
            view = view[self._chunk :]
        if len(view):
            self._parts.append(view)
            self._held += len(view)
        if self._held >= self._chunk:
            self._flush_parts()
        return n

    def _flush_parts(self) -> None:
        self._submit(b"".join(self._parts) if len(self._parts) > 1 else self._parts[0])
        self._parts, self._held = [], 0

    def _submit(self, data: bytes | memoryview) -> None:
        if self._pool is None and self._threads > 1 and len(data) >= self._chunk:
            self._pool = ThreadPoolExecutor(self._threads)
        if self._pool is None:
            self._pending.append(gzip_compress(data, self._level))
        else:
            self._pending.append(self._pool.submit(gzip_compress, data, self._level))
        while len(self._pending) > 2 * self._threads:  # bounded: at most a few chunks in flight
            self._drain_one()

    def _drain_one(self) -> None:
        item = self._pending.popleft()
        self._out.write(item if isinstance(item, bytes) else item.result())

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._parts:
                self._flush_parts()
            elif self._pos == 0:
                self._submit(b"")
            while self._pending:
                self._drain_one()
        finally:
            self._shutdown()
            super().close()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __exit__(self, exc_type: Any, *args: Any) -> None:
        if exc_type is not None:  # drop what is pending: the caller discards the partial file
            self._pending.clear()
            self._parts, self._held = [], 0
            self._shutdown()
            super().close()
            return
        self.close()
