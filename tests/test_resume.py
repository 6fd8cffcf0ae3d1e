"""Resumable bundle training: a run killed with SIGKILL and started again with ``--resume true`` ends
with the weights of an uninterrupted run of the same seed (CPU, fp32); a restart never replaces a better
``models/model.pt`` by a worse one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
NAME = "unet_brain_tumor_mri"
SAMPLE = REPO / "sample_data" / "brain_mri_mat"
# 4 epochs of 2 iterations on 64x64 slices, validation every 2 epochs, a checkpoint every 2 epochs
OVERRIDES = {
    "epochs": "4",
    "val_interval": "2",
    "checkpoint_interval": "2",
    "num_workers": "0",
    "precision": "fp32",
    "image_size": "[64,64]",
    "patch_size": "[32,32]",
    "samples_per_image": "1",
    "batch_size": "2",
    "train_list": "$medseg.data.datalist.load_datalist(@dataset_dir, 'training')[:4]",
    "val_list": "$medseg.data.datalist.load_datalist(@dataset_dir, 'validation')[:1]",
}
# replaces the console logger (no random numbers drawn) by a handler that SIGKILLs its own process after
# the first iteration of epoch 3, i.e. after the checkpoint of epoch 2 and in the middle of training
KILL_AT_EPOCH_3 = (
    "$type('Kill', (), {'attach': lambda self, e: e.add_event_handler("
    "__import__('ignite.engine', fromlist=['Events']).Events.ITERATION_COMPLETED("
    "event_filter=lambda eng, i: eng.state.epoch == 3), "
    "lambda eng: __import__('os').kill(__import__('os').getpid(), 9))})()"
)


def _bundle(dest: Path, sample: Path) -> Path:
    target = dest / NAME
    shutil.copytree(REPO / "bundles" / NAME, target, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    return target


def _train(bundle: Path, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = {**OVERRIDES, "dataset_dir": str(SAMPLE), **(extra or {})}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(bundle / "configs" / "train.json")]
    for k, v in args.items():
        cmd += [f"--{k}", v]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MEDSEG_CPU_BF16": "0"}
    return subprocess.run(cmd, cwd=bundle.parent, env=env, capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _ckpt(bundle: Path) -> dict:
    return torch.load(bundle / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SAMPLE / "datalist.json").is_file():
        pytest.skip(f"needs the sample data in {SAMPLE}")
    bundle = _bundle(tmp_path_factory.mktemp("a"), SAMPLE)
    _ok(_train(bundle))
    return bundle


def test_kill_then_resume_equals_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, SAMPLE)
    killed = _train(bundle, {"train#handlers#1": KILL_AT_EPOCH_3})
    assert killed.returncode == -signal.SIGKILL, f"{killed.returncode}\n{killed.stderr[-3000:]}"
    saved = _ckpt(bundle)
    assert saved["trainer"]["epoch"] == 2 and saved["trainer"]["iteration"] == 4
    assert not list((bundle / "models").glob(".*.tmp*")), "a temporary checkpoint file was left behind"

    resumed = _train(bundle, {"resume": "true"})
    _ok(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _ckpt(uninterrupted), _ckpt(bundle)
    assert b["trainer"] == a["trainer"] == {"epoch": 4, "iteration": 8, "max_epochs": 4}
    assert [e for e, _ in a["extra"]["curves"]["losses"]] == [1, 2, 3, 4]
    assert b["extra"]["curves"] == a["extra"]["curves"]  # the curves continue across the restart
    diff = max((a["network"][k].float() - b["network"][k].float()).abs().max().item() for k in a["network"])
    print(f"max abs weight difference, resumed vs uninterrupted: {diff:.3g}")
    assert diff <= 1e-5
    assert a["lr_scheduler"] == b["lr_scheduler"] if "lr_scheduler" in a else True
    best_a = json.loads((uninterrupted / "models" / "model_key_metric.json").read_text())
    best_b = json.loads((bundle / "models" / "model_key_metric.json").read_text())
    assert best_a["best_metric"] == pytest.approx(best_b["best_metric"], abs=1e-5)


def test_restart_keeps_the_better_model(uninterrupted: Path, tmp_path: Path) -> None:
    bundle = tmp_path / NAME
    shutil.copytree(uninterrupted, bundle)
    model = bundle / "models" / "model.pt"
    sidecar = bundle / "models" / "model_key_metric.json"
    before = model.read_bytes()
    record = json.loads(sidecar.read_text())
    # the model on disk scores higher than any restart can
    record["saved"] = [[1.5, "model.pt"]]
    record["best_metric"] = 1.5
    sidecar.write_text(json.dumps(record))
    _ok(_train(bundle, {"epochs": "1", "val_interval": "1"}))  # a fresh start, no resume
    assert model.read_bytes() == before, "a restart replaced a better model.pt"
    assert json.loads(sidecar.read_text())["best_metric"] == 1.5
    # a restart that does better replaces it
    record["saved"] = [[-1.0, "model.pt"]]
    record["best_metric"] = -1.0
    sidecar.write_text(json.dumps(record))
    _ok(_train(bundle, {"epochs": "1", "val_interval": "1"}))
    assert model.read_bytes() != before
    assert json.loads(sidecar.read_text())["best_metric"] > -1.0
