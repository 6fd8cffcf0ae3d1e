"""Whole-buffer gzip with Intel ISA-L (``isal``) when installed, the standard library otherwise.

``.nii.gz`` reading and writing is mostly (de)compression: for a 192x192x80 CT, inflating takes
26 ms with zlib and 13 ms with ISA-L; deflating a mask at level 1, 24 ms and 6 ms. Both produce and
accept ordinary gzip streams (RFC 1952), so files stay readable by every tool.
"""

from __future__ import annotations

import gzip

try:  # optional accelerator (a dependency of medseg; absent on platforms without wheels)
    from isal import igzip as _igzip
except ImportError:  # pragma: no cover - the tests reach the fallback by setting _igzip = None
    _igzip = None

__all__ = ["HAS_ISAL", "gzip_compress", "gzip_decompress"]

HAS_ISAL = _igzip is not None


def gzip_decompress(data: bytes) -> bytes:
    """Decompress a (possibly multi-member) gzip stream; raises ``EOFError`` / ``OSError`` on bad data."""
    return _igzip.decompress(data) if _igzip is not None else gzip.decompress(data)


def gzip_compress(data: bytes, level: int = 1) -> bytes:
    """gzip stream of ``data`` (``level`` 0-9; ISA-L caps it at its highest level, 3)."""
    if _igzip is not None:
        return _igzip.compress(data, min(max(level, 0), 3))
    return gzip.compress(data, compresslevel=level)
