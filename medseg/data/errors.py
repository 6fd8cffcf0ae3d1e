"""The one error type for input medseg cannot read."""

from __future__ import annotations

import os


class ReadError(ValueError):
    """Unreadable or unsuitable input; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
