"""The package installs and imports as promised: ``medseg.transforms`` maps to ``transforms/``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import medseg

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_version_and_cli_entry_point() -> None:
    script = Path(sys.executable).with_name("medseg")
    out = _run([str(script) if script.exists() else "medseg", "--version"], cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"medseg {medseg.__version__}"
    # `python -m medseg` is the same command line
    out = _run([sys.executable, "-m", "medseg", "--help"], cwd=REPO)
    assert out.returncode == 0 and "sample-data" in out.stdout


def test_cli_and_package_import_stay_light() -> None:
    """``import medseg`` and building the CLI import neither torch nor MONAI (``medseg --help`` is fast)."""
    code = (
        "import sys, medseg, medseg.cli; medseg.cli.build_parser(); "
        "heavy = [m for m in ('torch', 'monai', 'pydicom') if m in sys.modules]; print(heavy)"
    )
    out = _run([sys.executable, "-c", code], cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_import_transforms_from_repo_root_and_elsewhere(tmp_path: Path) -> None:
    code = "import medseg, medseg.transforms as t; print(t.__file__)"
    for cwd in (REPO, tmp_path):
        out = _run([sys.executable, "-c", code], cwd=cwd)
        assert out.returncode == 0, out.stderr
        assert Path(out.stdout.strip()).parent.name == "transforms"


def test_lazy_public_names_resolve() -> None:
    for name in medseg.__all__:
        assert getattr(medseg, name) is not None
    with pytest.raises(AttributeError):
        medseg.no_such_name  # noqa: B018


@pytest.mark.slow
def test_non_editable_install_imports(tmp_path: Path) -> None:
    """``pip install .`` (a real wheel, not editable) gives ``medseg.transforms``, run from anywhere."""
    target = tmp_path / "site"
    build = _run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(REPO)],
        cwd=tmp_path,
    )
    if build.returncode != 0:
        pytest.fail(f"pip install . failed:\n{build.stderr[-3000:]}")
    assert (target / "medseg" / "transforms" / "__init__.py").is_file()
    assert not (target / "transforms").exists(), "transforms/ must only be installed as medseg.transforms"
    # every subpackage of the source tree made it into the wheel (the package list is explicit)
    for init in (REPO / "medseg").rglob("__init__.py"):
        rel = init.relative_to(REPO)
        assert (target / rel).is_file(), f"{rel.parent} is missing from the wheel: add it to pyproject.toml"
    # the wheel comes first on the path; the venv supplies the dependencies
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import medseg, medseg.transforms as t; print(medseg.__file__); print(t.__file__)"
    out = _run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert all(line.startswith(str(target)) for line in lines), lines
    # from the repository root the checkout's package wins, and transforms/ is mounted from it
    out = _run([sys.executable, "-c", code], cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    shutil.rmtree(target)
