"""The MONAI bundles: metadata, network I/O, workflow properties, and a real 1-epoch train /
evaluate / infer / export cycle on tiny subsets of the sample data (CPU); the EM bundle, which has no
sample data, on crops of three slices of the ISBI 2012 EM stack (skipped where that stack is absent).

Each bundle is copied to a temporary folder (so a user's ``models/`` is never touched, and the runs
prove that ``bundle_root`` follows the config file, not the working directory); commands run from yet
another working directory, with ``--dataset_dir`` pointing at the repository's sample data.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"
NAMES = ("unet_nuclei_2d", "unet_brain_tumor_mri", "unet_ct_3d", "unet_em_isbi2012")
DATASETS = {"unet_nuclei_2d": "nuclei_2d", "unet_brain_tumor_mri": "brain_mri_mat", "unet_ct_3d": "ct_3d"}
EM = "unet_em_isbi2012"
EM_DATA = REPO.parent / "shared" / "datasets" / "isbi2012_em"  # the EM bundle's default dataset_dir
CONFIG_FILES = (
    "train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "metadata.json", "logging.conf",
)

# tiny, fast settings per bundle (1 epoch, 2 training cases, 1 validation case, small patches)
QUICK: dict[str, dict[str, str]] = {
    "unet_nuclei_2d": {"patch_size": "[124,124]", "tile_size": "[156,156]", "batch_size": "2"},
    "unet_brain_tumor_mri": {
        "image_size": "[64,64]", "patch_size": "[32,32]", "samples_per_image": "1", "batch_size": "2",
    },
    "unet_ct_3d": {"patch_size": "[32,32,16]", "tile_size": "[48,48,24]", "samples_per_volume": "1"},
    EM: {"patch_size": "[204,204]", "tile_size": "[380,380]", "batch_size": "2", "samples_per_image": "1"},
}
COMMON = {
    "epochs": "1",
    "val_interval": "1",
    "num_workers": "0",
    "train_list": "$medseg.data.datalist.load_datalist(@dataset_dir, 'training')[:2]",
    "val_list": "$medseg.data.datalist.load_datalist(@dataset_dir, 'validation')[:1]",
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _args(overrides: dict[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in overrides.items():
        out += [f"--{k}", v]
    return out


def _typed(overrides: dict[str, str]) -> dict[str, object]:
    """CLI-style string overrides as Python values (what ``fire`` makes of them on the command line)."""
    return {k: json.loads(v) if v[0] in "[0123456789" else v for k, v in overrides.items()}


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{tail}"
    return proc


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's sample data, or a freshly generated copy if it is not there."""
    root = REPO / "sample_data"
    if all((root / d / "datalist.json").is_file() for d in DATASETS.values()):
        return root
    from medseg.data.sample_data import generate_sample_data

    out = tmp_path_factory.mktemp("sample_data")
    for d in DATASETS.values():
        generate_sample_data(out, [d])
    return out


