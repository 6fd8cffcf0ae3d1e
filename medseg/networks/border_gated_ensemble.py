"""A two-network ensemble for touching objects: one network trained with the border term of the
weight map (Eq. 2 of Ronneberger et al., 2015, ``w0 > 0``), one trained without it (``w0 = 0``).

The border network cuts the one- or two-pixel gaps between touching objects (Sec. 3) but, pushed to
background near every border, misses dim objects; the plain network finds them but merges touching
ones. The ensemble keeps the mean's foreground and the border network's gaps: its foreground
probability is

    q = min((p_border + p_plain) / 2, p_border * 0.5 / gate)

so ``q > 0.5`` exactly where the mean exceeds 0.5 *and* the border network's own probability
exceeds ``gate``; elsewhere ``q`` is the mean probability (it scores the objects).

Test-time mirroring (nnU-Net's) can be given to the border network alone (``border_flip_axes``): its
logits are averaged over the mirrorings before the combination, while the plain network, whose
foreground only fills the mean, runs once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import List  # noqa: UP035 - TorchScript needs typing.List in annotations

import torch
from torch import nn

__all__ = ["BorderGatedEnsemble"]


class BorderGatedEnsemble(nn.Module):
    """Two binary segmentation networks (``out_channels=2``: background, foreground) as one.

    In eval mode ``forward`` returns ``log(1 - q), log(q)`` (``(B, 2, *spatial)``): its softmax is the
    ensemble's class probabilities and its argmax the gated mask, so inferers, flip averaging (a
    geometric mean of ``q``), post-processing and metrics treat it as one network. In training mode it
    returns both networks' logits stacked on the channel axis, ``(B, 4, *spatial)`` (border first), for
    :class:`medseg.losses.BorderGatedEnsembleLoss`, which trains each on its own loss.

    The shape arithmetic of a valid-convolution member (``border``, ``size_divisor``,
    ``valid_input_size`` ...) is the border network's; both members must agree on it.

    Args:
        border: the network trained with the weight map's border term.
        plain: the same architecture trained without it.
        gate: the border network's foreground probability below which a pixel stays background.
        border_flip_axes: spatial axes (0-based) along which the border network's input is also mirrored
            in eval mode, its logits averaged over all mirrorings of these axes (2 passes for one axis, 4
            for two); ``None`` or empty: one pass. Mirroring the whole ensemble instead is the inferer's
            ``flip_tta``.
    """

    __jit_unused_properties__ = ["border", "size_divisor"]
    # real types, not strings, for TorchScript; border_flips: the tensor dims of each extra mirrored pass
    __annotations__ = {"border_flip_axes": List[int], "border_flips": List[List[int]]}  # noqa: RUF012, UP006

    def __init__(
        self,
        border: nn.Module,
        plain: nn.Module,
        gate: float = 0.35,
        border_flip_axes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < gate <= 0.5:
            raise ValueError(f"gate must be in (0, 0.5], got {gate}")
        axes = sorted({int(a) for a in (border_flip_axes or ())})
        if any(a < 0 for a in axes):
            raise ValueError(f"border_flip_axes must be spatial axes >= 0, got {axes}")
        for name in ("border", "size_divisor"):
            a, b = getattr(border, name, None), getattr(plain, name, None)
            if a != b:
                raise ValueError(f"the two networks differ in {name}: {a} vs {b}")
        self.border_net = border
        self.plain_net = plain
        self.gate = float(gate)
        self.border_flip_axes = axes
        self.border_flips = [
            [2 + a for a in c] for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)
        ]

    def _border_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The border network's logits, averaged (in fp32) over the mirrorings of ``border_flip_axes``."""
        a = self.border_net(x)
        if self.training or len(self.border_flips) == 0:
            return a
        if x.dim() - 2 <= max(self.border_flip_axes):
            raise ValueError(f"border_flip_axes {self.border_flip_axes} out of range for input {x.shape}")
        # keep the input's layout (torch.flip returns a contiguous tensor; oneDNN runs channels-last)
        fmt = torch.contiguous_format
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            fmt = torch.channels_last
        elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            fmt = torch.channels_last_3d
        acc = a.float()
        for dims in self.border_flips:
            xf = torch.flip(x, dims).contiguous(memory_format=fmt)
            acc = acc + torch.flip(self.border_net(xf), dims).float()
        return acc / float(len(self.border_flips) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._border_logits(x)
        b = self.plain_net(x)
        if self.training:
            return torch.cat([a, b], dim=1)
        if a.shape[1] != 2 or b.shape[1] != 2:
            raise ValueError(f"both networks must give 2 channels, got {a.shape[1]} and {b.shape[1]}")
        # in fp32 (autocast keeps softmax and element-wise ops in their inputs' fp32)
        pa = torch.softmax(a.float(), dim=1)[:, 1:]
        pb = torch.softmax(b.float(), dim=1)[:, 1:]
        q = torch.minimum((pa + pb) * 0.5, pa * (0.5 / self.gate))
        return torch.cat([torch.log((1.0 - q).clamp_min(1e-30)), torch.log(q.clamp_min(1e-30))], dim=1)

    @property
    def border(self) -> int:
        """Context border per side of the members (0 for padded networks)."""
        return int(getattr(self.border_net, "border", 0) or 0)

    @property
    def size_divisor(self) -> int:
        """Pooling grid of the members (1 when they do not say)."""
        return int(getattr(self.border_net, "size_divisor", 1) or 1)

    @torch.jit.unused
    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Output size for ``input_size`` (the members')."""
        return self.border_net.output_size(input_size)

    @torch.jit.unused
    def is_valid_input_size(self, input_size: Sequence[int]) -> bool:
        """Whether the members accept ``input_size``."""
        return self.border_net.is_valid_input_size(input_size)

    @torch.jit.unused
    def valid_input_size(self, size: Sequence[int], mode: str = "nearest") -> tuple[int, ...]:
        """The members' valid input size nearest ``size`` (``mode``: nearest, floor, ceil)."""
        return self.border_net.valid_input_size(size, mode)

    @torch.jit.unused
    def input_size_for_output(self, output_size: Sequence[int]) -> tuple[int, ...]:
        """The smallest valid input whose output covers ``output_size``."""
        return self.border_net.input_size_for_output(output_size)
