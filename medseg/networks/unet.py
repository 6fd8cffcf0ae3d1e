"""The U-Net of Ronneberger, Fischer and Brox (2015, arXiv:1505.04597), in 2D and 3D.

``padding="valid"`` is the paper's network (Sec. 2, Fig. 1): unpadded 3x3 convolutions, so the
output is smaller than the input by a fixed context border and only some input sizes are valid
(every 2x2 max-pooling must see an even size). ``padding="same"`` is the common padded variant:
output size == input size for any input divisible by ``2**depth``, optionally with batch or instance
normalisation.

Shape arithmetic (L = ``depth``, number of 2x2 poolings; Sec. 2 and the overlap-tile strategy, Fig. 2):

* valid: input ``n = 2**L * s + 4 * (2**L - 1)`` for a bottom size ``s`` (the size entering the
  bottleneck) with ``s >= 8`` (``s >= 7`` for L = 1) so that every expanding level keeps >= 1 pixel;
  output ``n - (12 * 2**L - 8)``; context border per side ``6 * 2**L - 4`` (92 px for L = 4, so
  572 -> 388). The skip connection of level ``i`` (0 = top) is center-cropped by
  ``6 * 2**(L - i) - 8`` per side (88, 40, 16, 4 for L = 4; Fig. 1).
* same: input ``n = 2**L * s`` with ``s >= 1``; output ``n``; border 0.

The arithmetic is available as plain functions (``unet_output_size`` ...) for configs and inferers that
have no network instance, and as methods / properties of :class:`UNet`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import List  # noqa: UP035 - TorchScript needs typing.List in signatures

import torch
from monai.networks.layers.factories import Conv, Dropout, Pool
from monai.networks.layers.utils import get_norm_layer
from torch import nn
from torch.nn import functional as F

__all__ = [
    "UNet",
    "unet_border",
    "unet_input_size_for_output",
    "unet_is_valid_input_size",
    "unet_output_size",
    "unet_size_divisor",
    "unet_valid_input_size",
]

PADDING_MODES = ("valid", "same")
SIZE_MODES = ("nearest", "floor", "ceil")


# --------------------------------------------------------------------------------------------------
# Scalar shape arithmetic. TorchScript-compatible (plain ints) because UNet.forward uses it to check
# the input size; the public, friendlier functions below are built on it.
# --------------------------------------------------------------------------------------------------


def _affine(depth: int, same: bool) -> List[int]:  # noqa: UP006
    """Valid inputs are ``a * s + b`` for integers ``s >= s_min``; returns ``[a, b, s_min]``."""
    a = 1 << depth  # not 2**depth: TorchScript's int ** int is a float
    if same:
        return [a, 0, 1]
    # bottom output t0 = s - 4; after k up-levels t_k = 4 + 2**k * (s - 8) must stay >= 1.
    return [a, 4 * (a - 1), 7 if depth == 1 else 8]


def _valid_floor_1d(n: int, depth: int, same: bool) -> int:
    """Largest valid input size ``<= n``, or -1 when there is none."""
    abs_ = _affine(depth, same)
    if n < abs_[0] * abs_[2] + abs_[1]:
        return -1
    return abs_[0] * ((n - abs_[1]) // abs_[0]) + abs_[1]


def _valid_ceil_1d(n: int, depth: int, same: bool) -> int:
    """Smallest valid input size ``>= n``."""
    abs_ = _affine(depth, same)
    s = max(-((abs_[1] - n) // abs_[0]), abs_[2])  # ceil((n - b) / a), at least s_min
    return abs_[0] * s + abs_[1]


def _is_valid_1d(n: int, depth: int, same: bool) -> bool:
    return _valid_floor_1d(n, depth, same) == n


def _output_1d(n: int, depth: int, same: bool) -> int:
    if same:
        return n
    return n - (12 * (1 << depth) - 8)


def _invalid_size_message(size: List[int], depth: int, same: bool) -> str:  # noqa: UP006
    """The error text for an invalid input size: which axes, and the nearest valid sizes."""
    abs_ = _affine(depth, same)
    padding = "same" if same else "valid"
    rule = str(abs_[0]) + "*k"
    if abs_[1] > 0:
        rule = rule + " + " + str(abs_[1])
    rule = rule + " with k >= " + str(abs_[2]) + ", i.e. >= " + str(abs_[0] * abs_[2] + abs_[1])
    msg = "input spatial size [" + ", ".join([str(n) for n in size]) + "] is not valid for a U-Net"
    msg = msg + " with depth=" + str(depth) + " and padding='" + padding + "'"
    msg = msg + " (valid sizes per axis are " + rule + ")."
    for i, n in enumerate(size):
        if not _is_valid_1d(n, depth, same):
            lo = _valid_floor_1d(n, depth, same)
            hi = _valid_ceil_1d(n, depth, same)
            msg = msg + " Axis " + str(i) + " has " + str(n) + ": nearest valid sizes are "
            if lo > 0:
                msg = msg + str(lo) + " and " + str(hi) + "."
            else:
                msg = msg + str(hi) + " (the smallest)."
    return msg


# --------------------------------------------------------------------------------------------------
# Public shape helpers (no network instance needed).
# --------------------------------------------------------------------------------------------------


def _check_args(depth: int, padding: str) -> bool:
    """Validates ``depth`` / ``padding`` and returns ``padding == "same"``."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (number of 2x2 poolings), got {depth!r}.")
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}.")
    return padding == "same"


