"""Datalists for the bundles: which files a training, validation or test run reads from a ``dataset_dir``.

A dataset folder is read in this order of preference:

1. ``dataset_dir/datalist.json``: a Medical Segmentation Decathlon style datalist
   (``{"training": [{"image": ..., "label": ...}, ...], "validation": [...], "test": [...]}``), read with
   :func:`monai.data.load_decathlon_datalist`; relative paths are resolved against ``dataset_dir``.
   Extra keys (e.g. ``"pid"``) are kept. A missing ``validation`` list is split off ``training``.
2. ``imagesTr/`` + ``labelsTr/`` (+ optional ``imagesTs/``), the Decathlon / nnU-Net folder layout:
   every entry of ``imagesTr`` (a file, or a folder holding one DICOM series) is paired with the file in
   ``labelsTr`` of the same name stem (an nnU-Net channel suffix ``_0000`` is ignored). The validation
   list is split off deterministically.
3. A folder of figshare-format ``.mat`` files (one slice per file, struct ``cjdata``): each file is both
   image and label, and the patient id is read from ``cjdata/PID``.

Splits are grouped by ``group_key`` (default ``"pid"``, the patient id) when the items carry one, so no
patient ends up in two splits; :func:`check_group_leak` verifies explicit splits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.errors import ReadError
from medseg.data.formats import format_of, strip_suffix

__all__ = [
    "DATALIST_NAME",
    "check_group_leak",
    "load_datalist",
    "mat_patient_id",
    "split_by_group",
]

#: the datalist file looked for in a dataset folder
DATALIST_NAME = "datalist.json"
_SPLITS = ("training", "validation", "test")


def _case_stem(path: Path) -> str:
    stem = strip_suffix(path.name)
    return stem[:-5] if stem.endswith("_0000") else stem


def _is_image_entry(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return True  # a DICOM series folder
    return format_of(path) is not None  # by suffix; a suffix-less file by its DICOM preamble


def _entries(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if _is_image_entry(p)), key=lambda p: p.name)


def mat_patient_id(path: str | os.PathLike[str]) -> str:
    """The patient id ``cjdata/PID`` of a figshare-format MAT-file (v7.3 = HDF5, or v5 / v7)."""
    import h5py
    import scipy.io

    try:
        if h5py.is_hdf5(path):  # v7.3: char = uint16 code units
            with h5py.File(path, "r") as f:
                codes = np.asarray(f["cjdata/PID"]).ravel()
            return "".join(chr(int(c)) for c in codes if int(c) != 0).strip()
        cjdata = scipy.io.loadmat(path, variable_names=["cjdata"], squeeze_me=True, struct_as_record=False)
        return str(cjdata["cjdata"].PID).strip()
    except (OSError, KeyError, ValueError, AttributeError, TypeError) as e:
        raise ReadError(path, f"cannot read the patient id cjdata/PID ({type(e).__name__}: {e})") from e


def split_by_group(
    items: Sequence[dict[str, Any]], val_fraction: float = 0.2, seed: int = 0, group_key: str = "pid"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``items`` into (train, validation), keeping all items of one group on one side.

    Items without ``group_key`` form their own group. Groups are shuffled with ``seed`` and taken into the
    validation side until it holds at least ``val_fraction`` of the items (at least one group, and at least
    one group stays in training when there are two or more).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        key = str(item[group_key]) if group_key in item else f"\0item{i}"
        groups.setdefault(key, []).append(i)
    names = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    target = val_fraction * len(items)
    val_idx: set[int] = set()
    for rank, g in enumerate(order):
        if val_idx and (len(val_idx) >= target or rank == len(names) - 1):
            break
        val_idx.update(groups[names[int(g)]])
    if len(names) == 1:
        val_idx = set()
    train = [dict(it) for i, it in enumerate(items) if i not in val_idx]
    val = [dict(it) for i, it in enumerate(items) if i in val_idx]
    return train, val


def check_group_leak(
    splits: dict[str, Sequence[dict[str, Any]]], group_key: str = "pid", source: str = "datalist"
) -> None:
    """Raise ``ValueError`` naming the groups (patients) that occur in more than one split."""
    seen: dict[str, str] = {}
    leaks: dict[str, set[str]] = {}
    for split, items in splits.items():
        for item in items:
            if not isinstance(item, dict) or group_key not in item:
                continue
            g = str(item[group_key])
            if g in seen and seen[g] != split:
                leaks.setdefault(g, {seen[g]}).add(split)
            seen.setdefault(g, split)
    if leaks:
        desc = ", ".join(f"{g!r} in {sorted(s)}" for g, s in sorted(leaks.items()))
        raise ValueError(f"{source}: {group_key} shared between splits (data leak): {desc}")


def _check_exists(items: list[dict[str, Any]], keys: Sequence[str], source: Path) -> None:
    for item in items:
        for k in keys:
            if k in item and not Path(item[k]).exists():
                raise ReadError(item[k], f"listed as {k!r} in {source} but does not exist")


def _from_json(path: Path, dataset_dir: Path) -> dict[str, list[dict[str, Any]]]:
    from monai.data import load_decathlon_datalist

    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReadError(path, f"not a readable JSON datalist ({e})") from e
    if not isinstance(content, dict) or not any(k in content for k in _SPLITS):
        raise ReadError(path, f"a datalist needs at least one of the lists {list(_SPLITS)}")
    # load_decathlon_datalist turns bare test paths into {"image": path} and resolves paths on dataset_dir
    return {s: load_decathlon_datalist(path, True, s, base_dir=dataset_dir) for s in _SPLITS if s in content}


def _from_folders(dataset_dir: Path) -> dict[str, list[dict[str, Any]]]:
    images_tr, labels_tr, images_ts = (dataset_dir / n for n in ("imagesTr", "labelsTr", "imagesTs"))
    out: dict[str, list[dict[str, Any]]] = {}
    if images_tr.is_dir():
        if not labels_tr.is_dir():
            raise ReadError(dataset_dir, "has imagesTr/ but no labelsTr/")
        labels = {_case_stem(p): p for p in _entries(labels_tr)}
        training = []
        for img in _entries(images_tr):
            lab = labels.get(_case_stem(img))
            if lab is None:
                raise ReadError(img, f"no label with the same name in {labels_tr}")
            training.append({"image": str(img), "label": str(lab)})
        out["training"] = training
        if images_ts.is_dir():
            out["test"] = [{"image": str(p)} for p in _entries(images_ts)]
        return out
    mats = sorted(p for p in dataset_dir.glob("*.mat") if p.name != "cvind.mat")
    if mats:  # the figshare brain-tumour layout: one file per slice, image and mask inside
        out["training"] = [{"image": str(p), "label": str(p), "pid": mat_patient_id(p)} for p in mats]
        return out
    images = [p for p in _entries(dataset_dir) if p.is_file()]
    if images:  # a plain folder of images: inference only
        out["test"] = [{"image": str(p)} for p in images]
        return out
    raise ReadError(
        dataset_dir,
        f"no {DATALIST_NAME}, no imagesTr/ + labelsTr/ folders and no .mat or image files: "
        "see the bundle's docs/README.md for the expected layout",
    )


def load_datalist(
    dataset_dir: str | os.PathLike[str],
    split: str = "training",
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    group_key: str = "pid",
    limit: int | None = None,
    datalist: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """The items of ``split`` (``"training"``, ``"validation"`` or ``"test"``) of the dataset ``dataset_dir``.

    ``datalist``: a datalist JSON file kept outside the dataset (e.g. a bundle's committed split of a
    public dataset); its relative paths are resolved against ``dataset_dir`` as for ``datalist.json``.

    Paths come back absolute. Without an explicit validation list, one is split off the training list with
    :func:`split_by_group` (``val_fraction``, ``seed``, grouped by ``group_key``), and ``"training"`` then
    returns the rest. ``"test"`` falls back to the validation list when the dataset has no test list.
    ``limit`` keeps only the first ``limit`` items (quick runs). Raises :class:`ReadError` for a missing
    folder, a bad datalist or a listed file that does not exist, and ``ValueError`` when a patient
    (``group_key``) appears in two explicit splits.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise ReadError(root, "dataset_dir is not a folder")
    source = root / DATALIST_NAME if datalist is None else Path(datalist).expanduser().resolve()
    if datalist is not None and not source.is_file():
        raise ReadError(source, "datalist file not found")
    splits = _from_json(source, root) if source.is_file() else _from_folders(root)
    if not source.is_file():
        source = root
    if "validation" not in splits and "training" in splits:
        splits["training"], splits["validation"] = split_by_group(
            splits["training"], val_fraction=val_fraction, seed=seed, group_key=group_key
        )
    check_group_leak(splits, group_key=group_key, source=str(source))
    if split == "test" and "test" not in splits:
        split = "validation"
    if split not in splits or not splits[split]:
        raise ReadError(source, f"has no {split!r} items")
    items = splits[split]
    _check_exists(items, ("image", "label") if split != "test" else ("image",), source)
    return items[:limit] if limit is not None else items
