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
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.bundle import BundleError, load_weights, sha256_file
from medseg.io import atomic_target, atomic_write_text

__all__ = [
    "VerifyReport",
    "build_network",
    "build_wheel",
    "check_onnx",
    "export_bundle",
    "export_onnx",
    "onnx_check_sizes",
    "record_environment",
    "verify_bundle",
]

#: what a bundle must hold (the MONAI bundle specification and the model zoo)
REQUIRED_FILES = (
    "configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md", "models/model.pt",
)
#: left out of an export: outputs, training state, local data, caches
_SKIP_DIRS = {"eval", "runs", "data", "__pycache__", ".ipynb_checkpoints"}
_SKIP_FILES = {"models/checkpoint.pt"}
LARGE_FILES = "large_files.yml"

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


# --------------------------------------------------------------------------- network, TorchScript, ONNX


def build_network(bundle: str | os.PathLike[str], weights: bool = True) -> Any:
    """``network_def`` of ``configs/inference.json`` on the CPU in eval mode, with ``models/model.pt``
    loaded strictly (:func:`medseg.bundle.load_weights`) when ``weights``."""
    from monai.bundle import ConfigParser

    root = Path(bundle).resolve()
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def", instantiate=True)
    if weights:
        load_weights(net, root / "models" / "model.pt")
    return net.cpu().eval()