@pytest.fixture(scope="session")
def em_crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256x256 crops of EM slices 0, 1 (training) and 25 (validation, test) with a ``datalist.json``."""
    if not EM_DATA.is_dir():
        pytest.skip(f"needs the ISBI 2012 EM slices in {EM_DATA}")
    from PIL import Image

    root = tmp_path_factory.mktemp("isbi2012_crops")
    lists: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    for k, splits in ((0, ["training"]), (1, ["training"]), (25, ["validation", "test"])):
        item = {}
        for kind in ("images", "labels"):
            (root / kind).mkdir(exist_ok=True)
            Image.open(EM_DATA / kind / f"{k}.png").crop((0, 0, 256, 256)).save(root / kind / f"{k}.png")
            item[kind[:-1]] = f"{kind}/{k}.png"
        for split in splits:
            lists[split].append(item if split != "test" else {"image": item["image"]})
    (root / "datalist.json").write_text(json.dumps(lists))
    return root


def _data(name: str, sample_root: Path, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("em_crops") if name == EM else sample_root / DATASETS[name]


def _copy_bundle(name: str, dest: Path) -> Path:
    target = dest / name
    shutil.copytree(BUNDLES / name, target, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    return target


@pytest.mark.parametrize("name", NAMES)
def test_bundle_layout_and_metadata(name: str) -> None:
    root = BUNDLES / name
    for f in CONFIG_FILES:
        assert (root / "configs" / f).is_file(), f"{name}: configs/{f} missing"
    assert "Apache License" in (root / "LICENSE").read_text()
    assert (root / "docs" / "README.md").is_file()
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image"] and list(fmt["outputs"]) == ["pred"]
    from medseg.bundle import label_channel_def

    assert label_channel_def(meta)["0"] == "background"
    text = (root / "configs" / "inference.json").read_text()
    assert "_meta_" not in text, "MONAI Label cannot resolve _meta_ in inference.json"
    train = json.loads((root / "configs" / "train.json").read_text())
    # MONAI Label reads these ids literally
    assert "network" in train and "network_def" in train
    assert isinstance(train["train"]["handlers"], list)
    assert "run" in train and "training" in train
    # multi_gpu_train.json disables these by index on ranks > 0 (one log / TensorBoard writer per run)
    multi = json.loads((root / "configs" / "multi_gpu_train.json").read_text())
    for key in [k for k in multi if k.endswith("#_disabled_")]:
        section, _, index, _ = key.split("#")
        target = train[section]["handlers"][int(index)]["_target_"]
        assert target in ("StatsHandler", "TensorBoardStatsHandler"), f"{key} -> {target}"
    if not SCHEMA.is_file():
        pytest.skip(f"schema {SCHEMA} absent")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("name", NAMES)
def test_metadata_is_true(name: str) -> None:
    """Installable pins that satisfy medseg's own requirements, channel_def per channel, value ranges,
    eval_metrics where weights ship, a changelog entry for the version, all checked against the schema."""
    import importlib.metadata

    from packaging.requirements import Requirement

    root = BUNDLES / name
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    own = {Requirement(r).name.lower(): Requirement(r) for r in importlib.metadata.requires("medseg") or []}
    pins = meta["required_packages_version"]
    assert "medseg" not in {k.lower() for k in pins} and meta["medseg_version"]
    for pkg, version in pins.items():
        assert version and "+" not in version, f"{pkg}=={version}"
        req = own.get(pkg.lower())
        if req is not None and not req.marker:
            assert req.specifier.contains(version, prereleases=True), f"{pkg}=={version} vs medseg's {req}"
    for section in ("inputs", "outputs", "post_processed_outputs"):
        for key, tensor in meta["network_data_format"].get(section, {}).items():
            assert len(tensor["value_range"]) == 2, f"{section}.{key}: value_range"
            channels = sorted(int(k) for k in tensor.get("channel_def", {}))
            if tensor["format"] != "labels":
                assert channels == list(range(tensor["num_channels"])), f"{section}.{key}: channel_def"
    if (root / "models" / "model.pt").is_file():
        assert meta["eval_metrics"] and all(v is not None for v in meta["eval_metrics"].values())
    if not SCHEMA.is_file():
        pytest.skip(f"schema {SCHEMA} absent")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("name", NAMES[:3])
def test_readme_has_the_zoo_sections(name: str) -> None:
    text = (BUNDLES / name / "docs" / "README.md").read_text()
    headings = [line[3:].lower() for line in text.splitlines() if line.startswith("## ")]
    sections = ("model overview", "data", "input and output", "commands", "performance", "resuming training",
                "export", "system configuration", "authors", "references", "license")
    for section in sections:
        assert any(h.startswith(section) for h in headings), f"{name}: no '## {section}' section"


def test_record_environment(tmp_path: Path) -> None:
    """``medseg bundle record-env`` writes the installed versions and keeps medseg out of the pins."""
    import importlib.metadata

    bundle = _copy_bundle("unet_ct_3d", tmp_path)
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["required_packages_version"].update({"medseg": "0.0.1", "fire": "0.4.0"})
    meta["monai_version"] = "1.0.0"
    meta_file.write_text(json.dumps(meta))
    from medseg.cli import main

    assert main(["bundle", "record-env", str(bundle)]) == 0
    meta = json.loads(meta_file.read_text())
    assert meta["monai_version"] == importlib.metadata.version("monai").split("+")[0]
    assert meta["required_packages_version"]["fire"] == importlib.metadata.version("fire")
    assert "medseg" not in meta["required_packages_version"]
    assert meta["medseg_version"] == importlib.metadata.version("medseg")


@pytest.mark.parametrize("name", NAMES[:3])
def test_copied_bundle_says_where_data_goes(name: str, tmp_path: Path, sample_root: Path) -> None:
    """A bundle outside this checkout has no data by default: the message names its data/ folder and
    --dataset_dir; with data/ in the bundle, that folder is the default."""
    from monai.bundle import ConfigWorkflow

    bundle = _copy_bundle(name, tmp_path / "zoo" / "models")
    for config, kind in (("train.json", "train"), ("inference.json", "infer")):
        # properties are read inside ConfigWorkflow, as in a run (bundle_root follows the config file)
        wf = ConfigWorkflow(
            config_file=str(bundle / "configs" / config), workflow_type=kind, logging_file=False
        )
        wf.initialize()
        with pytest.raises(RuntimeError) as info:  # MONAI wraps the error of an expression
            wf.dataset_dir  # noqa: B018
        assert isinstance(info.value.__cause__, FileNotFoundError)
        text = str(info.value.__cause__)
        assert str(bundle / "data") in text and "--dataset_dir" in text, text
        assert "sample-data" in text
    shutil.copytree(sample_root / DATASETS[name], bundle / "data")
    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"), workflow_type="train", logging_file=False
    )
    wf.initialize()
    assert Path(wf.dataset_dir) == (bundle / "data").resolve()
    assert Path(wf.bundle_root) == bundle.resolve()


@pytest.mark.parametrize("name", NAMES)
def test_net_in_out_and_properties(
    name: str,
    tmp_path: Path,
    sample_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    from monai.bundle import ConfigWorkflow, verify_net_in_out

    configs = BUNDLES / name / "configs"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        device="cpu",
    )
    monkeypatch.chdir(tmp_path)  # another working directory: paths must still resolve to the bundle
    data_dir = _data(name, sample_root, request)
    for config in ("train.json", "inference.json"):
        wf = ConfigWorkflow(config_file=str(configs / config), workflow_type=None, logging_file=False)
        assert Path(wf.parser.get_parsed_content("bundle_root")) == (BUNDLES / name).resolve()
        dataset_dir = Path(wf.parser.get_parsed_content("dataset_dir")).resolve()
        assert dataset_dir == (EM_DATA if name == EM else REPO / "sample_data" / DATASETS[name]).resolve()

    # check_properties instantiates every property (datasets included): use a copy and tiny lists
    bundle = _copy_bundle(name, tmp_path)
    data = {"dataset_dir": str(data_dir)}
    train = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"), workflow_type="train", logging_file=False,
        **_typed({**COMMON, **data}),
    )
    train.initialize()
    assert train.check_properties() == []
    infer = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"), workflow_type="infer", logging_file=False,
        datalist="$medseg.data.datalist.load_datalist(@dataset_dir, 'test')[:1]", **data,
    )
    infer.initialize()
    assert infer.check_properties() == []


def _check_model(bundle: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert isinstance(sd, dict), "model.pt is not a state dict"
    assert all(isinstance(v, torch.Tensor) for v in sd.values()), "model.pt is not a plain state dict"
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point()), "weights not fp32"
    return sd


def _check_masks(name: str, out_dir: Path, items: list[dict]) -> None:
    import nibabel as nib
    from PIL import Image

    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    masks = [p for p in files if "_seg" in p.name]
    assert len(masks) == len(items), f"{[m.name for m in files]} for {len(items)} inputs"
    # the nuclei bundle also writes instance labels; the others write masks only
    assert len(files) == len(items) * (2 if name == "unet_nuclei_2d" else 1), [m.name for m in files]
    for item in items:
        src = Path(item["image"])
        stem = src.name.split(".")[0]
        mask = next(m for m in masks if m.name.startswith(stem + "_seg"))
        if name in ("unet_nuclei_2d", EM):
            arr = np.asarray(Image.open(mask))
            assert arr.shape == np.asarray(Image.open(src)).shape
            assert set(np.unique(arr)) <= {0, 1}
            if name == EM:
                continue
            inst = np.asarray(Image.open(out_dir / f"{stem}_instances.png"))
            assert inst.shape == arr.shape and inst.dtype == np.uint16
            ids = np.unique(inst)
            assert list(ids) == list(range(len(ids)))  # background 0, then 1..N
        elif name == "unet_brain_tumor_mri":
            arr = np.asarray(nib.load(mask).dataobj).squeeze()
            assert arr.shape == (512, 512)
            assert set(np.unique(arr)) <= {0, 1}
        else:
            img, seg = nib.load(src), nib.load(mask)
            assert seg.shape[:3] == img.shape[:3]
            np.testing.assert_allclose(seg.affine, img.affine, atol=1e-4)
            assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


@pytest.mark.parametrize("name", NAMES)
def test_train_evaluate_infer_export(
    name: str,
    tmp_path: Path,
    sample_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    from medseg.data.datalist import load_datalist

    bundle = _copy_bundle(name, tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    configs = bundle / "configs"
    data = str(_data(name, sample_root, request))
    overrides = {**COMMON, **QUICK[name], "dataset_dir": data}
    py = [sys.executable, "-m", "monai.bundle", "run"]
    monkeypatch.chdir(cwd)

    _run(py + ["training", "--config_file", str(configs / "train.json"), *_args(overrides)], cwd)
    sd = _check_model(bundle)
    assert (bundle / "eval" / "training_curves.png").stat().st_size > 1000
    # resumable training: the last epoch's state and the best metric are saved
    state = torch.load(bundle / "models" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["epoch"] == 1 and set(state) >= {"network", "optimizer", "rng"}
    assert len(state["extra"]["curves"]["losses"]) == 1  # the training curves continue after a resume
    if name != EM:  # the EM bundle ships its final model (its held-out slices are the evaluation set)
        assert json.loads((bundle / "models" / "model_key_metric.json").read_text())["saved"]
    assert list((bundle / "eval").glob("events.out.tfevents.*")), "no TensorBoard log"

    # evaluation, inference and export run in-process (same code path as the CLI, without the start-up cost)
    from monai.bundle import run

    run(config_file=[str(configs / "train.json"), str(configs / "evaluate.json")], **_typed(overrides))
    with open(bundle / "eval" / "val_mean_dice_raw.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["mean"]) <= 1.0
    if name == "unet_ct_3d":
        assert (bundle / "eval" / "val_hd95_raw.csv").is_file()

    test_items = load_datalist(data, "test")[:1]
    out_dir = tmp_path / "pred"
    infer_over = {k: v for k, v in QUICK[name].items() if k in ("tile_size", "image_size")}
    infer_over.update({
        "dataset_dir": data,
        "output_dir": str(out_dir),
        "datalist": "$medseg.data.datalist.load_datalist(@dataset_dir, 'test')[:1]",
    })
    run(config_file=str(configs / "inference.json"), **_typed(infer_over))
    _check_masks(name, out_dir, test_items)

    ts = bundle / "models" / "model.ts"
    # the CLI in a fresh process: scripting in this process after the runs above gave a None forward
    _run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(bundle / "models" / "model.pt"), "--meta_file", str(configs / "metadata.json"),
         "--config_file", str(configs / "inference.json")],
        cwd,
    )
    scripted = torch.jit.load(str(ts), map_location="cpu")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(sd)
    net.eval()
    shape = {"unet_nuclei_2d": (1, 1, 100, 100), "unet_brain_tumor_mri": (1, 1, 64, 64),
             "unet_ct_3d": (1, 1, 32, 32, 16), EM: (1, 1, 204, 204)}[name]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-4)


def test_multi_gpu_config_on_cpu_gloo(tmp_path: Path, sample_root: Path) -> None:
    """torchrun with 2 processes on CPU: DDP + DistributedSampler over gloo, one best model saved."""
    name = "unet_ct_3d"
    bundle = _copy_bundle(name, tmp_path)
    configs = bundle / "configs"
    files = f"['{configs / 'train.json'}','{configs / 'multi_gpu_train.json'}']"
    overrides = {**COMMON, **QUICK[name], "dataset_dir": str(sample_root / DATASETS[name])}
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "monai.bundle", "run", "training", "--config_file", files, *_args(overrides)]
    _run(env_cmd, tmp_path)
    _check_model(bundle)
    assert (bundle / "eval" / "training_curves.png").is_file()
    # only rank 0 writes TensorBoard logs: one training and one validation writer, one process id
    logs = sorted((bundle / "eval").glob("events.out.tfevents.*"))
    assert len(logs) == 2, [p.name for p in logs]
    assert len({p.name.split(".")[-2] for p in logs}) == 1, [p.name for p in logs]