def _as_sizes(size: int | Sequence[int], name: str) -> list[int]:
    """``size`` as a list of Python ints (numpy / torch integer scalars accepted; floats and bools not)."""
    items = list(size) if hasattr(size, "__iter__") else [size]
    try:
        if any(isinstance(n, bool) for n in items):
            raise TypeError
        sizes = [operator.index(n) for n in items]
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {size!r}.") from None
    if not sizes:
        raise ValueError(f"{name} must not be empty.")
    return sizes


def unet_size_divisor(depth: int = 4) -> int:
    """``2**depth``: the total down-sampling factor (product of the 2x2 poolings)."""
    _check_args(depth, "valid")
    return 2**depth


def unet_border(depth: int = 4, padding: str = "valid") -> int:
    """Context border per side of the output: ``6 * 2**depth - 4`` in valid mode (92 for depth 4), else 0.

    Each output pixel sees ``border`` input pixels on each side beyond itself (Fig. 2, overlap-tile).
    """
    same = _check_args(depth, padding)
    return 0 if same else 6 * 2**depth - 4


def unet_is_valid_input_size(input_size: int | Sequence[int], depth: int = 4, padding: str = "valid") -> bool:
    """Whether every axis of ``input_size`` is a valid spatial input size (see the module docstring)."""
    same = _check_args(depth, padding)
    return all(_is_valid_1d(n, depth, same) for n in _as_sizes(input_size, "input_size"))


def unet_output_size(
    input_size: int | Sequence[int], depth: int = 4, padding: str = "valid"
) -> tuple[int, ...]:
    """Spatial output size for a spatial input size, e.g. ``(572, 572) -> (388, 388)`` for depth 4, valid.

    Raises:
        ValueError: when an axis is not a valid input size; the message names the nearest valid sizes.
    """
    same = _check_args(depth, padding)
    sizes = _as_sizes(input_size, "input_size")
    if not all(_is_valid_1d(n, depth, same) for n in sizes):
        raise ValueError(_invalid_size_message(sizes, depth, same))
    return tuple(_output_1d(n, depth, same) for n in sizes)


def unet_valid_input_size(
    size: int | Sequence[int], depth: int = 4, padding: str = "valid", mode: str = "nearest"
) -> tuple[int, ...]:
    """Per axis, the valid input size nearest to ``size`` (``mode="nearest"``, ties go up), the largest
    valid size ``<= size`` (``"floor"``) or the smallest valid size ``>= size`` (``"ceil"``).

    Raises:
        ValueError: for an unknown mode, or with ``"floor"`` when an axis is below the smallest valid size.
    """
    same = _check_args(depth, padding)
    if mode not in SIZE_MODES:
        raise ValueError(f"mode must be one of {SIZE_MODES}, got {mode!r}.")
    out = []
    for n in _as_sizes(size, "size"):
        lo, hi = _valid_floor_1d(n, depth, same), _valid_ceil_1d(n, depth, same)
        if mode == "floor":
            if lo < 0:
                raise ValueError(
                    f"no valid input size <= {n} for a U-Net with depth={depth}, padding={padding!r}; "
                    f"the smallest valid size is {hi}."
                )
            out.append(lo)
        elif mode == "ceil":
            out.append(hi)
        else:
            out.append(hi if lo < 0 or hi - n <= n - lo else lo)
    return tuple(out)


