"""Bundle access: a MONAI bundle's configs, metadata and weights, read one way for every consumer.

``medseg predict``, the MONAI Label preparation and the quality benchmarks all read a bundle through
these functions, so they accept the same checkpoints and see the same metadata:

* :func:`read_state_dict`: ``models/model.pt`` in every layout MONAI and PyTorch save: a bare state
  dict, ``{"model": sd}`` (MONAI ``CheckpointSaver``, MONAI Label), ``{"state_dict": sd}`` (Lightning),
  ``{"network": sd}``, with or without the ``module.`` prefix of ``DistributedDataParallel`` /
  ``DataParallel``; loaded with ``torch.load(weights_only=True)`` (no code runs from the file);
* :func:`load_weights`: that state dict into a network, strictly (a mismatch is an error, never a
  half-loaded network), fp16-stored weights cast to the network's dtype;
* :func:`read_metadata`, :func:`network_io`: ``configs/metadata.json`` and what the network takes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BundleError",
    "label_channel_def",
    "load_weights",
    "network_io",
    "read_metadata",
    "read_state_dict",
    "sha256_file",
    "state_dict_mismatch",
]

#: keys under which trainers nest a state dict, tried in this order
_NESTED_KEYS = ("model", "state_dict", "network")
_DDP_PREFIX = "module."


class BundleError(ValueError):
    """A bundle (or one of its files) that cannot be used; the message names the path and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The state dict of a checkpoint file in any of the layouts of the module docstring."""
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BundleError(path, "checkpoint not found (train the bundle first, or pass --ckpt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BundleError(
            path, f"cannot load the checkpoint with weights_only=True: {type(e).__name__}: {reason}"
        ) from None
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, Mapping) else f"mapping with keys {list(obj)[:5]}"
        raise BundleError(path, f"expected a state dict (or {{'model': state_dict}}), got a {kind}")
    sd = dict(obj)
    if all(k.startswith(_DDP_PREFIX) for k in sd):
        sd = {k[len(_DDP_PREFIX) :]: v for k, v in sd.items()}
    return sd


def load_weights(network: Any, path: str | os.PathLike[str]) -> str:
    """Load a checkpoint into ``network`` strictly; returns the file's sha256.

    Floating-point tensors take the dtype of the parameter they load into (``load_state_dict`` copies into
    the existing tensors: weights stored in fp16 load into an fp32 network).
    """
    sd = read_state_dict(path)
    reason = state_dict_mismatch(network.state_dict(), sd)
    if reason:
        raise BundleError(path, f"checkpoint does not fit network_def: {reason}")
    network.load_state_dict(sd, strict=True)
    return sha256_file(path)


def state_dict_mismatch(expected: Mapping[str, Any], state: Mapping[str, Any]) -> str | None:
    """Why ``state`` does not load strictly into a network whose state dict is ``expected`` (``None``: it
    does): missing or unexpected keys, or the first tensor of another shape."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        return f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    for key, value in expected.items():
        if tuple(value.shape) != tuple(state[key].shape):
            return f"'{key}' has shape {tuple(state[key].shape)}, the network expects {tuple(value.shape)}"
    return None


def read_metadata(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``configs/metadata.json`` of a bundle (``{}`` when absent or unreadable)."""
    try:
        with open(Path(bundle_dir) / "configs" / "metadata.json", encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def label_channel_def(meta: Mapping[str, Any]) -> Any:
    """The label value -> name mapping of the bundle's written masks: ``channel_def`` of the first
    ``post_processed_outputs`` entry when the metadata has one (e.g. a 1-channel sigmoid network whose
    masks hold 0 = background, 1 = tumour), else of the first network output."""
    fmt = meta.get("network_data_format", {}) if isinstance(meta, Mapping) else {}
    for section in ("post_processed_outputs", "outputs"):
        entries = fmt.get(section) if isinstance(fmt, Mapping) else None
        first = next(iter(entries.values()), None) if isinstance(entries, Mapping) and entries else None
        if isinstance(first, Mapping) and "channel_def" in first:
            return first["channel_def"]
    return None


def network_io(meta: Mapping[str, Any], network_def: Any = None) -> dict[str, Any]:
    """What the network takes and gives, from ``network_def``'s config and the metadata:
    ``spatial_dims``, ``in_channels`` (``None`` when unknown) and ``labels`` (:func:`label_channel_def`)."""
    fmt = meta.get("network_data_format", {}) if isinstance(meta, Mapping) else {}
    inp = next(iter(fmt.get("inputs", {}).values()), {}) if isinstance(fmt, Mapping) else {}
    net = network_def if isinstance(network_def, Mapping) else {}
    dims = net.get("spatial_dims") or (len(inp["spatial_shape"]) if "spatial_shape" in inp else None)
    chans = net.get("in_channels") or inp.get("num_channels")
    return {
        "spatial_dims": dims if isinstance(dims, int) else None,
        "in_channels": chans if isinstance(chans, int) else None,
        "labels": label_channel_def(meta),
    }
