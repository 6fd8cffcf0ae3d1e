"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NUCLEI = REPO / "sample_data" / "nuclei_2d"


@pytest.fixture(scope="session")
def trained_nuclei(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """unet_nuclei_2d trained from scratch on the sample nuclei with its default settings (``precision``
    auto, 20 epochs), in a tmp copy of the bundle: ``<copy>/models/model.pt``."""
    if not NUCLEI.is_dir():
        pytest.skip("needs sample_data/nuclei_2d")
    bundle = tmp_path_factory.mktemp("bundle") / "unet_nuclei_2d"
    shutil.copytree(REPO / "bundles" / "unet_nuclei_2d" / "configs", bundle / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(bundle / "configs" / "train.json"), "--dataset_dir", str(NUCLEI), "--epochs", "20",
           "--val_interval", "20", "--num_workers", "0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return bundle
