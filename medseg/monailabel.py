"""Prepare a MONAI Label ``monaibundle`` app that serves medseg bundles.

MONAI Label (0.8.x) skips a bundle it cannot use with at most a log line: a bundle without
``models/model.pt`` is "ignored", a ``train#handlers`` that is not a literal list breaks only when a
user starts training, a state dict that does not match ``network_def`` is loaded with
``strict=False`` and serves garbage, a missing ``spatial_shape`` silently makes a 2D model 3D. This
module checks a bundle for exactly what MONAI Label's ``BundleInferTask`` / ``BundleTrainTask``
read (see ``monailabel/tasks/{infer,train}/bundle.py``) and raises :class:`BundleError` naming the
bundle and the reason, then copies (or links) the bundles into ``<app>/model/<name>``.

It needs only MONAI and torch (not MONAI Label itself), so it runs in medseg's own environment;
fetching the app template (:func:`fetch_app`) calls the ``monailabel`` command of MONAI Label's
environment.

Command line: ``python -m medseg.monailabel prepare --app APP BUNDLE [BUNDLE ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BundleError",
    "BundleSummary",
    "add_prepare_parser",
    "check_bundle",
    "fetch_app",
    "main",
    "prepare_app",
    "run_prepare",
    "start_server_command",
]

#: Config file names MONAI Label looks for, in its order (``.yml`` is *not* read).
INFER_CONFIGS: tuple[str, ...] = ("inference.json", "inference.yaml")
TRAIN_CONFIGS: tuple[str, ...] = ("train.json", "train.yaml")
MULTI_GPU_CONFIGS: tuple[str, ...] = ("multi_gpu_train.json", "multi_gpu_train.yaml")
#: Ids ``BundleInferTask`` reads (``bundle_root`` and ``device`` it overrides itself).
INFER_IDS: tuple[str, ...] = ("network_def", "preprocessing", "inferer", "postprocessing")
#: Ids ``BundleTrainTask`` overrides or references; it runs ``monai.bundle.run(run_id="run")``.
TRAIN_IDS: tuple[str, ...] = (
    "network",
    "train#trainer#max_epochs",
    "train#dataset#data",
    "train#handlers",
    "validate#dataset#data",
    "run",
)
#: Folders of a bundle that are outputs of earlier runs, not part of what the app serves.
# training state stays behind too: MONAI Label trains on its own labels and validation list, where the
# best metric of an earlier training (models/model_key_metric.json) is no yardstick
_SKIP_ON_COPY: tuple[str, ...] = (
    "eval", "runs", "__pycache__", "*.pyc", ".ipynb_checkpoints", "checkpoint.pt", "*_key_metric.json",
)
_META_REF = re.compile(r"[@%]_meta_")


class BundleError(ValueError):
    """A bundle MONAI Label would skip or misuse; the message names the bundle folder and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"bundle {self.path}: {reason}")


@dataclass(frozen=True)
class BundleSummary:
    """What MONAI Label will report for a bundle in ``GET /info/`` (``models.<name>``)."""

    name: str
    path: Path
    labels: dict[str, int]
    dimension: int
    version: str
    description: str
    trainable: bool
    image_key: str = "image"
    pred_key: str = "pred"
    warnings: list[str] = field(default_factory=list)


