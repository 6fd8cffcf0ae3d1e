"""The process's heap policy for large tensors: keep freed memory for the next forward pass.

glibc's ``malloc`` serves every request over its mmap threshold (at most 32 MiB on 64-bit Linux,
``mallopt(3)``) with a fresh ``mmap`` and unmaps it again on ``free``. PyTorch's CPU allocator keeps no
cache of its own (its CPU performance tuning guide suggests jemalloc or tcmalloc instead), so a forward
pass over a large image, whose activation maps take tens to hundreds of MiB each, has the kernel fault in
and zero-fill every page of them again on each call. :func:`retain_freed_memory` sets ``M_MMAP_MAX`` to 0
(the main heap serves large blocks too) and a high ``M_TRIM_THRESHOLD`` (freed memory stays in the
process), so the next pass reuses the same pages. The price: memory the process once used stays with it
until the policy is lifted, which suits a prediction run (the next case needs the same peak again).
``retain_freed_memory(False)`` lifts it: it returns what is free to the system and puts back the
process's own policy, the values its environment gave glibc (``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_`` or their ``GLIBC_TUNABLES`` names; ``mallopt(3)``, ``tunables(7)``), else
glibc's defaults. glibc's mmap threshold stops adapting once ``mallopt`` has set either parameter: it
keeps the value it had reached.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from functools import lru_cache

__all__ = ["retain_freed_memory"]

# mallopt(3) parameters, glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_RETAINED_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
# the environment's names for the two parameters: the variable, then its tunable in GLIBC_TUNABLES
_ENVIRONMENT = {
    _M_MMAP_MAX: ("MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max"),
    _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
}


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def retain_freed_memory(enable: bool = True) -> bool:
    """Keep freed memory in the process for the next allocation (``enable``), or restore the process's
    policy (its environment's, else glibc's default) and return what is free to the system (``enable=False``).

    Process-wide. Returns whether the policy could be set: ``False`` where the C library is not glibc
    (macOS, Windows, musl), which changes nothing.
    """
    libc = _glibc()
    if libc is None:
        return False
    if enable:
        mmap_max, trim = 0, _RETAINED_TRIM_THRESHOLD
    else:
        mmap_max = _environment_value(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        trim = _environment_value(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    ok = bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) & bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
    if not enable:
        libc.malloc_trim(0)
    return ok


def _environment_value(param: int, default: int) -> int:
    """The value the environment gave glibc for ``param`` (its ``GLIBC_TUNABLES`` entry taken over the
    older variable where both are set), else ``default``."""
    variable, tunable = _ENVIRONMENT[param]
    value = os.environ.get(variable)
    for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, setting = item.partition("=")
        if name == tunable:
            value = setting
    try:
        parsed = int(value, 0) if value else default
    except ValueError:
        return default
    return parsed if 0 <= parsed <= 2**31 - 1 else default
