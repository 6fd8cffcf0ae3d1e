"""Resume state: a *done marker* per finished case, and removal of leftovers of a killed run.

A case is finished when ``OUT/.medseg/<id>.json`` exists, records the same input fingerprint, the
same model key (checkpoint hash + bundle config + output options) and every output it lists still
exists. The marker is written (atomically) only after all the case's outputs were renamed into
place, so a run killed at any instant leaves either a finished case or one that the next run redoes.
Writers use temporary names ``.<output name>.<random>.tmp<suffix>`` next to the target
(:func:`medseg.io.atomic_target`); :func:`clean_case` deletes those a killed run left.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from medseg.io import atomic_target

__all__ = ["STATE_DIR", "OUTPUT_SUFFIXES", "clean_case", "is_done", "mark_done", "output_paths", "unmark"]

STATE_DIR = ".medseg"
#: output kind -> file name suffix after the case id
OUTPUT_SUFFIXES = {
    "nifti": "_seg.nii.gz",
    "instances": "_instances.nii.gz",
    "dicom-seg": "_seg.dcm",
    "overlay": "_overlay.png",
}


def output_paths(output_dir: str, case_id: str) -> dict[str, str]:
    """Output kind -> absolute path for one case."""
    return {k: os.path.join(output_dir, case_id + s) for k, s in OUTPUT_SUFFIXES.items()}


def _marker(output_dir: str, case_id: str) -> str:
    return os.path.join(output_dir, STATE_DIR, f"{case_id}.json")


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(r"^\." + re.escape(name) + r"\..*\.tmp")


def clean_case(output_dir: str, case_id: str) -> None:
    """Delete temporary files a killed run left for this case."""
    names = [os.path.basename(p) for p in output_paths(output_dir, case_id).values()]
    patterns = [_temp_pattern(n) for n in names]
    for folder, own in ((output_dir, names), (os.path.join(output_dir, STATE_DIR), [f"{case_id}.json"])):
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            continue
        pats = patterns if folder == output_dir else [_temp_pattern(own[0])]
        for e in entries:
            if any(p.match(e) for p in pats):
                try:
                    os.remove(os.path.join(folder, e))
                except FileNotFoundError:
                    pass


def is_done(output_dir: str, case_id: str, fingerprint: str, model_key: str) -> dict[str, Any] | None:
    """The marker's content when the case is finished for this input and model, else ``None``."""
    try:
        with open(_marker(output_dir, case_id), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    if marker.get("fingerprint") != fingerprint or marker.get("model_key") != model_key:
        return None
    outputs = marker.get("row", {}).get("outputs", [])
    if not all(os.path.isfile(os.path.join(output_dir, o)) for o in outputs):
        return None
    return marker


def mark_done(output_dir: str, case_id: str, fingerprint: str, model_key: str, row: dict[str, Any]) -> None:
    """Record the case as finished (atomic; call after every output is in place)."""
    path = _marker(output_dir, case_id)
    with atomic_target(path, ".json") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"fingerprint": fingerprint, "model_key": model_key, "row": row}, fh, indent=1)


def unmark(output_dir: str, case_id: str, outputs: Sequence[str] = ()) -> None:
    """Forget a case: remove its marker first, then the given outputs (a redo or a failure)."""
    try:
        os.remove(_marker(output_dir, case_id))
    except FileNotFoundError:
        pass
    for o in outputs:
        try:
            os.remove(o)
        except FileNotFoundError:
            pass
