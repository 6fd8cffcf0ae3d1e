"""Deterministic case discovery for batch prediction: what is a case, its stable id, its fingerprint.

A *case* is one image to segment: a DICOM series (the DICOM files of one folder that share a
SeriesInstanceUID, as PACS exports nest them: ``patient/study/series/*.dcm``), a single DICOM file, a
NIfTI / ``.mat`` / other image file, or an entry of a list file. Discovery walks the input in sorted
order and never depends on file-system listing order, so the same input gives the same cases, in the
same order, with the same ids, on every machine (what ``--shard`` and resuming rely on).

Case ids come from the path relative to the input root, sanitised to ``[A-Za-z0-9_-]`` with ``__``
for a folder separator; DICOM tags are read only to split series and never enter an id or a file
name (no patient data in output names).

Things that cannot be a case still become cases, so that they show up as *failed* rows rather than
disappear: an empty folder, a file of unknown type (a stray text file), a DICOM file whose header is
unreadable, a FIFO / socket / device (never opened: reading one blocks). Hidden files, ``DICOMDIR`` and
documentation / sidecar files (``.json``, ``.md``, ...) are ignored. What is an image and what is DICOM
is decided by the one format table, :mod:`medseg.data.formats`. Each DICOM file's header is scanned
once, here; the scan travels with the case to the reader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medseg.data.formats import (
    IGNORED_SUFFIXES,
    LIST_SUFFIXES,
    format_of,
    is_ignored,
    path_kind,
    suffix_of,
)
from medseg.data.formats import (
    strip_suffix as strip_image_suffix,
)

__all__ = [
    "Case",
    "IGNORED_SUFFIXES",
    "LIST_SUFFIXES",
    "case_id",
    "discover_cases",
    "fingerprint",
    "parse_shard",
    "select_shard",
    "shard_from_env",
]

_ID_MAX = 120


@dataclass(frozen=True)
class Case:
    """One unit of work.

    Attributes:
        id: stable, sanitised id (output file names start with it).
        input: what the row's ``input`` column shows: the file or folder, relative to the input root
            when it lies inside it.
        path: absolute path handed to the loader (file or series folder).
        kind: ``"dicom-series"``, ``"dicom-file"``, ``"image"``, ``"empty"`` or ``"unknown"``.
        files: absolute paths of the files the case is made of (what the fingerprint covers).
        series_uid: SeriesInstanceUID of a series case (to pick it from a folder with several).
        error: set by discovery when the case is known to be unusable (the row will say why).
        headers: the DICOM header scans of the case's files (:func:`medseg.data.dicom.headers.scan_file`),
            handed to the reader so that no header is read twice.
    """

    id: str
    input: str
    path: str
    kind: str
    files: tuple[str, ...] = ()
    series_uid: str | None = None
    error: str | None = None
    headers: tuple[Any, ...] = field(default=(), compare=False, hash=False, repr=False)

    @property
    def is_dicom(self) -> bool:
        return self.kind in ("dicom-series", "dicom-file")


# ----------------------------------------------------------------------------------------------- ids
def case_id(relative: str, strip_suffix: bool = True) -> str:
    """Sanitised id of a relative path: ``a/b c/x.nii.gz`` -> ``a__b-c__x`` (at most 120 characters)."""
    parts = [p for p in re.split(r"[\\/]+", relative) if p not in ("", ".")]
    if parts and strip_suffix:
        parts[-1] = strip_image_suffix(parts[-1])
    parts = [re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9_-]", "-", p)).strip("-") or "x" for p in parts]
    out = "__".join(parts) or "input"
    if len(out) > _ID_MAX:
        digest = hashlib.sha256(relative.encode()).hexdigest()[:10]
        out = f"{out[: _ID_MAX - 11]}-{digest}"
    return out


def _unique_ids(cases: list[Case]) -> list[Case]:
    """Disambiguate colliding ids (``a.nii`` and ``a.nii.gz``) with a hash of the relative input."""
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.id] = counts.get(c.id, 0) + 1
    out = []
    for c in cases:
        if counts[c.id] > 1:
            digest = hashlib.sha256(c.input.encode()).hexdigest()[:8]
            c = dataclasses.replace(c, id=f"{c.id[: _ID_MAX - 9]}-{digest}")
        out.append(c)
    return out


# ----------------------------------------------------------------------------------------- sniffing
def _is_dicom_file(path: str) -> bool:
    fmt = format_of(path)
    return fmt is not None and fmt.name == "dicom"


def _scan(path: str) -> tuple[str | None, list[Any], str | None]:
    """(SeriesInstanceUID, header scan, None) or (None, [], reason): the file's one header read."""
    from medseg.data.dicom.headers import scan_file

    slices, reason = scan_file(path)
    if reason is not None or not slices:
        return None, [], reason or "DICOM object without an image"
    uid = slices[0].series_uid
    if not uid:
        return None, [], "not a DICOM image (no SeriesInstanceUID)"
    return str(uid), slices, None