def _find_config(path: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        candidate = path / "configs" / name
        if candidate.is_file():
            return candidate
    return None


def _load_config(bundle: Path, file: Path) -> dict[str, Any]:
    from monai.bundle import ConfigParser

    try:
        config = ConfigParser.load_config_file(file)
    except Exception as exc:  # json/yaml syntax errors come in several types
        raise BundleError(bundle, f"cannot parse {file.relative_to(bundle)}: {exc}") from exc
    if not isinstance(config, dict):
        raise BundleError(bundle, f"{file.relative_to(bundle)} is not a mapping of ids")
    return config


def _lookup(config: Mapping[str, Any], config_id: str) -> tuple[bool, Any]:
    node: Any = config
    for part in config_id.split("#"):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _check_no_meta_refs(bundle: Path, file: Path) -> None:
    text = file.read_text(encoding="utf-8")
    match = _META_REF.search(text)
    if match:
        line = text.count("\n", 0, match.start()) + 1
        raise BundleError(
            bundle,
            f"{file.relative_to(bundle)} line {line} refers to '_meta_'; MONAI Label parses the config "
            "without metadata.json, so write the value literally",
        )


def _check_metadata(bundle: Path) -> tuple[str, str, dict[str, int], int, str, str]:
    meta_file = bundle / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise BundleError(bundle, "configs/metadata.json is missing")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(bundle, f"configs/metadata.json is not valid JSON: {exc}") from exc
    fmt = meta.get("network_data_format") if isinstance(meta, dict) else None
    if not isinstance(fmt, dict):
        raise BundleError(bundle, "configs/metadata.json has no 'network_data_format' mapping")
    inputs, outputs = fmt.get("inputs"), fmt.get("outputs")
    if not isinstance(inputs, dict) or not inputs:
        raise BundleError(
            bundle, "metadata network_data_format.inputs is empty (MONAI Label reads its first key)"
        )
    if not isinstance(outputs, dict) or not outputs:
        raise BundleError(
            bundle, "metadata network_data_format.outputs is empty (MONAI Label reads its first key)"
        )
    image_key, image = next(iter(inputs.items()))
    pred_key, pred = next(iter(outputs.items()))
    post = fmt.get("post_processed_outputs")
    if isinstance(post, dict) and isinstance(post.get(pred_key), dict) and "channel_def" in post[pred_key]:
        pred = post[pred_key]  # the mask's label values (MONAI Label names the written mask's labels)
    shape = image.get("spatial_shape") if isinstance(image, dict) else None
    if not isinstance(shape, list) or len(shape) not in (2, 3):
        raise BundleError(
            bundle,
            f"metadata inputs.{image_key}.spatial_shape must list 2 or 3 sizes (MONAI Label takes the "
            f"dimension from its length and assumes 3D when it is missing), got {shape!r}",
        )
    channel_def = pred.get("channel_def") if isinstance(pred, dict) else None
    if not isinstance(channel_def, dict) or not channel_def:
        raise BundleError(
            bundle, f"metadata outputs.{pred_key}.channel_def is missing (MONAI Label's labels)"
        )
    labels: dict[str, int] = {}
    for index, name in channel_def.items():
        if not str(index).isdigit() or not isinstance(name, str):
            raise BundleError(
                bundle, f"metadata outputs.{pred_key}.channel_def entry {index!r}: {name!r} not 'int: name'"
            )
        if name.lower() != "background":
            labels[name.lower()] = int(index)
    if not labels:
        raise BundleError(
            bundle, f"metadata outputs.{pred_key}.channel_def names no label besides background"
        )
    for key in ("version", "description"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise BundleError(
                bundle, f"configs/metadata.json has no '{key}' string (MONAI Label shows it in /info/)"
            )
    return image_key, pred_key, labels, len(shape), meta["version"], meta["description"]


def _load_state_dict(bundle: Path, weights: Path) -> dict[str, Any]:
    """The checkpoint's state dict, in any layout ``medseg predict`` accepts (:mod:`medseg.bundle`)."""
    from medseg import bundle as bundle_access

    try:
        return bundle_access.read_state_dict(weights)
    except bundle_access.BundleError as exc:
        raise BundleError(bundle, f"models/{weights.name}: {exc.reason}") from None


def _monailabel_reads(weights: Path) -> bool:
    """Whether MONAI Label reads the checkpoint as it is: a bare state dict or ``{"model": state_dict}``
    without a ``module.`` prefix (``BasicInferTask`` loads other layouts with ``strict=False``, i.e. not)."""
    import torch

    obj = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        return False
    return not all(str(k).startswith("module.") for k in obj)


def _normalise_weights(bundle: Path) -> None:
    """Rewrite ``models/model.pt`` of an installed copy as a bare state dict when MONAI Label would not
    read its layout (``{"state_dict": ...}``, a DDP ``module.`` prefix): the same checkpoints as
    ``medseg predict`` then serve the trained network."""
    import torch

    weights = bundle / "models" / "model.pt"
    if weights.is_file() and not _monailabel_reads(weights):
        torch.save(_load_state_dict(bundle, weights), weights)


def _check_weights(bundle: Path, infer_file: Path, weights: Path) -> None:
    """Build ``network_def`` as MONAI Label does and compare its parameters with the checkpoint, strictly."""
    from monai.bundle import ConfigParser

    state = _load_state_dict(bundle, weights)
    parser = ConfigParser()
    parser.read_config(infer_file)
    parser.config.update({"bundle_root": str(bundle)})  # what BundleInferTask does
    sys.path.insert(0, str(bundle))  # bundle-local ``scripts`` package, as MONAI Label does
    try:
        network = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as exc:
        raise BundleError(bundle, f"network_def of {infer_file.name} cannot be built: {exc}") from exc
    finally:
        sys.path.remove(str(bundle))
    from medseg.bundle import state_dict_mismatch

    reason = state_dict_mismatch(network.state_dict(), state)
    if reason:
        raise BundleError(
            bundle,
            f"models/{weights.name} does not match network_def (MONAI Label would load it with strict=False "
            f"and serve an untrained network): {reason}",
        )


def check_bundle(
    path: str | os.PathLike[str], *, require_train: bool = True, check_weights: bool = True
) -> BundleSummary:
    """Check that MONAI Label's ``monaibundle`` app will serve (and, with ``require_train``, train) ``path``.

    Mirrors ``BundleInferTask`` / ``BundleTrainTask`` of MONAI Label 0.8: ``configs/inference.json``
    (or ``.yaml``) with the ids :data:`INFER_IDS` and no ``_meta_`` reference, ``models/model.pt``
    that loads into ``network_def`` with every key and shape matching (``check_weights``), and the
    parts of ``configs/metadata.json`` it reads. For training: ``configs/train.json`` with the ids
    :data:`TRAIN_IDS`, ``train#handlers`` a literal list, and ``configs/multi_gpu_train.json``
    (without it MONAI Label skips multi-GPU training). Raises :class:`BundleError`.
    """
    bundle = Path(path).resolve()
    if not bundle.is_dir():
        raise BundleError(bundle, "is not a folder")
    infer_file = _find_config(bundle, INFER_CONFIGS)
    if infer_file is None:
        yml = (bundle / "configs" / "inference.yml").exists()
        hint = " (.yml is not read: rename it to .yaml)" if yml else ""
        raise BundleError(bundle, f"no configs/{' or configs/'.join(INFER_CONFIGS)}{hint}")
    infer = _load_config(bundle, infer_file)
    _check_no_meta_refs(bundle, infer_file)
    for config_id in INFER_IDS:
        if not _lookup(infer, config_id)[0]:
            raise BundleError(bundle, f"{infer_file.name} has no '{config_id}' id (MONAI Label reads it)")

    weights = bundle / "models" / "model.pt"
    if not weights.is_file():
        raise BundleError(
            bundle,
            "models/model.pt is missing: MONAI Label would silently drop this model from /info/; train it "
            f"first (python -m monai.bundle run training --config_file {bundle / 'configs' / 'train.json'})",
        )
    image_key, pred_key, labels, dimension, version, description = _check_metadata(bundle)
    if check_weights:
        _check_weights(bundle, infer_file, weights)

    warnings: list[str] = []
    if dimension == 2:
        post = _lookup(infer, "postprocessing")[1]
        post = post.get("transforms", []) if isinstance(post, Mapping) else post
        targets = [str(t.get("_target_", "")).rsplit(".", 1)[-1] for t in post if isinstance(t, Mapping)]
        targets = [t for t in targets if t != "SaveImaged"]  # MONAI Label drops it
        if "SqueezeDimd" not in targets or "CastToTyped" not in targets:
            warnings.append(
                "2D postprocessing does not end in SqueezeDimd + CastToTyped(uint8): MONAI Label's ITK "
                "writer fails on a (1, H, W) float mask for PNG images"
            )
    train_file = _find_config(bundle, TRAIN_CONFIGS)
    trainable = train_file is not None
    if train_file is None:
        if require_train:
            raise BundleError(
                bundle, f"no configs/{' or configs/'.join(TRAIN_CONFIGS)}: MONAI Label cannot train it"
            )
    else:
        train = _load_config(bundle, train_file)
        _check_no_meta_refs(bundle, train_file)
        for config_id in TRAIN_IDS:
            if not _lookup(train, config_id)[0]:
                raise BundleError(
                    bundle, f"{train_file.name} has no '{config_id}' id (MONAI Label overrides or runs it)"
                )
        handlers = _lookup(train, "train#handlers")[1]
        if not isinstance(handlers, list):
            raise BundleError(
                bundle,
                f"{train_file.name}: 'train#handlers' must be a literal list (MONAI Label inserts a "
                f"CheckpointLoader into it), got {handlers!r}",
            )
        if _find_config(bundle, MULTI_GPU_CONFIGS) is None:
            message = "no configs/multi_gpu_train.json: MONAI Label skips training on a multi-GPU machine"
            if require_train:
                raise BundleError(bundle, message)
            warnings.append(message)
    return BundleSummary(
        name=bundle.name,
        path=bundle,
        labels=labels,
        dimension=dimension,
        version=version,
        description=description,
        trainable=trainable,
        image_key=image_key,
        pred_key=pred_key,
        warnings=warnings,
    )


def _monailabel_cmd(monailabel: str | os.PathLike[str]) -> list[str]:
    """How to run MONAI Label's CLI. Its ``monailabel`` script runs ``python -m monailabel.main`` with
    whatever ``python`` is first on ``PATH``; given a path inside a venv, call that venv's python."""
    path = Path(monailabel)
    if path.name.startswith("python"):
        return [os.fspath(path), "-m", "monailabel.main"]
    sibling = path.parent / "python"
    if path.parent != Path() and sibling.is_file():
        return [os.fspath(sibling), "-m", "monailabel.main"]
    return [os.fspath(monailabel)]


def fetch_app(app_dir: str | os.PathLike[str], monailabel: str | os.PathLike[str] = "monailabel") -> Path:
    """Copy MONAI Label's ``monaibundle`` sample app to ``app_dir`` (offline: it ships in the wheel).

    ``monailabel`` is the ``monailabel`` command (or the python) of MONAI Label's environment. Nothing
    is written to ``app_dir`` unless the copy succeeded.
    """
    app = Path(app_dir).resolve()
    if (app / "main.py").is_file():
        return app
    if app.exists() and any(app.iterdir()):
        raise FileExistsError(f"{app}: exists, is not empty and has no main.py; not a monaibundle app")
    app.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=app.parent, prefix=".monaibundle-") as tmp:
        cmd = [*_monailabel_cmd(monailabel), "apps", "--download", "--name", "monaibundle", "--output", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{monailabel}: MONAI Label's 'monailabel' command not found") from exc
        fetched = Path(tmp) / "monaibundle"
        if done.returncode != 0 or not (fetched / "main.py").is_file():
            raise RuntimeError(
                f"'{' '.join(cmd)}' failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        if app.exists():
            app.rmdir()
        fetched.rename(app)
    return app


def _install_bundle(src: Path, dst: Path, link: bool) -> None:
    """Put ``src`` at ``dst`` in one step (a copy is made aside and renamed), replacing what was there."""
    tmp: Path | None = None
    if link:
        tmp = dst.with_name(f".{dst.name}.link")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(src, target_is_directory=True)
    else:
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*_SKIP_ON_COPY), dirs_exist_ok=True)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def prepare_app(
    app_dir: str | os.PathLike[str],
    bundles: Iterable[str | os.PathLike[str]],
    *,
    link: bool = False,
    require_train: bool = True,
    check_weights: bool = True,
    monailabel: str | os.PathLike[str] | None = None,
) -> dict[str, BundleSummary]:
    """Check every bundle (:func:`check_bundle`), then put each at ``<app_dir>/model/<name>``.

    All bundles are checked before anything is written, so one bad bundle leaves the app untouched.
    ``link`` symlinks instead of copying (MONAI Label's training then writes into the source bundle:
    ``models/model.pt``, ``eval/``). With ``monailabel`` (the command of MONAI Label's environment)
    the ``monaibundle`` app is first fetched to ``app_dir`` when it is not there. Returns the
    summaries by model name, in the order given.
    """
    summaries: dict[str, BundleSummary] = {}
    for bundle in bundles:
        summary = check_bundle(bundle, require_train=require_train, check_weights=check_weights)
        if summary.name in summaries:
            raise BundleError(summary.path, f"two bundles named '{summary.name}'")
        summaries[summary.name] = summary
    if not summaries:
        raise ValueError("no bundle given")
    app = Path(app_dir).resolve()
    if monailabel is not None:
        fetch_app(app, monailabel)
    if not (app / "main.py").is_file():
        raise FileNotFoundError(
            f"{app}: no main.py; fetch the app first (monailabel apps --download --name monaibundle "
            f"--output {app.parent}) or give MONAI Label's monailabel command (--monailabel)"
        )
    model_dir = app / "model"
    model_dir.mkdir(exist_ok=True)
    for summary in summaries.values():
        weights = summary.path / "models" / "model.pt"
        if link and check_weights and weights.is_file() and not _monailabel_reads(weights):
            raise BundleError(
                summary.path,
                "models/model.pt is a checkpoint layout MONAI Label does not read (it would serve an "
                "untrained network); install a copy (without --link), which stores it as a plain state dict",
            )
        if link and _label_values_differ(summary.path):
            raise BundleError(
                summary.path,
                "metadata post_processed_outputs names the mask's labels, which MONAI Label reads from "
                "outputs only; install a copy (without --link), whose metadata is adapted",
            )
    for name, summary in summaries.items():
        _install_bundle(summary.path, model_dir / name, link)
        if not link:
            _normalise_weights(model_dir / name)
            _label_values_for_monailabel(model_dir / name)
    return summaries


def _label_values_differ(bundle: Path) -> bool:
    from medseg.bundle import label_channel_def, read_metadata

    meta = read_metadata(bundle)
    outputs = meta.get("network_data_format", {}).get("outputs", {})
    first = next(iter(outputs.values()), {}) if isinstance(outputs, dict) else {}
    labels = label_channel_def(meta)
    return labels is not None and isinstance(first, dict) and first.get("channel_def") != labels


def _label_values_for_monailabel(bundle: Path) -> None:
    """In an installed copy, give the first output the mask's label values (``post_processed_outputs``):
    MONAI Label names the labels of the mask it writes from ``outputs`` only."""
    from medseg.bundle import label_channel_def, read_metadata
    from medseg.io import atomic_write_text

    if not _label_values_differ(bundle):
        return
    meta = read_metadata(bundle)
    first = next(iter(meta["network_data_format"]["outputs"].values()))
    first["channel_def"] = label_channel_def(meta)
    atomic_write_text(bundle / "configs" / "metadata.json", json.dumps(meta, indent=4) + "\n")


def start_server_command(
    app_dir: str | os.PathLike[str],
    studies: str | os.PathLike[str],
    models: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    monailabel: str | os.PathLike[str] = "monailabel",
    extra_conf: Mapping[str, str] | None = None,
) -> list[str]:
    """The ``monailabel start_server`` command serving ``models`` from a prepared app, offline.

    ``zoo_source github`` keeps MONAI Label from asking the model zoo (it only downloads a name that
    is not in ``<app>/model``), ``sam2 false`` leaves out the SAM2 models (whose weights it downloads).
    """
    conf = {"models": ",".join(models), "zoo_source": "github", "sam2": "false", **(extra_conf or {})}
    cmd = [*_monailabel_cmd(monailabel), "start_server", "--app", os.fspath(app_dir)]
    cmd += ["--studies", os.fspath(studies)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    return [*cmd, "--host", host, "--port", str(port)]


def add_prepare_parser(sub: Any, name: str = "monailabel-prepare") -> argparse.ArgumentParser:
    """Add the ``prepare`` subcommand to an ``add_subparsers()`` object (``medseg monailabel-prepare``)."""
    p = sub.add_parser(name, help="check bundles and put them into a MONAI Label monaibundle app")
    p.add_argument("bundles", nargs="+", type=Path, help="bundle folders (e.g. bundles/unet_ct_3d)")
    p.add_argument("--app", type=Path, required=True, help="monaibundle app folder (e.g. apps/monaibundle)")
    p.add_argument("--link", action="store_true", help="symlink the bundles instead of copying them")
    p.add_argument("--no-train", action="store_true", help="do not require the training configs")
    p.add_argument("--monailabel", help="MONAI Label's 'monailabel' command, to fetch the app when missing")
    p.set_defaults(func=run_prepare)
    return p


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``prepare`` for parsed arguments; 0 on success, 2 with the reason on stderr otherwise."""
    try:
        summaries = prepare_app(
            args.app,
            args.bundles,
            link=args.link,
            require_train=not args.no_train,
            monailabel=args.monailabel,
        )
    except (BundleError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, s in summaries.items():
        kind = "trainable" if s.trainable else "inference only"
        print(f"{name}: {s.dimension}D, labels {s.labels}, {kind}")
        for warning in s.warnings:
            print(f"  warning: {warning}")
    print(" ".join(start_server_command(args.app, "STUDIES", list(summaries))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medseg.monailabel prepare --app APP BUNDLE...``: check and install bundles into an app."""
    parser = argparse.ArgumentParser(prog="python -m medseg.monailabel", description=__doc__.splitlines()[0])
    add_prepare_parser(parser.add_subparsers(dest="command", required=True), "prepare")
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
