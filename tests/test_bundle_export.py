"""``medseg bundle export`` / ``verify`` and the ONNX export: dynamic spatial axes checked with onnxruntime
at two valid sizes, tampered and incomplete bundles refused, and the exported zip used offline from a fresh
virtual environment that installs only the zip's medseg wheel (``--no-index``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from medseg.bundle_tools import (
    build_network,
    check_onnx,
    export_bundle,
    export_onnx,
    onnx_check_sizes,
    verify_bundle,
)

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"
NAMES = ("unet_nuclei_2d", "unet_brain_tumor_mri", "unet_ct_3d")

pytest.importorskip("onnxruntime")


def _with_weights(tmp_path: Path, name: str) -> Path:
    """A copy of the bundle with its shipped weights, or a fresh initialisation where none ship."""
    bundle = tmp_path / name
    shutil.copytree(BUNDLES / name, bundle, ignore=shutil.ignore_patterns("eval", "runs", "checkpoint.pt"))
    if not (bundle / "models" / "model.pt").is_file():
        (bundle / "models").mkdir(exist_ok=True)
        torch.manual_seed(0)
        torch.save(build_network(bundle, weights=False).state_dict(), bundle / "models" / "model.pt")
    return bundle


@pytest.mark.parametrize("name", NAMES)
def test_onnx_dynamic_axes_at_two_sizes(name: str, tmp_path: Path) -> None:
    bundle = _with_weights(tmp_path, name)
    net = build_network(bundle)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    dims = len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"])
    sizes = onnx_check_sizes(net, dims)
    assert len(set(sizes)) == 2 and all(net.is_valid_input_size(s) for s in sizes)
    assert len(set(sizes[1])) > 1, "the second size should not be square / cubic"
    onnx_file = export_onnx(net, tmp_path / "model.onnx", dims, 1)
    diffs = check_onnx(net, onnx_file, sizes, 1)
    print(f"{name}: ONNX vs PyTorch max abs diff {diffs}")
    assert max(diffs.values()) <= 1e-4, diffs
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert str(net.size_divisor) in props["valid_input_size"]


def test_verify_reports_tampering_and_missing_files(tmp_path: Path) -> None:
    name = "unet_brain_tumor_mri"
    bundle = _with_weights(tmp_path, name)
    wheel = tmp_path / "medseg-0.0.0-py3-none-any.whl"
    wheel.write_bytes(b"stand-in: only its checksum is checked here")
    out = tmp_path / "b.zip"
    summary = export_bundle(bundle, out, wheel=wheel)
    assert f"wheels/{wheel.name}" in summary["large_files"] and "models/model.pt" in summary["large_files"]
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
    assert f"{name}/large_files.yml" in names and f"{name}/configs/metadata.json" in names
    assert not any("/eval/" in n or n.endswith("checkpoint.pt") for n in names)

    report = verify_bundle(out, schema=SCHEMA if SCHEMA.is_file() else None)
    assert report.ok, report.errors
    assert set(report.checks) >= {"files", "checksums", "metadata", "network_in_out", "weights"}

    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(out) as zf:
        zf.extractall(unpacked)
    root = unpacked / name
    # weights changed after export: checksum error; weights of another network: strict loading error
    sd = torch.load(root / "models" / "model.pt", weights_only=True)
    first = next(iter(sd))
    sd[first] = sd[first] + 1
    torch.save(sd, root / "models" / "model.pt")
    report = verify_bundle(root)
    assert not report.ok and any(e.startswith("checksums:") for e in report.errors), report.errors
    sd.pop(first)
    torch.save(sd, root / "models" / "model.pt")
    report = verify_bundle(root)
    assert any(e.startswith("weights:") and "missing" in e for e in report.errors), report.errors
    (root / "LICENSE").unlink()
    report = verify_bundle(root)
    assert any(e.startswith("files:") and "LICENSE" in e for e in report.errors), report.errors


def test_export_refuses_a_bundle_without_weights(tmp_path: Path) -> None:
    bundle = tmp_path / "unet_ct_3d"
    shutil.copytree(BUNDLES / "unet_ct_3d", bundle, ignore=shutil.ignore_patterns("models", "eval"))
    with pytest.raises(ValueError, match="models/model.pt is missing"):
        export_bundle(bundle, tmp_path / "x.zip", wheel=tmp_path / "none.whl")
    assert not (tmp_path / "x.zip").exists()


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this environment's third-party packages (torch, MONAI, ...)
    through a path entry, but not medseg: that must come from the exported wheel."""
    venv.EnvBuilder(with_pip=True).create(path)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # a path entry, not a site dir: the .pth files there (medseg's editable install) are not processed
    (Path(site) / "_medseg_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_export_then_use_offline_in_a_fresh_venv(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2", "PIP_NO_INDEX": "1"})
    out = tmp_path / "unet_nuclei_2d.zip"
    done = subprocess.run(
        [sys.executable, "-m", "medseg", "bundle", "export", str(BUNDLES / "unet_nuclei_2d"),
         "--out", str(out), "--onnx"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ONNX vs PyTorch" in done.stdout

    python = _fresh_venv(tmp_path / "venv")
    probe = subprocess.run([str(python), "-c", "import medseg"], cwd=tmp_path, env=env, capture_output=True)
    assert probe.returncode != 0, "medseg importable in the fresh venv before installing the wheel"

    unpacked = tmp_path / "colleague"
    with zipfile.ZipFile(out) as zf:
        zf.extractall(unpacked)
    bundle = unpacked / "unet_nuclei_2d"
    wheels = list((bundle / "wheels").glob("medseg-*.whl"))
    assert len(wheels) == 1

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(python), *args], cwd=unpacked, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    run("-m", "pip", "install", "--no-index", "--no-deps", "-q", str(wheels[0]))
    where = run("-c", "import medseg; print(medseg.__file__)").stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where

    verify = ["-m", "medseg", "bundle", "verify", str(out)]
    if SCHEMA.is_file():
        verify += ["--schema", str(SCHEMA)]
    report = run(*verify).stdout
    assert "onnx" in report and report.strip().endswith("ok"), report

    # inference from the unpacked bundle, on the sample data
    preds = tmp_path / "preds"
    run("-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
        "--dataset_dir", str(REPO / "sample_data" / "nuclei_2d"), "--output_dir", str(preds),
        "--datalist", "$medseg.data.datalist.load_datalist(@dataset_dir, 'test')[:1]",
        "--tile_size", "[156,156]")
    assert len(list(preds.glob("*_seg.png"))) == 1, sorted(p.name for p in preds.iterdir())
