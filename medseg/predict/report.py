"""The batch-prediction report: one row per case, ``report.json`` + ``report.csv``, shard merging.

Row fields: ``id``, ``input``, ``status`` (``ok`` / ``failed`` / ``skipped``: done by an earlier run on the
same input with the same model), ``error``, ``seconds`` (load + inference + writing of that case) and
the stage times, the written ``outputs`` (relative to the output folder), ``objects`` (the number of
instances, for bundles whose post-processing labels instances), and per label the voxel
count and the volume in mL (voxel count x voxel volume of the **source** grid; ``None`` for 2-D
images, which have no volume).

Exit status of ``medseg predict`` (see :data:`EXIT_CODES`): 0 every case ok or skipped, 1 at least
one case failed, 2 the run could not start (bad arguments, bundle or checkpoint unreadable, no cases),
3 ``--merge-reports`` found shard reports missing.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medseg.io import atomic_target

__all__ = [
    "EXIT_CODES",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_SETUP",
    "EXIT_SHARDS_MISSING",
    "CaseResult",
    "exit_code",
    "label_stats",
    "merge_reports",
    "read_report",
    "report_paths",
    "write_report",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SETUP = 2
EXIT_SHARDS_MISSING = 3
EXIT_CODES = {
    EXIT_OK: "every case ok (or skipped: already done)",
    EXIT_FAILED: "at least one case failed (see the report's error column)",
    EXIT_SETUP: "the run could not start: bad arguments, unreadable bundle/checkpoint, no cases",
    EXIT_SHARDS_MISSING: "--merge-reports: some shard reports are missing",
}


@dataclass
class CaseResult:
    """One report row."""

    id: str
    input: str
    status: str  # ok | failed | skipped
    error: str = ""
    seconds: float = 0.0
    load_s: float = 0.0
    infer_s: float = 0.0
    write_s: float = 0.0
    outputs: list[str] = field(default_factory=list)
    voxels: dict[str, int] = field(default_factory=dict)
    volume_ml: dict[str, float | None] = field(default_factory=dict)
    objects: int | None = None  # instances found (bundles whose post-processing labels instances)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CaseResult:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def label_stats(
    mask: np.ndarray, affine: np.ndarray, names: Mapping[int, str] | None = None
) -> tuple[dict[str, int], dict[str, float | None]]:
    """Voxel count and volume (mL) per non-zero label of a source-grid label map.

    ``names`` (label -> name, e.g. the bundle's ``channel_def``) fixes the labels reported, so that
    absent labels show 0; labels found but not named are reported as ``label_<k>``.
    """
    arr = np.asarray(mask)
    if arr.dtype.kind == "u" and arr.itemsize <= 2:  # the label maps the engine writes: no sort
        top = int(arr.max()) if arr.size else 0
        if top <= 32:  # a few labels: cheap counts per label (bincount first widens to int64)
            found = _count_few_labels(arr, top)
        else:
            counts = np.bincount(arr.ravel())
            found = {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v != 0}
    else:
        values, counts = np.unique(arr, return_counts=True)
        found = {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}
    table = {int(k): str(v) for k, v in (names or {}).items() if int(k) != 0}
    for k in found:
        table.setdefault(k, f"label_{k}")
    nd = mask.ndim
    voxel_ml: float | None = None
    if nd == 3:
        voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    voxels = {table[k]: found.get(k, 0) for k in sorted(table)}
    volume = {name: (None if voxel_ml is None else round(n * voxel_ml, 4)) for name, n in voxels.items()}
    return voxels, volume


def _count_few_labels(arr: np.ndarray, top: int, block: int = 1 << 22) -> dict[int, int]:
    """Non-zero voxel counts of labels ``1..top`` (blocks of the array in memory order: a small reused
    temporary instead of a whole-volume comparison per label)."""
    flat = arr.ravel(order="K")  # a view for the contiguous label maps the sinks write
    if top == 1:
        n = int(np.count_nonzero(flat))
        return {1: n} if n else {}
    counts = np.zeros(top + 1, dtype=np.int64)
    tmp = np.empty(min(block, flat.size), dtype=bool)
    for i in range(0, flat.size, block):
        chunk = flat[i : i + block]
        eq = tmp[: chunk.size]
        for k in range(1, top + 1):
            counts[k] += np.count_nonzero(np.equal(chunk, k, out=eq))
    return {k: int(counts[k]) for k in range(1, top + 1) if counts[k]}


def exit_code(rows: Iterable[CaseResult]) -> int:
    """0 when no row failed, 1 otherwise."""
    return EXIT_FAILED if any(r.status == "failed" for r in rows) else EXIT_OK


def report_paths(output_dir: str, shard: tuple[int, int] | None = None) -> tuple[str, str]:
    """``report.json`` / ``report.csv``, or ``report.shard-i-of-n.*`` for one shard."""
    stem = "report" if shard is None else f"report.shard-{shard[0]}-of-{shard[1]}"
    return os.path.join(output_dir, f"{stem}.json"), os.path.join(output_dir, f"{stem}.csv")


def _csv_text(rows: Sequence[CaseResult]) -> str:
    labels: list[str] = []
    for r in rows:
        for name in r.voxels:
            if name not in labels:
                labels.append(name)
    objects = any(r.objects is not None for r in rows)
    header = ["id", "input", "status", "error", "seconds", "load_s", "infer_s", "write_s", "outputs"]
    header += ["objects"] if objects else []
    header += [f"voxels_{n}" for n in labels] + [f"volume_ml_{n}" for n in labels]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(
            [r.id, r.input, r.status, r.error, f"{r.seconds:.3f}", f"{r.load_s:.3f}", f"{r.infer_s:.3f}",
             f"{r.write_s:.3f}", ";".join(r.outputs)]
            + ([("" if r.objects is None else r.objects)] if objects else [])
            + [r.voxels.get(n, "") for n in labels]
            + ["" if r.volume_ml.get(n) is None else r.volume_ml[n] for n in labels]
        )  # fmt: skip
    return buf.getvalue()


def write_report(
    rows: Sequence[CaseResult],
    output_dir: str,
    summary: Mapping[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
) -> tuple[str, str]:
    """Write the JSON and CSV reports atomically; rows sorted by id. Returns both paths."""
    rows = sorted(rows, key=lambda r: r.id)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "skipped")}
    doc = {
        "summary": {**(summary or {}), "cases": len(rows), **counts, "exit_code": exit_code(rows),
                    "shard": None if shard is None else list(shard)},
        "cases": [r.to_dict() for r in rows],
    }  # fmt: skip
    json_path, csv_path = report_paths(output_dir, shard)
    os.makedirs(output_dir, exist_ok=True)
    with atomic_target(json_path, ".json") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    with atomic_target(csv_path, ".csv") as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(_csv_text(rows))
    return json_path, csv_path


def read_report(path: str) -> tuple[dict[str, Any], list[CaseResult]]:
    """(summary, rows) of a ``report*.json``."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    return doc.get("summary", {}), [CaseResult.from_dict(d) for d in doc.get("cases", [])]


def merge_reports(output_dir: str) -> tuple[int, list[str]]:
    """Merge ``report.shard-i-of-n.json`` files into ``report.json`` / ``report.csv``.

    When reports of several splits are there (a run repeated with another ``--shard i/n``), the newest
    complete split is merged (newest: its latest report file), and the others are named in the problems.
    Returns ``(exit status, problems)``: :data:`EXIT_SHARDS_MISSING` when no split is complete (the newest
    one is merged for what there is), else the status of the merged rows.
    """
    found: dict[int, dict[int, str]] = {}
    for path in glob.glob(os.path.join(output_dir, "report.shard-*-of-*.json")):
        m = re.search(r"report\.shard-(\d+)-of-(\d+)\.json$", path)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    if not found:
        return EXIT_SHARDS_MISSING, [f"{output_dir}: no report.shard-*-of-*.json to merge"]

    def newest(k: int) -> float:
        return max(os.path.getmtime(f) for f in found[k].values())

    complete = [k for k in found if set(found[k]) == set(range(k))]
    n = max(complete or found, key=newest)
    problems = []
    if len(found) > 1:
        others = ", ".join(f"{k}-way" for k in sorted(found) if k != n)
        problems.append(
            f"shard reports of several splits; merging the newest {'complete ' if complete else ''}{n}-way "
            f"split, ignoring the {others} one(s)"
        )
    missing = sorted(set(range(n)) - set(found[n]))
    if missing:
        problems.append(f"missing shard reports: {', '.join(f'{i}/{n}' for i in missing)}")
    rows: dict[str, CaseResult] = {}
    summary: dict[str, Any] = {}
    for i in sorted(found[n]):
        s, shard_rows = read_report(found[n][i])
        summary = {
            k: v for k, v in s.items() if k in ("bundle", "model_sha256", "formats", "input")
        } or summary
        for r in shard_rows:
            if r.id in rows:
                problems.append(f"case {r.id} appears in several shards")
            rows[r.id] = r
    summary["merged_shards"] = f"{len(found[n])}/{n}"
    write_report(list(rows.values()), output_dir, summary)
    return (EXIT_SHARDS_MISSING if missing else exit_code(rows.values())), problems