# ---------------------------------------------------------------------------------------- discovery
def _rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    if rel.startswith(".."):
        rel = os.path.abspath(path).lstrip("/\\")
    return rel.replace(os.sep, "/")


def _file_case(path: str, root: str) -> Case:
    rel = _rel(path, root)
    suffix = suffix_of(path)
    if path_kind(path) == "special":
        return Case(case_id(rel), rel, path, "unknown", (),
                    error=f"{rel}: not a regular file (a FIFO, socket or device); not read")  # fmt: skip
    if _is_dicom_file(path):
        uid, headers, reason = _scan(path)
        return Case(case_id(rel), rel, path, "dicom-file", (path,), uid, reason and f"{rel}: {reason}",
                    tuple(headers))  # fmt: skip
    if format_of(path, sniff=False) is not None:
        return Case(case_id(rel), rel, path, "image", (path,))
    return Case(
        case_id(rel, strip_suffix=False), rel, path, "unknown", (path,),
        error=f"{rel}: not a supported image file (suffix {suffix or 'none'!r}, no DICOM preamble)",
    )  # fmt: skip


def _folder_cases(folder: str, dicom_files: list[str], root: str) -> list[Case]:
    """Cases of the DICOM files directly inside ``folder``: one per series, unreadable files apart."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 2)) as pool:
        scans = list(pool.map(_scan, dicom_files))
    by_series: dict[str, list[str]] = {}
    headers: dict[str, list[Any]] = {}
    cases: list[Case] = []
    for f, (uid, slices, reason) in zip(dicom_files, scans, strict=True):
        if uid is None:
            rel = _rel(f, root)
            cases.append(Case(case_id(rel), rel, f, "dicom-file", (f,), error=f"{rel}: {reason}"))
        else:
            by_series.setdefault(uid, []).append(f)
            headers.setdefault(uid, []).extend(slices)
    rel_folder = _rel(folder, root)
    groups = sorted(by_series.items(), key=lambda kv: kv[1][0])  # by first file name, not by UID
    for uid, files in groups:
        scanned = tuple(headers[uid])
        if len(files) == 1:
            rel = _rel(files[0], root)
            cases.append(Case(case_id(rel), rel, files[0], "dicom-file", (files[0],), uid, headers=scanned))
        elif len(groups) == 1:
            cases.append(Case(case_id(rel_folder), rel_folder, folder, "dicom-series", tuple(files), uid,
                              headers=scanned))  # fmt: skip
        else:  # several series in one folder: name each after its first file (stable, tag-free)
            first = strip_image_suffix(os.path.basename(files[0]))
            cases.append(Case(case_id(f"{rel_folder}/{first}"), rel_folder, folder, "dicom-series",
                              tuple(files), uid, headers=scanned))  # fmt: skip
    return cases


def _walk(root: str, exclude: Sequence[str]) -> list[Case]:
    cases: list[Case] = []
    excluded = {os.path.realpath(e) for e in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in excluded
        )
        names = sorted(n for n in filenames if not is_ignored(n))
        if not dirnames and not filenames and dirpath != root:
            rel = _rel(dirpath, root)
            cases.append(
                Case(case_id(rel), rel, dirpath, "empty", (), error=f"{rel}: empty folder (no files)")
            )
            continue
        paths = [os.path.join(dirpath, n) for n in names]
        dicom = [p for p in paths if path_kind(p) == "file" and _is_dicom_file(p)]
        others = [p for p in paths if p not in set(dicom)]
        if dicom:
            cases.extend(_folder_cases(dirpath, dicom, root))
        cases.extend(_file_case(p, root) for p in others)
    return cases


def _read_list(list_file: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(list_file))
    entries = []
    with open(list_file, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(line if os.path.isabs(line) else os.path.join(base, line))
    return entries


def _entry_cases(path: str, root: str) -> list[Case]:
    """Cases of one explicit entry (list file line / datalist item): a file, or a folder as one case."""
    path = os.path.abspath(path)
    rel = _rel(path, root)
    kind = path_kind(path)
    if kind == "missing":
        return [Case(case_id(rel), rel, path, "unknown", (), error=f"{rel}: no such file or folder")]
    if kind != "folder":
        return [_file_case(path, root)]
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names if not is_ignored(n))
    if not files:
        return [Case(case_id(rel), rel, path, "empty", (), error=f"{rel}: empty folder (no files)")]
    direct = sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    dicom = [f for f in direct if not is_ignored(os.path.basename(f)) and _is_dicom_file(f)]
    if dicom:
        return _folder_cases(path, dicom, root)
    return [Case(case_id(rel), rel, path, "dicom-series", tuple(files))]  # let the reader decide


def discover_cases(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | dict],
    exclude: Sequence[str | os.PathLike[str]] = (),
) -> list[Case]:
    """Cases of ``source``, sorted by id.

    Args:
        source: a folder (walked recursively), a single image file / DICOM file, a list file
            (``.txt``/``.lst``/``.list``: one path per line, relative to the list file), or a sequence of
            paths or datalist items (``{"image": path}``) whose ids are relative to their common folder.
        exclude: folders not to walk into (the output folder when it lies inside the input).
    """
    excl = [os.fspath(e) for e in exclude]
    if isinstance(source, (str, os.PathLike)):
        src = os.path.abspath(os.fspath(source))
        if os.path.isdir(src):
            cases = _walk(src, excl)
        elif os.path.isfile(src) and suffix_of(src) in LIST_SUFFIXES:
            entries = _read_list(src)
            root = os.path.dirname(src)
            cases = [c for e in entries for c in _entry_cases(e, root)]
        elif os.path.exists(src):
            cases = [_file_case(src, os.path.dirname(src))]
        else:
            raise FileNotFoundError(f"{src}: no such file or folder")
    else:
        paths = [os.path.abspath(os.fspath(s["image"] if isinstance(s, dict) else s)) for s in source]
        if not paths:
            return []
        root = os.path.commonpath([os.path.dirname(p) if os.path.isfile(p) else p for p in paths])
        cases = [c for p in paths for c in _entry_cases(p, root)]
    # drop exact duplicates (a list naming the same file twice), keep the first
    seen: set[tuple[str, str | None]] = set()
    unique = []
    for c in cases:
        key = (c.path, c.series_uid)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return sorted(_unique_ids(unique), key=lambda c: c.id)


# ---------------------------------------------------------------------------------------- fingerprint
def fingerprint(case: Case) -> str:
    """sha256 over the case's files: (path relative to the case, size, mtime in ns), sorted.

    Cheap even for thousands of DICOM slices (no pixel data is read); any edit, replacement, added or
    removed slice changes it.
    """
    h = hashlib.sha256()
    h.update(case.kind.encode())
    h.update((case.series_uid or "").encode())
    base = case.path if os.path.isdir(case.path) else os.path.dirname(case.path)
    for f in sorted(case.files):
        try:
            st = os.stat(f)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{os.path.relpath(f, base)}\0{stamp}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- shards
def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_from_env() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` under ``torchrun`` (WORLD_SIZE > 1), else ``None``."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return (rank, world) if world > 1 and 0 <= rank < world else None


def select_shard(cases: Iterable[Case], shard: tuple[int, int] | None) -> list[Case]:
    """Every ``n``-th case starting at ``i`` of the id-sorted list: disjoint shards that cover all cases."""
    ordered = sorted(cases, key=lambda c: c.id)
    if shard is None:
        return ordered
    i, n = shard
    return ordered[i::n]
