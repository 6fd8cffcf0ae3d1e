"""MONAI Label integration: the bundles served, inferred and trained by a real ``monailabel start_server``.

Run on its own with ``python -m pytest -m monailabel``. The MONAI Label environment is built once and
cached outside the clone (``tests/monailabel_env.py``); the test is skipped only when that build
cannot reach the package registry. The fast unit tests of the preparation step come first and need
no server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medseg.monailabel import BundleError, check_bundle, fetch_app, prepare_app, start_server_command

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = ROOT / "bundles"
SAMPLES = ROOT / "sample_data"
SERVED = {"unet_ct_3d": "ct_3d", "unet_nuclei_2d": "nuclei_2d"}  # bundle -> its sample dataset
HOST = "127.0.0.1"


# --------------------------------------------------------------------------- preparation step, no server
def _bundle_with_weights(tmp_path: Path, name: str = "unet_nuclei_2d") -> Path:
    """A copy of a real bundle with weights that match its network (fresh initialisation)."""
    from monai.bundle import ConfigParser

    bundle = tmp_path / name
    shutil.copytree(BUNDLES / name, bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.config["bundle_root"] = str(bundle)
    (bundle / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle


def _fake_app(tmp_path: Path) -> Path:
    app = tmp_path / "apps" / "monaibundle"
    app.mkdir(parents=True)
    (app / "main.py").write_text("# placeholder for MONAI Label's app\n")
    return app


@pytest.mark.parametrize("name", ["unet_nuclei_2d", "unet_em_isbi2012"])
def test_check_bundle_reports_what_monailabel_reads(tmp_path: Path, name: str) -> None:
    summary = check_bundle(_bundle_with_weights(tmp_path, name))
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert summary.dimension == len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]) == 2
    assert summary.labels == {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}
    assert summary.trainable and summary.version == meta["version"]


def test_missing_weights_is_a_clear_error_and_app_untouched(tmp_path: Path) -> None:
    good = _bundle_with_weights(tmp_path / "a")
    bad = _bundle_with_weights(tmp_path / "b", "unet_ct_3d")
    (bad / "models" / "model.pt").unlink()
    app = _fake_app(tmp_path)
    with pytest.raises(BundleError, match=r"unet_ct_3d.*models/model\.pt is missing"):
        prepare_app(app, [good, bad])
    assert not (app / "model").exists()  # nothing written: the good bundle was not half-installed


def test_mismatched_weights_meta_refs_and_handlers_are_errors(tmp_path: Path) -> None:
    bundle = _bundle_with_weights(tmp_path)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    state.pop(next(iter(state)))
    torch.save({"model": state}, bundle / "models" / "model.pt")
    with pytest.raises(BundleError, match="does not match network_def"):
        check_bundle(bundle)
    check_bundle(bundle, check_weights=False)  # the structure alone is fine

    bundle = _bundle_with_weights(tmp_path / "c")
    infer = bundle / "configs" / "inference.json"
    config = json.loads(infer.read_text())
    config["network_def"]["out_channels"] = "@_meta_#network_data_format#outputs#pred#num_channels"
    infer.write_text(json.dumps(config, indent=1))
    with pytest.raises(BundleError, match=r"inference\.json line \d+ refers to '_meta_'"):
        check_bundle(bundle, check_weights=False)

    bundle = _bundle_with_weights(tmp_path / "d")
    train = bundle / "configs" / "train.json"
    config = json.loads(train.read_text())
    config["train"]["handlers"] = "$[]"
    train.write_text(json.dumps(config))
    with pytest.raises(BundleError, match="must be a literal list"):
        check_bundle(bundle)
    train.write_text((BUNDLES / "unet_nuclei_2d" / "configs" / "train.json").read_text())
    (bundle / "configs" / "multi_gpu_train.json").unlink()
    with pytest.raises(BundleError, match="multi_gpu_train.json"):
        check_bundle(bundle)
    assert any("multi_gpu_train.json" in w for w in check_bundle(bundle, require_train=False).warnings)


def test_2d_postprocessing_that_monailabel_cannot_write_is_flagged(tmp_path: Path) -> None:
    bundle = _bundle_with_weights(tmp_path)
    infer = bundle / "configs" / "inference.json"
    config = json.loads(infer.read_text())
    steps = config["postprocessing"]["transforms"]
    steps = [t for t in steps if t["_target_"] not in ("SqueezeDimd", "CastToTyped")]
    config["postprocessing"]["transforms"] = steps
    infer.write_text(json.dumps(config))
    assert any("SqueezeDimd" in w for w in check_bundle(bundle, check_weights=False).warnings)
    config["postprocessing"]["transforms"] = steps + [
        {"_target_": "SqueezeDimd", "keys": "pred", "dim": 0},
        {"_target_": "CastToTyped", "keys": "pred", "dtype": "$numpy.uint8"},
    ]
    infer.write_text(json.dumps(config))
    assert check_bundle(bundle, check_weights=False).warnings == []


def test_prepare_app_copies_bundle_without_outputs(tmp_path: Path) -> None:
    bundle = _bundle_with_weights(tmp_path / "src")
    (bundle / "eval").mkdir()
    (bundle / "eval" / "junk.csv").write_text("x")
    (bundle / "models" / "checkpoint.pt").write_bytes(b"training state")
    (bundle / "models" / "model_key_metric.json").write_text("{}")
    app = _fake_app(tmp_path)
    prepare_app(app, [bundle])
    installed = app / "model" / "unet_nuclei_2d"
    assert sorted(p.name for p in (installed / "models").iterdir()) == ["model.pt"]
    assert (installed / "models" / "model.pt").read_bytes() == (bundle / "models" / "model.pt").read_bytes()
    assert not (installed / "eval").exists() and not installed.is_symlink()
    prepare_app(app, [bundle], link=True)  # replaces the copy
    assert (app / "model" / "unet_nuclei_2d").resolve() == bundle.resolve()
    assert [p.name for p in (app / "model").iterdir()] == ["unet_nuclei_2d"]


def test_label_values_of_a_one_channel_network(tmp_path: Path) -> None:
    """A 1-channel (sigmoid) network's metadata names its channel; the mask's values are in
    post_processed_outputs: MONAI Label, which reads outputs only, gets them in the installed copy."""
    bundle = _bundle_with_weights(tmp_path / "src", "unet_brain_tumor_mri")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "tumor"}
    summary = check_bundle(bundle)
    assert summary.labels == {"tumor": 1}
    app = _fake_app(tmp_path)
    prepare_app(app, [bundle])
    installed = json.loads((app / "model" / bundle.name / "configs" / "metadata.json").read_text())
    pred = installed["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "tumor"}
    with pytest.raises(BundleError, match="post_processed_outputs"):
        prepare_app(app, [bundle], link=True)


@pytest.mark.parametrize("layout", ["bare", "model", "state_dict", "ddp", "ddp_in_model"])
def test_predict_and_prepare_accept_the_same_checkpoint_layouts(tmp_path: Path, layout: str) -> None:
    """Every layout MONAI / DDP / Lightning save loads in medseg predict's engine and passes the MONAI Label
    check; the installed copy is one MONAI Label reads (a bare state dict or {"model": ...}, no prefix)."""
    from medseg.bundle import load_weights
    from medseg.monailabel import _monailabel_reads

    bundle = _bundle_with_weights(tmp_path / "src")
    weights = bundle / "models" / "model.pt"
    sd = torch.load(weights, weights_only=True)
    ddp = {f"module.{k}": v for k, v in sd.items()}
    obj = {"bare": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd},
           "ddp": ddp, "ddp_in_model": {"model": ddp}}[layout]  # fmt: skip
    torch.save(obj, weights)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    net = parser.get_parsed_content("network_def")
    load_weights(net, weights)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())
    check_bundle(bundle)
    app = _fake_app(tmp_path)
    prepare_app(app, [bundle])
    installed = app / "model" / "unet_nuclei_2d" / "models" / "model.pt"
    assert _monailabel_reads(installed)
    if layout in ("state_dict", "ddp", "ddp_in_model"):
        with pytest.raises(BundleError, match="does not read"):
            prepare_app(app, [bundle], link=True)


def test_cli_prepare_reports_the_failing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.monailabel import main

    bundle = _bundle_with_weights(tmp_path)
    app = _fake_app(tmp_path)
    assert main(["prepare", "--app", str(app), str(bundle)]) == 0
    assert "unet_nuclei_2d: 2D" in capsys.readouterr().out
    (bundle / "models" / "model.pt").unlink()
    assert main(["prepare", "--app", str(app), str(bundle)]) == 2
    assert "unet_nuclei_2d: models/model.pt is missing" in capsys.readouterr().err


def test_start_server_command_is_offline() -> None:
    cmd = start_server_command("app", "studies", ["a", "b"], port=1234)
    joined = " ".join(cmd)
    assert "--conf models a,b" in joined and "--conf zoo_source github" in joined
    assert "--conf sam2 false" in joined and cmd[-4:] == ["--host", HOST, "--port", "1234"]


# --------------------------------------------------------------------------- the real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _request(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None,
             timeout: float = 600) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _multipart(fields: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = "medsegboundary7c1f"
    body = b""
    for name, (filename, content, mime) in fields.items():
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                 f"Content-Type: {mime}\r\n\r\n").encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its children (it runs in its own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def monailabel_python() -> Path:
    from monailabel_env import RegistryUnreachable, ensure_medseg, ensure_venv

    try:
        python = ensure_venv()
    except RegistryUnreachable as exc:
        pytest.skip(str(exc))
    ensure_medseg(python)
    return python


def _compat_summary(python: Path | str, out: Path) -> dict:
    script = Path(__file__).resolve().parent / "monailabel" / "compat_check.py"
    done = subprocess.run([str(python), str(script), str(SAMPLES), str(out)], capture_output=True, text=True,
                          timeout=600, cwd=out.parent)
    assert done.returncode == 0, f"{python}:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.monailabel
def test_medseg_runs_in_monailabel_env(monailabel_python: Path, tmp_path: Path) -> None:
    """medseg's readers, transforms and writers give the same results under MONAI Label's pins."""
    theirs = _compat_summary(monailabel_python, tmp_path / "monailabel")
    script = Path(__file__).resolve().parent / "monailabel" / "compat_check.py"
    spec = importlib.util.spec_from_file_location("compat_check", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "medseg").mkdir()
    ours = json.loads(json.dumps(module.main(SAMPLES, tmp_path / "medseg")))  # here, in medseg's own env
    assert theirs.pop("versions")["pydicom"].startswith("2.4")
    ours.pop("versions")
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        for field, expected in value.items():
            np.testing.assert_allclose(theirs[key][field], expected, rtol=1e-6, err_msg=f"{key}.{field}")


@pytest.fixture(scope="module")
def server(monailabel_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from monailabel_env import VENV, trained_weights

    work = tmp_path_factory.mktemp("monailabel")
    # bundles: the real configs, unmodified, plus weights from a one-epoch training run
    sources = []
    for name, dataset in SERVED.items():
        weights = trained_weights(monailabel_python, BUNDLES / name, SAMPLES / dataset)
        src = work / "bundles" / name
        shutil.copytree(BUNDLES / name, src, ignore=shutil.ignore_patterns("models", "eval", "runs"))
        (src / "models").mkdir()
        shutil.copyfile(weights, src / "models" / "model.pt")
        sources.append(src)
    monailabel = monailabel_python.parent / "monailabel"
    # `monailabel apps --download` (offline: the app ships in the wheel) once per venv, then a copy
    template = fetch_app(VENV / "medseg-apps" / "monaibundle", monailabel)
    app = work / "apps" / "monaibundle"
    shutil.copytree(template, app)
    summaries = prepare_app(app, sources)

    # studies: CT volumes, two of them labelled (MONAI Label trains on labels/final), and nuclei PNGs
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in ("case_000", "case_001", "case_003"):
        shutil.copyfile(SAMPLES / "ct_3d" / "images" / f"{case}.nii.gz", studies / f"{case}.nii.gz")
    for case in ("case_000", "case_001"):
        label = SAMPLES / "ct_3d" / "labels" / f"{case}.nii.gz"
        shutil.copyfile(label, studies / "labels" / "final" / label.name)
    for case in ("nuclei_00", "nuclei_01"):
        shutil.copyfile(SAMPLES / "nuclei_2d" / "images" / f"{case}.png", studies / f"{case}.png")

    port = _free_port()
    log = (work / "server.log").open("w")
    env = {**os.environ, "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    cmd = start_server_command(app, studies, list(summaries), host=HOST, port=port, monailabel=monailabel)
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
    )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log_tail = _tail(work / "server.log")
                pytest.fail(f"monailabel start_server exited ({proc.returncode}):\n{log_tail}")
            try:
                status, body = _request(f"{url}/info/", timeout=10)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready within 300 s:\n{_tail(work / 'server.log')}")
            time.sleep(2)
        yield {"url": url, "info": json.loads(body), "summaries": summaries, "studies": studies,
               "log": work / "server.log", "proc": proc}
    finally:
        _stop(proc)
        log.close()


def _tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:]


@pytest.mark.monailabel
def test_info_lists_models(server: dict) -> None:
    models = server["info"]["models"]
    for name, summary in server["summaries"].items():
        assert name in models, f"{name} missing from /info/: {list(models)}\n{_tail(server['log'])}"
        assert models[name]["labels"] == summary.labels
        assert models[name]["dimension"] == summary.dimension
    assert models["unet_ct_3d"]["dimension"] == 3 and models["unet_nuclei_2d"]["dimension"] == 2
    assert set(server["info"]["trainers"]) >= set(SERVED)


@pytest.mark.monailabel
def test_infer_3d_mask_on_source_grid(server: dict, tmp_path: Path) -> None:
    status, body = _request(f"{server['url']}/infer/unet_ct_3d?image=case_003&output=image", method="POST")
    assert status == 200, f"{body[:2000]!r}\n{_tail(server['log'])}"
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(body)
    mask, source = nib.load(out), nib.load(SAMPLES / "ct_3d" / "images" / "case_003.nii.gz")
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
    values = np.unique(np.asarray(mask.dataobj))
    assert set(values.tolist()) <= {0, 1}, values


@pytest.mark.monailabel
def test_infer_2d_mask_shape(server: dict, tmp_path: Path) -> None:
    query = "image=nuclei_01&output=image"
    status, body = _request(f"{server['url']}/infer/unet_nuclei_2d?{query}", method="POST")
    assert status == 200, f"{body[:2000]!r}\n{_tail(server['log'])}"
    out = tmp_path / "mask.png"
    out.write_bytes(body)
    mask = np.asarray(Image.open(out))
    source = np.asarray(Image.open(SAMPLES / "nuclei_2d" / "images" / "nuclei_01.png"))
    assert mask.shape == source.shape
    assert set(np.unique(mask).tolist()) <= {0, 1}


def _train(server: dict, model: str, timeout: float = 900) -> dict:
    url = server["url"]
    params = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False, "train_batch_size": 1}
    status, body = _request(f"{url}/train/{model}", method="POST", data=json.dumps(params).encode(),
                            headers={"Content-Type": "application/json"})
    assert status == 200, body[:2000]
    task_id = json.loads(body)["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = _request(f"{url}/train/", timeout=30)
        assert status == 200, body[:2000]
        task = json.loads(body)
        if task.get("id") == task_id and task.get("status") in ("DONE", "ERROR", "STOPPED"):
            return task
        time.sleep(3)
    pytest.fail(f"training {model} did not finish within {timeout} s:\n{_tail(server['log'])}")


def _assert_one_epoch(server: dict, task: dict) -> None:
    details = "\n".join(task.get("details", []))
    assert task["status"] == "DONE", f"{task}\n{_tail(server['log'])}"
    assert "Epoch[1] Complete" in details and "Training Finished" in details, details[-4000:]


@pytest.mark.monailabel
def test_train_one_epoch_each(server: dict) -> None:
    url, studies = server["url"], server["studies"]
    _assert_one_epoch(server, _train(server, "unet_ct_3d"))
    # a user now labels the nuclei images (Slicer's "Submit Label" = PUT /datastore/label) and trains
    # the 2D model on them; the CT labels leave the datastore so the 2D model sees only 2D pairs
    for case in ("case_000", "case_001"):
        status, body = _request(f"{url}/datastore/label?id={case}&tag=final", method="DELETE")
        assert status == 200, body[:2000]
    for case in ("nuclei_00", "nuclei_01"):
        label = (SAMPLES / "nuclei_2d" / "labels" / f"{case}.png").read_bytes()
        body, ctype = _multipart({"label": (f"{case}.png", label, "image/png")})
        status, answer = _request(f"{url}/datastore/label?image={case}&tag=final", method="PUT", data=body,
                                  headers={"Content-Type": ctype})
        assert status == 200, answer[:2000]
    final = sorted(p.name for p in (studies / "labels" / "final").iterdir())
    assert final == ["nuclei_00.png", "nuclei_01.png"]
    _assert_one_epoch(server, _train(server, "unet_nuclei_2d"))
