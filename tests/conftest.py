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
CT_BUNDLE = REPO / "bundles" / "unet_ct_3d"

# a smaller network, coarser grid and tile than unet_ct_3d's defaults: same pipeline, ~10x faster
CT_OVERRIDE = {
    "network_def#features": 4,
    "network_def#depth": 2,
    "target_spacing": [6.0, 6.0, 8.0],
    "tile_size": [64, 64, 32],
}


@pytest.fixture(scope="session")
def ct_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tmp copy of unet_ct_3d with an override config ``configs/tiny.json`` (:data:`CT_OVERRIDE`) and a
    randomly initialised (seeded) ``models/model.pt``: the real pipeline, fast on CPU."""
    import json

    import torch
    from monai.bundle import ConfigParser

    dst = tmp_path_factory.mktemp("bundle") / "unet_ct_3d"
    shutil.copytree(CT_BUNDLE / "configs", dst / "configs")
    (dst / "models").mkdir()
    (dst / "configs" / "tiny.json").write_text(json.dumps(CT_OVERRIDE))
    parser = ConfigParser()
    parser.read_config([str(dst / "configs" / "inference.json"), str(dst / "configs" / "tiny.json")])
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), dst / "models" / "model.pt")
    return dst


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
