"""The two kinds of failure of a batch: the run cannot start (exit 2), or one case fails (a failed row)."""

from __future__ import annotations

import re

from medseg.data.errors import ReadError

__all__ = ["CaseError", "SetupError", "error_text"]

_WRAPPER = re.compile(r"applying transform <([\w.]+) object at 0x[0-9a-fA-F]+>")


class SetupError(RuntimeError):
    """The run cannot start (bundle, checkpoint, arguments or output folder unusable): exit status 2."""


class CaseError(RuntimeError):
    """A case-level failure whose message is already complete (names the input and the cause)."""


def error_text(stage: str, case_input: str, e: BaseException) -> str:
    """One line for the report naming the input and the cause.

    Complete messages (:class:`ReadError`, :class:`CaseError`) are kept as they are, also when MONAI's
    ``Compose`` wrapped them ("applying transform <... object at 0x...>"): the wrapper is replaced by the
    transform's name and the root cause's message. ``MemoryError`` (which has no message) says so.
    """
    transforms: list[str] = []
    cur: BaseException = e
    for _ in range(20):  # MONAI nests one wrapper per Compose level
        m = _WRAPPER.search(str(cur))
        if m is None or cur.__cause__ is None:
            break
        transforms.append(m.group(1).rsplit(".", 1)[-1])
        cur = cur.__cause__
    if isinstance(cur, (ReadError, CaseError)):
        return str(cur)[:1000]
    where = f" in {transforms[-1]}" if transforms else ""
    if isinstance(cur, MemoryError):
        msg = f"{case_input}: {stage} failed{where}: out of memory (the image is too large for this machine)"
    else:
        lines = [ln.strip() for ln in str(cur).splitlines() if ln.strip()]
        first = f": {lines[0]}" if lines else ""
        msg = f"{case_input}: {stage} failed{where}: {type(cur).__name__}{first}"
    return msg[:1000]
