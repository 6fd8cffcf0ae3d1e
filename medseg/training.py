"""Small glue the bundles' training configs need on top of MONAI's workflows.

- :func:`bundle_root`: the folder of the bundle whose config is being run, so that ``bundle_root`` and
  ``dataset_dir`` do not depend on the working directory (MONAI itself offers no such value).
- :func:`require_dir`: a bundle's default ``dataset_dir`` that exists only on some machines, with a hint
  where to get the data when it is missing.
- :func:`bundle_dataset_dir`: the default ``dataset_dir``, inside the bundle (``data/``), else the sample
  data of this source checkout for its own bundles, else a message saying where data goes.
- :class:`OutputCropLoss`: lets MONAI's ``SupervisedTrainer`` (which calls ``loss(pred, label)``) train a
  valid-convolution U-Net, whose output is smaller than its input, with a per-pixel weight map.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["OutputCropLoss", "bundle_dataset_dir", "bundle_root", "center_crop_to", "require_dir"]


def bundle_root(name: str | None = None) -> str:
    """The root folder of the bundle whose config is being parsed, as an absolute path.

    ``ConfigWorkflow`` (what ``python -m monai.bundle run`` and ``torchrun ... -m monai.bundle run``
    build) knows the folder of its config files (``config_root_path``, the bundle's ``configs/``), but the
    config cannot refer to it. This walks up the call stack to the ``ConfigWorkflow`` evaluating the
    expression and returns that folder's parent, so a bundle runs the same from any working directory.
    Outside a ``ConfigWorkflow`` (a bare ``ConfigParser``, e.g. MONAI Label, which overrides
    ``bundle_root`` anyway) it falls back to ``bundles/<name>`` of this source checkout when ``name`` is
    given and that folder exists, else to the working directory (MONAI's own convention).
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, ConfigWorkflow):
                root = Path(obj.config_root_path)
                root = root.parent if root.name == "configs" else root
                return str(root.resolve())
            frame = frame.f_back
    finally:
        del frame
    if name is not None:
        candidate = Path(__file__).resolve().parent.parent / "bundles" / name
        if (candidate / "configs").is_dir():
            return str(candidate)
    return os.getcwd()


def require_dir(path: str | os.PathLike[str], hint: str) -> str:
    """``path`` as an absolute path if it is a folder; else ``FileNotFoundError`` saying ``hint``.

    For a bundle whose default data folder is a public dataset that is not shipped: a run without
    ``--dataset_dir`` then stops with where to get the data instead of an empty-datalist error.
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} not found: {hint}")
    return str(folder)


def center_crop_to(x: torch.Tensor, spatial_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Center-crop the spatial dims (all after the first two) of ``x`` to ``spatial_shape``.

    The crop matches the valid U-Net's output window (output = input - 2 * border, centred; paper Fig. 2), the
    same centring rule as the skip-connection crops of the paper (Sec. 2).
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    have = tuple(x.shape[2:])
    if len(have) != len(spatial_shape):
        raise ValueError(f"cannot crop a tensor of shape {tuple(x.shape)} to spatial shape {spatial_shape}")
    if have == spatial_shape:
        return x
    if any(h < s or (h - s) % 2 for h, s in zip(have, spatial_shape, strict=True)):
        raise ValueError(
            f"label of spatial shape {have} cannot be centre-cropped to the network output {spatial_shape}"
        )
    starts = [(h - s) // 2 for h, s in zip(have, spatial_shape, strict=True)]
    crop = [slice(a, a + s) for a, s in zip(starts, spatial_shape, strict=True)]
    return x[(slice(None), slice(None), *crop)]


class OutputCropLoss(nn.Module):
    """Adapt ``loss`` to the trainer's ``loss(pred, label)`` call for a valid-convolution network.

    The label is centre-cropped to the prediction's spatial size (the input patch carries the context
    border, the output does not). With ``weighted=True`` the label holds two channels, the class index and
    the per-pixel weight map w(x) of Eq. (2) of the paper (stacked by ``ConcatItemsd``), and the wrapped
    loss is called as ``loss(pred, target, weight)`` (e.g. :class:`medseg.losses.WeightedCrossEntropyLoss`);
    otherwise as ``loss(pred, label)``.
    """

    def __init__(self, loss: nn.Module, weighted: bool = False) -> None:
        super().__init__()
        self.loss = loss
        self.weighted = weighted

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = center_crop_to(label, pred.shape[2:])
        if not self.weighted:
            return self.loss(pred, label)
        if label.shape[1] != 2:
            raise ValueError(
                "weighted=True expects a 2-channel label (class index, weight map), "
                f"got shape {tuple(label.shape)}"
            )
        return self.loss(pred, label[:, :1], label[:, 1:])


def bundle_dataset_dir(root: str | os.PathLike[str], sample: str | None = None, hint: str = "") -> str:
    """The default ``dataset_dir`` of the bundle at ``root``, found without leaving the bundle.

    In order: ``<root>/data`` when it is a folder (where a copied or exported bundle keeps its data);
    for a bundle that is part of this source checkout (``<checkout>/bundles/<name>``), the checkout's
    ``sample_data/<sample>``. Anything else raises ``FileNotFoundError`` naming where the data goes and
    how ``--dataset_dir`` points the bundle at a folder elsewhere; ``hint`` adds where to get the data.
    """
    bundle = Path(root).expanduser().resolve()
    local = bundle / "data"
    if local.is_dir():
        return str(local)
    checkout = Path(__file__).resolve().parent.parent
    if sample and bundle.parent == checkout / "bundles" and (checkout / "sample_data" / sample).is_dir():
        return str(checkout / "sample_data" / sample)
    get = f" {hint.rstrip('.')}." if hint else ""
    sample_cmd = ""
    if sample:
        sample_cmd = f" Sample data: `medseg sample-data --out DIR --datasets {sample}`, then DIR/{sample}."
    raise FileNotFoundError(
        f"no dataset for the bundle {bundle}: put it in {local} (layout: docs/README.md, section Data), or "
        "pass the folder that holds it with --dataset_dir, e.g. `python -m monai.bundle run training "
        f"--config_file {bundle / 'configs' / 'train.json'} --dataset_dir /path/to/data`.{get}{sample_cmd}"
    )
