"""A cached virtual environment with MONAI Label (for ``tests/test_monailabel.py``).

MONAI Label 0.8.5 pins an older stack than medseg's own environment (pydicom 2.4, numpy 1.26), so it
lives in its own venv outside the clone, under ``$MEDSEG_CACHE`` (default ``~/.cache/medseg``):

- ``monailabel-venv/``: built from ``tests/monailabel/requirements.txt`` (a full pin list installed
  with ``--no-deps``: no resolver run, no sdist of ``sam2``, which MONAI Label only imports when
  asked to serve SAM2). ``medseg-stamp.json`` in it records the hash of that file and is written
  last, so a half-built venv is rebuilt from scratch on the next run.
- medseg is installed into it with ``pip install --no-deps`` of the clone; ``medseg-source.json``
  records a hash of medseg's sources so an edit reinstalls it (a few seconds).
- ``monailabel-weights/<bundle>-<hash>-<hash>/model.pt``: weights from a one-epoch training run of
  each bundle, keyed by the bundle's configs and medseg's network code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = Path(__file__).resolve().parent / "monailabel" / "requirements.txt"
CACHE = Path(os.environ.get("MEDSEG_CACHE", Path.home() / ".cache" / "medseg"))
VENV = CACHE / "monailabel-venv"
WEIGHTS = CACHE / "monailabel-weights"
_NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Name or service not known"
    r"|Network is unreachable|Connection refused|ConnectTimeout|ReadTimeout|No matching distribution found"
    r"|Could not find a version that satisfies"
)


class RegistryUnreachable(RuntimeError):
    """pip could not reach the package registry while building the venv."""


def _sha(paths: Iterable[Path], base: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(base)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def medseg_source_hash() -> str:
    """Hash of what gets installed from the clone (package sources and build config)."""
    files = [ROOT / "pyproject.toml"]
    for folder in ("medseg", "transforms"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return _sha(files, ROOT)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _run(cmd: list[str], timeout: float, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)


def _pip_failed(done: subprocess.CompletedProcess, what: str) -> Exception:
    output = f"{done.stdout}\n{done.stderr}"
    tail = "\n".join(line for line in output.splitlines() if not line.startswith("WARNING: Location"))[-3000:]
    if _NETWORK_ERRORS.search(output):
        return RegistryUnreachable(f"{what}: package registry unreachable:\n{tail}")
    return RuntimeError(f"{what} failed (exit {done.returncode}):\n{tail}")


def ensure_venv(timeout: float = 2400) -> Path:
    """The MONAI Label venv's python, built if missing, stale or half-built. Raises RegistryUnreachable."""
    stamp_file = VENV / "medseg-stamp.json"
    want = {"lock": _sha([LOCK], LOCK.parent), "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    try:
        if json.loads(stamp_file.read_text()) == want and venv_python().is_file():
            return venv_python()
    except (OSError, ValueError):
        pass
    if VENV.exists():
        shutil.rmtree(VENV)
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
    # pip byte-compiles file by file; compileall's worker pool (-j 0: one per CPU) does it in parallel
    done = _run(
        [str(venv_python()), "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet", "-r", str(LOCK)],
        timeout=timeout,
    )
    if done.returncode != 0:
        raise _pip_failed(done, "installing MONAI Label's environment")
    # its exit status is ignored: a file it cannot compile stays uncompiled, as pip leaves it
    _run([str(venv_python()), "-m", "compileall", "-q", "-j", "0", str(VENV / "lib")], timeout=timeout)
    stamp_file.write_text(json.dumps(want))
    return venv_python()


_NOT_IN_MEDSEG_BUILD = {
    ".git", ".venv", "build", "bundles", "sample_data", "benchmarks", "tests", "out", "docs",
}


def _ignore_for_medseg_build(folder: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(folder) == ROOT:
        skip |= _NOT_IN_MEDSEG_BUILD & set(names)
    return skip


def ensure_medseg(python: Path, timeout: float = 600) -> None:
    """Install the clone's medseg into the venv (``--no-deps``) unless that exact source is installed."""
    stamp_file = VENV / "medseg-source.json"
    want = {"source": medseg_source_hash(), "root": str(ROOT)}
    try:
        if json.loads(stamp_file.read_text()) == want:
            return
    except (OSError, ValueError):
        pass
    stamp_file.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # build from a copy: an in-tree build would write build/ and *.egg-info into the clone
        src = Path(tmp) / "src"
        shutil.copytree(ROOT, src, ignore=_ignore_for_medseg_build)
        cmd = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
               "--force-reinstall", str(src)]
        done = _run(cmd, timeout=timeout)
    if done.returncode != 0:
        raise _pip_failed(done, "installing medseg into MONAI Label's environment")
    stamp_file.write_text(json.dumps(want))


def trained_weights(python: Path, bundle: Path, dataset_dir: Path, timeout: float = 900) -> Path:
    """``models/model.pt`` of ``bundle`` after one training epoch (run in ``python``'s env), cached."""
    configs = [p for p in (bundle / "configs").iterdir() if p.is_file()]
    networks = [p for p in (ROOT / "medseg" / "networks").rglob("*.py")]
    key = f"{bundle.name}-{_sha(configs, bundle)}-{_sha(networks, ROOT)}"  # weights depend on these only
    cached = WEIGHTS / key / "model.pt"
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / bundle.name
        shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
        # val_interval 1: the bundles save models/model.pt from their validation handler
        cmd = [str(python), "-m", "monai.bundle", "run", "training",
               "--config_file", str(copy / "configs" / "train.json"),
               "--epochs", "1", "--val_interval", "1", "--dataset_dir", str(dataset_dir)]
        start = time.monotonic()
        done = _run(cmd, timeout=timeout, cwd=tmp)
        produced = copy / "models" / "model.pt"
        if done.returncode != 0 or not produced.is_file():
            raise RuntimeError(
                f"one-epoch training of {bundle.name} (exit {done.returncode}, "
                f"{time.monotonic() - start:.0f} s) left no models/model.pt:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = cached.with_suffix(".tmp")
        shutil.copyfile(produced, tmp_file)
        os.replace(tmp_file, cached)
    return cached