def onnx_check_sizes(network: Any, spatial_dims: int) -> list[tuple[int, ...]]:
    """Two different valid input sizes for ``network`` (a U-Net's valid-size rule; else multiples of 16),
    the second one not square, to check that the exported spatial axes are really dynamic."""
    bases = ((64, 64, 64), (96, 80, 48)) if spatial_dims == 3 else ((96, 96), (160, 128))
    if hasattr(network, "valid_input_size"):
        return [tuple(network.valid_input_size(b, "ceil")) for b in bases]
    return [tuple(-(-n // 16) * 16 for n in b) for b in bases]


def _size_rule(network: Any) -> str:
    """The valid input sizes of ``network`` in words (stored in the ONNX file's metadata)."""
    divisor = getattr(network, "size_divisor", None)
    if divisor is None:
        return "any"
    border = int(getattr(network, "border", 0) or 0)
    if border:
        return f"{divisor}*n+{4 * (divisor - 1)} per spatial axis (n >= 1); output = input - {2 * border}"
    return f"{divisor}*n per spatial axis (n >= 1); output = input"


def export_onnx(
    network: Any,
    path: str | os.PathLike[str],
    spatial_dims: int,
    in_channels: int,
    opset: int = 17,
) -> Path:
    """Export ``network`` to ONNX with dynamic batch and spatial axes (input ``image``, output ``pred``).

    The network is traced once at a valid input size; crop-and-concat and the output size follow the
    input's shape in the graph, so every valid size runs (the rule is stored in the file's metadata as
    ``valid_input_size``). Written atomically.
    """
    import warnings

    import torch

    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs onnx and onnxruntime: pip install 'medseg[onnx]'") from e
    size = onnx_check_sizes(network, spatial_dims)[0]
    example = torch.zeros((1, in_channels, *size), dtype=torch.float32)
    axes = {0: "batch", **{2 + i: f"in_{'xyz'[i]}" for i in range(spatial_dims)}}
    out_axes = {0: "batch", **{2 + i: f"out_{'xyz'[i]}" for i in range(spatial_dims)}}
    path = Path(path)
    with atomic_target(path, ".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic and dropout
        torch.onnx.export(
            network.cpu().eval(), (example,), tmp, input_names=["image"], output_names=["pred"],
            dynamic_axes={"image": axes, "pred": out_axes}, opset_version=opset, dynamo=False,
        )
        model = onnx.load(tmp)
        for key, value in (("valid_input_size", _size_rule(network)), ("producer", "medseg bundle export")):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, tmp)
    return path


def check_onnx(
    network: Any, onnx_file: str | os.PathLike[str], sizes: Sequence[Sequence[int]], in_channels: int
) -> dict[tuple[int, ...], float]:
    """The max abs difference between onnxruntime (CPU) and ``network`` per input size (seeded inputs)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    diffs: dict[tuple[int, ...], float] = {}
    for size in sizes:
        x = torch.rand((1, in_channels, *size), generator=gen)
        with torch.no_grad():
            ref = network.cpu().eval()(x).float().numpy()
        out = session.run(None, {"image": x.numpy()})[0]
        if out.shape != ref.shape:
            raise BundleError(
                onnx_file, f"output {out.shape} at input {tuple(size)}; PyTorch gives {ref.shape}"
            )
        diffs[tuple(int(n) for n in size)] = float(np.abs(out - ref).max())
    return diffs


# --------------------------------------------------------------------------- export


def _source_tree() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "medseg").is_dir() else None


def build_wheel(out_dir: str | os.PathLike[str]) -> Path:
    """Build the medseg wheel (``pip wheel --no-deps``) from this source tree into ``out_dir``.

    The package sources are copied to a temporary folder first, so the build leaves nothing in the tree;
    offline (no build isolation, no index) when setuptools is importable, else with pip's defaults.
    """
    src = _source_tree()
    if src is None:
        raise FileNotFoundError("medseg is not installed from a source tree: pass a wheel with --wheel")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medseg-wheel-") as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
            if (src / name).is_file():
                shutil.copy2(src / name, tree / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("medseg", "transforms"):
            shutil.copytree(src / name, tree / name, ignore=ignore)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(tree)]
        try:
            import setuptools  # noqa: F401

            cmd[4:4] = ["--no-build-isolation", "--no-index"]
        except ImportError:
            pass
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    wheels = sorted(out.glob("medseg-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise RuntimeError(f"no medseg wheel in {out}")
    return wheels[-1]


def _bundle_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if rel.as_posix() in _SKIP_FILES or rel.as_posix() == LARGE_FILES:
            continue
        files.append(rel)
    return files


def _large_files_yaml(entries: Sequence[tuple[str, str, int]]) -> str:
    lines = [
        "# files checked by `medseg bundle verify` (the model zoo's large_files.yml layout; they travel",
        "# inside the export, so there is no url)",
        "large_files:",
    ]
    for path, digest, size in entries:
        lines += [f'  - path: "{path}"', f'    hash_val: "{digest}"', '    hash_type: "sha256"']
        lines.append(f"    size: {size}")
    return "\n".join(lines) + "\n"


def _read_large_files(path: Path) -> list[dict[str, Any]]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    entries = data.get("large_files") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise BundleError(path, "no 'large_files' list")
    return entries


def export_bundle(
    bundle: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    torchscript: bool = False,
    onnx: bool = False,
    wheel: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write the zip ``out`` holding one folder ``<name>/``: the bundle (without outputs, local data and
    training state), ``models/model.ts`` / ``models/model.onnx`` when asked, ``wheels/medseg-*.whl``
    (built here, or ``wheel``) and ``large_files.yml`` with the sha256 of the weights, exports and wheel.
    Returns a summary: files, checksums and the ONNX check's max abs difference per input size."""
    import torch

    root = Path(bundle).resolve()
    for rel in REQUIRED_FILES:
        if not (root / rel).is_file():
            hint = " (train the bundle first)" if rel.startswith("models/") else ""
            raise BundleError(root, f"{rel} is missing{hint}")
    meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    name = str(meta.get("name") or root.name)
    net = build_network(root)
    inp = next(iter(meta["network_data_format"]["inputs"].values()))
    dims, channels = len(inp["spatial_shape"]), int(inp["num_channels"])
    summary: dict[str, Any] = {"bundle": name, "out": str(out)}
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        stage = Path(tmp)
        extra: dict[str, Path] = {}
        if torchscript:
            ts = stage / "model.ts"
            scripted = torch.jit.script(net)
            torch.jit.save(scripted, str(ts), _extra_files={"metadata.json": json.dumps(meta).encode()})
            extra["models/model.ts"] = ts
        if onnx:
            onnx_file = export_onnx(net, stage / "model.onnx", dims, channels)
            summary["onnx_max_abs_diff"] = check_onnx(net, onnx_file, onnx_check_sizes(net, dims), channels)
            extra["models/model.onnx"] = onnx_file
        whl = Path(wheel) if wheel is not None else build_wheel(stage / "wheels")
        extra[f"wheels/{whl.name}"] = whl
        files = {rel.as_posix(): root / rel for rel in _bundle_files(root) if rel.as_posix() not in extra}
        files.update(extra)
        listed = ["models/model.pt", *extra]
        entries = [(rel, sha256_file(files[rel]), files[rel].stat().st_size) for rel in listed]
        summary["large_files"] = {rel: digest for rel, digest, _ in entries}
        with atomic_target(out, ".zip") as tmp_zip, zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
            for rel, path in sorted(files.items()):
                zf.write(path, f"{name}/{rel}")
            zf.writestr(f"{name}/{LARGE_FILES}", _large_files_yaml(entries))
        summary["files"] = sorted([*files, LARGE_FILES])
    return summary


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """What :func:`verify_bundle` checked: ``checks`` (name -> result) and ``errors`` (empty: all passed)."""

    bundle: str
    checks: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _safe_extract(zip_path: Path, dest: Path) -> Path:
    base = dest.resolve()
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            if not (base / info.filename).resolve().is_relative_to(base):
                raise BundleError(zip_path, f"member {info.filename!r} leaves the extraction folder")
        zf.extractall(base)
    roots = [p.parent.parent for p in base.glob("*/configs/metadata.json")]
    if len(roots) != 1:
        raise BundleError(zip_path, f"expected one <name>/configs/metadata.json, found {len(roots)}")
    return roots[0]


def verify_bundle(path: str | os.PathLike[str], schema: str | os.PathLike[str] | None = None) -> VerifyReport:
    """Check a bundle folder or an exported zip: required files, the sha256 of ``large_files.yml``,
    metadata against ``schema`` (a local copy of MONAI's metadata schema; without one, the required keys
    only), the network's input/output shapes (MONAI ``verify_net_in_out``), strict loading of
    ``models/model.pt``, and the TorchScript and ONNX exports where present (within 1e-4 of PyTorch)."""
    src = Path(path)
    if src.is_file() and zipfile.is_zipfile(src):
        with tempfile.TemporaryDirectory(prefix="medseg-verify-") as tmp:
            try:
                root = _safe_extract(src, Path(tmp))
            except (BundleError, zipfile.BadZipFile) as e:
                return VerifyReport(str(src), {"files": "FAILED"}, [f"files: {e}"])
            report = _verify_dir(root, schema)
            report.bundle = str(src)
            return report
    if not src.is_dir():
        raise BundleError(src, "neither a bundle folder nor a zip")
    return _verify_dir(src.resolve(), schema)


def _check(report: VerifyReport, name: str, fn: Any) -> Any:
    """Run one check; a failure is recorded and the other checks still run."""
    try:
        result = fn()
    except Exception as e:
        text = str(e).strip()
        cause = e.__cause__
        if cause is not None and str(cause).strip():  # MONAI wraps errors of config expressions
            text = f"{text.splitlines()[0] if text else ''} ({type(cause).__name__}: {str(cause).strip()})"
        report.errors.append(f"{name}: {text.splitlines()[0] if text else type(e).__name__}")
        report.checks[name] = "FAILED"
        return None
    report.checks[name] = "ok" if result is None else (result if isinstance(result, str) else "ok")
    return result


_REQUIRED_KEYS = (
    "schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
    "task", "description", "authors", "copyright", "network_data_format",
)


def _verify_dir(root: Path, schema: str | os.PathLike[str] | None) -> VerifyReport:
    report = VerifyReport(bundle=str(root))
    meta_file = root / "configs" / "metadata.json"

    def files() -> str:
        missing = [rel for rel in REQUIRED_FILES if not (root / rel).is_file()]
        if missing:
            raise BundleError(root, f"missing {missing}")
        return f"{len(REQUIRED_FILES)} required files present"

    def checksums() -> str:
        listing = root / LARGE_FILES
        if not listing.is_file():
            return f"no {LARGE_FILES}: not checked"
        entries = _read_large_files(listing)
        for entry in entries:
            target = root / str(entry["path"])
            if not target.is_file():
                raise BundleError(target, f"listed in {LARGE_FILES} but missing")
            if str(entry.get("hash_type", "sha256")).lower() != "sha256":
                raise BundleError(target, f"unsupported hash_type {entry.get('hash_type')!r}")
            if sha256_file(target) != str(entry["hash_val"]):
                raise BundleError(target, f"sha256 differs from {LARGE_FILES}")
        return f"{len(entries)} files, sha256 match"

    def metadata() -> str:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        if missing:
            raise BundleError(meta_file, f"missing keys {missing}")
        if schema is None:
            return "required keys present (schema not checked: pass --schema)"
        from monai.bundle import verify_metadata

        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
        return f"valid against {Path(schema).name}"

    def net_in_out() -> str:
        from monai.bundle import verify_net_in_out

        verify_net_in_out(
            net_id="network_def", meta_file=str(meta_file),
            config_file=str(root / "configs" / "inference.json"), device="cpu",
        )
        return "input/output shapes match the metadata"

    def weights() -> Any:
        return build_network(root)

    _check(report, "files", files)
    _check(report, "checksums", checksums)
    _check(report, "metadata", metadata)
    _check(report, "network_in_out", net_in_out)
    net = _check(report, "weights", weights)
    if net is None:
        return report
    report.checks["weights"] = "models/model.pt loads strictly into network_def"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    inp = next(iter(meta["network_data_format"]["inputs"].values()))
    dims, channels = len(inp["spatial_shape"]), int(inp["num_channels"])
    if (root / "models" / "model.ts").is_file():
        _check(report, "torchscript", lambda: _check_ts(root / "models" / "model.ts", net, dims, channels))
    if (root / "models" / "model.onnx").is_file():

        def onnx_check() -> str:
            diffs = check_onnx(net, root / "models" / "model.onnx", onnx_check_sizes(net, dims), channels)
            if max(diffs.values()) > 1e-4:
                worst = max(diffs.values())
                raise BundleError(root / "models" / "model.onnx", f"max abs difference {worst:.2e}")
            return "max abs diff vs PyTorch " + ", ".join(
                f"{'x'.join(map(str, k))}: {v:.1e}" for k, v in diffs.items()
            )

        _check(report, "onnx", onnx_check)
    return report


def _check_ts(ts_file: Path, net: Any, dims: int, channels: int) -> str:
    import torch

    scripted = torch.jit.load(str(ts_file), map_location="cpu")
    size = onnx_check_sizes(net, dims)[0]
    x = torch.rand((1, channels, *size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (scripted(x) - net(x)).abs().max().item()
    if diff > 1e-4:
        raise BundleError(ts_file, f"max abs difference {diff:.2e} to the PyTorch network")
    return f"max abs diff vs PyTorch {diff:.1e}"


# --------------------------------------------------------------------------- command line


def _cmd_export(args: Any) -> int:
    summary = export_bundle(
        args.bundle, args.out, torchscript=args.torchscript, onnx=args.onnx, wheel=args.wheel
    )
    print(f"wrote {summary['out']}: {len(summary['files'])} files")
    for rel, digest in summary["large_files"].items():
        print(f"  {rel}  sha256 {digest}")
    for size, diff in summary.get("onnx_max_abs_diff", {}).items():
        print(f"  ONNX vs PyTorch at {'x'.join(map(str, size))}: max abs diff {diff:.2e}")
    return 0


def _cmd_verify(args: Any) -> int:
    schema = args.schema or os.environ.get("MEDSEG_META_SCHEMA")
    report = verify_bundle(args.path, schema=schema)
    for name, detail in report.checks.items():
        print(f"{name:15s} {detail}")
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"{report.bundle}: {'ok' if report.ok else f'{len(report.errors)} check(s) failed'}")
    return 0 if report.ok else 1


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

    p = cmds.add_parser(
        "export", help="write a zip that runs offline: bundle, weights with sha256, exports, the medseg wheel"
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder (with models/model.pt)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.zip", help="the zip to write")
    p.add_argument("--torchscript", action="store_true", help="add models/model.ts")
    p.add_argument(
        "--onnx", action="store_true",
        help="add models/model.onnx (dynamic batch and spatial axes; checked with onnxruntime at two sizes)",
    )
    p.add_argument("--wheel", type=Path, help="a medseg wheel to ship (default: build one from this source)")
    p.set_defaults(func=_cmd_export)

    p = cmds.add_parser("verify", help="check a bundle folder or an exported zip")
    p.add_argument("path", type=Path, metavar="FILE.zip|DIR")
    p.add_argument(
        "--schema", type=Path,
        help="local copy of MONAI's metadata schema (default: $MEDSEG_META_SCHEMA; else required keys only)",
    )
    p.set_defaults(func=_cmd_verify)