def unet_input_size_for_output(
    output_size: int | Sequence[int], depth: int = 4, padding: str = "valid"
) -> tuple[int, ...]:
    """Per axis, the smallest valid input size whose output is ``>= output_size``.

    In valid mode that is ``ceil-to-valid(output + 2 * border)``; in same mode ``ceil-to-multiple``.
    """
    same = _check_args(depth, padding)
    border = unet_border(depth, padding)
    out = []
    for n in _as_sizes(output_size, "output_size"):
        if n < 1:
            raise ValueError(f"output_size must be >= 1 per axis, got {n}.")
        out.append(_valid_ceil_1d(n + 2 * border, depth, same))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------------


def _norm_spec(norm: str | tuple | None) -> str | tuple | None:
    """``None``/``"none"`` -> no normalisation; ``"instance"`` gets learnable affine parameters."""
    if norm is None or (isinstance(norm, str) and norm.lower() in ("none", "")):
        return None
    if isinstance(norm, str) and norm.lower() in ("instance", "instancenorm"):
        return ("instance", {"affine": True})
    return norm


class _DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by (optional normalisation and) ReLU (Sec. 2)."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, padding: int, norm: str | tuple | None
    ) -> None:
        conv_t = Conv[Conv.CONV, spatial_dims]
        layers: list[nn.Module] = []
        for cin in (in_channels, out_channels):
            # with a normalisation layer the conv bias is redundant (it is removed by the mean)
            layers.append(conv_t(cin, out_channels, kernel_size=3, padding=padding, bias=norm is None))
            if norm is not None:
                layers.append(get_norm_layer(norm, spatial_dims, out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _UpBlock(nn.Module):
    """2x2 up-convolution halving the channels, concatenation with the center-cropped skip, two convs."""

    def __init__(
        self, spatial_dims: int, in_channels: int, crop: int, padding: int, norm: str | tuple | None
    ) -> None:
        super().__init__()
        out_channels = in_channels // 2
        self.up = Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = _DoubleConv(spatial_dims, 2 * out_channels, out_channels, padding, norm)
        self.crop: int = crop  # per side; independent of the input size (see module docstring)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.crop > 0:
            # a negative pad is a centre crop whose gradient keeps the skip's memory layout (a narrowed
            # view's gradient is a new contiguous tensor: slow against channels-last activations)
            skip = F.pad(skip, [-self.crop] * (2 * (skip.dim() - 2)))
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015), paper layout in 2D or 3D, valid (paper) or same padding.

    Contracting path: per level two 3x3 convs + ReLU, then 2x2 max-pool, channels doubling from
    ``features``; dropout at the end of the contracting path (after the bottleneck convs). Expanding
    path: 2x2 transposed conv halving the channels, concatenation with the center-cropped skip, two 3x3
    convs + ReLU. A 1x1 conv maps to ``out_channels`` logits (Sec. 2, Fig. 1). Weights are drawn from
    N(0, 2/N), N = fan-in (Sec. 3); biases start at 0.

    The defaults give the paper's network: 23 conv layers, 31,030,658 parameters, 572x572 -> 388x388.
    In a bundle config: ``{"_target_": "medseg.networks.UNet", "spatial_dims": 2, "out_channels": 2}``.

    Example::

        >>> net = UNet()
        >>> net.border, net.output_size((572, 572)), net.valid_input_size((500, 512))
        (92, (388, 388), (508, 508))

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (classes; logits, no softmax).
        features: channels of the first level; level ``i`` has ``features * 2**i``.
        depth: number of 2x2 max-poolings (4 in the paper).
        padding: ``"valid"`` (paper, unpadded convs, output smaller than input) or ``"same"``.
        norm: ``None`` (paper), ``"batch"``, ``"instance"`` (affine) or any MONAI norm spec such as
            ``("group", {"num_groups": 8})``; applied after each 3x3 conv, before ReLU.
        dropout: dropout probability at the end of the contracting path. The paper gives no rate;
            0.5 is the standard rate of Srivastava et al. (2014) and the usual choice in U-Net ports.
        check_size: make ``forward`` raise a ``ValueError`` naming the nearest valid sizes when the
            input size is invalid (an invalid size would otherwise silently misalign the skips by
            max-pooling's floor rounding, or fail deep inside ``torch.cat``).
    """

    __jit_unused_properties__ = ["border", "size_divisor"]

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: int = 64,
        depth: int = 4,
        padding: str = "valid",
        norm: str | tuple | None = None,
        dropout: float = 0.5,
        check_size: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        same = _check_args(depth, padding)
        for name, value in (
            ("in_channels", in_channels), ("out_channels", out_channels),
            ("features", features),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")

        self.spatial_dims: int = spatial_dims
        self.in_channels: int = in_channels
        self.out_channels: int = out_channels
        self.features: int = features
        self.depth: int = depth
        self.padding: str = padding
        self.same: bool = same
        self.check_size: bool = check_size
        norm = _norm_spec(norm)
        pad = 1 if same else 0

        chans = [features * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            [_DoubleConv(spatial_dims, in_channels if i == 0 else chans[i - 1], chans[i], pad, norm)
             for i in range(depth)]
        )
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)
        self.bottleneck = _DoubleConv(spatial_dims, chans[depth - 1], chans[depth], pad, norm)
        drop_t = Dropout[Dropout.DROPOUT, spatial_dims]
        self.dropout = drop_t(float(dropout)) if dropout > 0 else nn.Identity()
        self.decoders = nn.ModuleList(
            [_UpBlock(spatial_dims, chans[i + 1], 0 if same else 6 * 2 ** (depth - i) - 8, pad, norm)
             for i in reversed(range(depth))]
        )
        self.head = Conv[Conv.CONV, spatial_dims](features, out_channels, kernel_size=1)
        self.reset_parameters()

    @torch.jit.unused
    def reset_parameters(self) -> None:
        """He-normal init, std ``sqrt(2 / N)`` with N the number of incoming connections (Sec. 3).

        For the 2x2 stride-2 up-convolution every output unit receives one tap per input channel, so
        N = in_channels (not in_channels * 4).
        """
        for m in self.modules():
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                fan_in = m.in_channels * max(1, math.prod(m.kernel_size) // math.prod(m.stride))
            elif isinstance(m, nn.modules.conv._ConvNd):
                fan_in = m.in_channels // m.groups * math.prod(m.kernel_size)
            else:
                continue
            nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                "expected a (batch, channels, *spatial) tensor with " + str(self.spatial_dims)
                + " spatial dims, got " + str(x.dim()) + " dims in all."
            )
        size = list(x.shape[2:])
        for n in size:
            if not _is_valid_1d(n, self.depth, self.same):
                raise ValueError(_invalid_size_message(size, self.depth, self.same))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check_size and not torch.jit.is_tracing():
            self._check_input(x)
        skips: List[torch.Tensor] = []  # noqa: UP006
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for i, dec in enumerate(self.decoders):
            x = dec(x, skips[len(skips) - 1 - i])
        return self.head(x)

    # ---- shape arithmetic (not part of the TorchScript graph) -----------------------------------

    @property
    def size_divisor(self) -> int:
        """``2**depth``."""
        return 2**self.depth

    @property
    def border(self) -> int:
        """Context border per side of the output (92 for depth 4 valid; 0 for ``padding="same"``)."""
        return unet_border(self.depth, self.padding)

    @torch.jit.unused
    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for a spatial input size; ``ValueError`` naming the nearest valid sizes."""
        return unet_output_size(input_size, self.depth, self.padding)

    @torch.jit.unused
    def is_valid_input_size(self, input_size: Sequence[int]) -> bool:
        """Whether ``input_size`` is a valid spatial input size."""
        return unet_is_valid_input_size(input_size, self.depth, self.padding)

    @torch.jit.unused
    def valid_input_size(self, size: Sequence[int], mode: str = "nearest") -> tuple[int, ...]:
        """The valid input size nearest to / ``<=`` / ``>=`` ``size`` per axis (mode nearest/floor/ceil)."""
        return unet_valid_input_size(size, self.depth, self.padding, mode)

    @torch.jit.unused
    def input_size_for_output(self, output_size: Sequence[int]) -> tuple[int, ...]:
        """The smallest valid input size whose output is ``>= output_size`` per axis."""
        return unet_input_size_for_output(output_size, self.depth, self.padding)
