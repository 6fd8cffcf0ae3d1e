"""A MONAI ``Inferer`` that runs another one (or the plain forward pass) in a chosen precision."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer

from medseg.precision import Precision, normalise_precision, resolve_precision

__all__ = ["MixedPrecisionInferer"]


def _as_float32(out: Any) -> Any:
    """Reduced-precision floating tensors in ``out`` (a tensor, sequence or mapping) cast to float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    if isinstance(out, Mapping):
        return type(out)({k: _as_float32(v) for k, v in out.items()})
    if isinstance(out, (list, tuple)):
        return type(out)(_as_float32(v) for v in out)
    return out


class MixedPrecisionInferer(Inferer):
    """Run ``inferer`` under a :mod:`medseg.precision` setting; outputs come back as float32.

    MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` autocast on CUDA only; as the trainer's
    inferer (``engine.inferer(inputs, network)``) this brings bf16 autocast and channels-last layout to
    CPU training as well, while the parameters stay fp32 (master weights) and the loss, computed on the
    returned float32 prediction outside autocast, stays fp32. Backward runs through the same casts.

    Args:
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``, resolved for the input's device.
            fp16 training on CUDA also needs loss scaling: the trainer's ``amp`` (see
            :attr:`medseg.precision.Precision.grad_scaling`).
        inferer: the inferer to run (default ``SimpleInferer()``: ``network(inputs)``).

    With the plain forward pass (``SimpleInferer``) a ``MetaTensor`` input reaches the network as a plain
    tensor (MONAI's per-operation metadata handling would otherwise run in every layer, forward and
    backward) and the output gets the input's metadata back, as MONAI's propagation would give it.

    On CPU, the network's convolution weights are put in channels-last layout in place on the first call
    (values unchanged) unless it is wrapped in ``DistributedDataParallel``: prepare such a network before
    wrapping it (:func:`medseg.precision.prepare_network`).
    """

    def __init__(self, precision: str | Precision = "auto", inferer: Inferer | None = None) -> None:
        super().__init__()
        self.precision = precision if isinstance(precision, Precision) else normalise_precision(precision)
        self.inferer = inferer if inferer is not None else SimpleInferer()

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
        plan = resolve_precision(self.precision, inputs.device)
        if isinstance(network, torch.nn.Module):
            plan.prepare(network)
        x = plan.format_input(inputs)
        with plan.autocast():
            if isinstance(x, MetaTensor) and type(self.inferer) is SimpleInferer:
                out = network(x.as_tensor(), *args, **kwargs)
                if isinstance(out, torch.Tensor) and not isinstance(out, MetaTensor):
                    out = MetaTensor(out).copy_meta_from(x)
            else:
                out = self.inferer(x, network, *args, **kwargs)
        return _as_float32(out)
