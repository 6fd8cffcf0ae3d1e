"""Bundles as products: true metadata, export to one offline zip, verification, ONNX.

* :func:`record_environment`: write the versions of the running environment (MONAI, PyTorch, NumPy and
  every package of ``required_packages_version``) into ``configs/metadata.json``; medseg itself, which is
  on no package index, is recorded as ``medseg_version`` (an export carries its wheel);
* :func:`export_bundle`: the bundle, its weights with sha256 checksums (``large_files.yml``, the model
  zoo's layout), optional TorchScript / ONNX exports and the medseg wheel, in one zip;
* :func:`verify_bundle`: files, checksums, metadata against the schema, network in/out shapes and strict
  weight loading, for a zip or a folder;
* :func:`export_onnx`: ONNX with dynamic batch and spatial axes, checked with onnxruntime.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medseg.bundle import BundleError
from medseg.io import atomic_write_text

__all__ = ["record_environment"]

#: packages that are on no public index: recorded under their own key, never pinned
_UNPINNED = ("medseg",)


def _installed(name: str) -> str | None:
    """The installed version of ``name`` without a local suffix (``2.13.0+cpu`` -> ``2.13.0``)."""
    try:
        return importlib.metadata.version(name).split("+", 1)[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=4, ensure_ascii=False) + "\n")


def record_environment(bundle: str | os.PathLike[str], write: bool = True) -> dict[str, Any]:
    """Set the version fields of ``bundle``'s metadata to the running environment; returns the metadata.

    ``monai_version``, ``pytorch_version``, ``numpy_version`` and each entry of
    ``required_packages_version`` (and ``optional_packages_version``) become the installed versions,
    so the pins resolve together (they were installed together). Packages that are not installed are
    an error; ``medseg`` moves to ``medseg_version``.
    """
    meta_file = Path(bundle) / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    for key, dist in (("monai_version", "monai"), ("pytorch_version", "torch"), ("numpy_version", "numpy")):
        version = _installed(dist)
        if version is None:
            raise BundleError(meta_file, f"{dist} is not installed")
        meta[key] = version
    for section in ("required_packages_version", "optional_packages_version"):
        pins = meta.get(section)
        if not isinstance(pins, dict):
            continue
        for name in list(pins):
            if name.lower() in _UNPINNED:
                del pins[name]
                continue
            version = _installed(name)
            if version is None:
                raise BundleError(meta_file, f"{section}: {name} is not installed in this environment")
            pins[name] = version
    meta["medseg_version"] = _installed("medseg") or _medseg_source_version()
    if write:
        _write_json(meta_file, meta)
    return meta


def _medseg_source_version() -> str:
    from medseg._version import __version__

    return __version__


def _cmd_record_env(args: Any) -> int:
    for bundle in args.bundles:
        meta = record_environment(bundle)
        pins = ", ".join(f"{k}=={v}" for k, v in meta.get("required_packages_version", {}).items())
        print(f"{bundle}: monai {meta['monai_version']}, torch {meta['pytorch_version']}, "
              f"numpy {meta['numpy_version']}, medseg {meta['medseg_version']}; {pins}")
    return 0


def add_bundle_parser(sub: Any) -> None:
    """Add ``medseg bundle {record-env,export,verify}`` to the ``medseg`` command's subparsers."""
    bundle = sub.add_parser("bundle", help="bundle tools: record versions, export to a zip, verify")
    cmds = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    p = cmds.add_parser(
        "record-env", help="write the running environment's package versions into configs/metadata.json"
    )
    p.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE", help="bundle folders")
    p.set_defaults(func=_cmd_record_env)
