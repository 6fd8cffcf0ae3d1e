"""Overlap-tile inference (Ronneberger et al. 2015, Sec. 2 and Fig. 2) as a MONAI ``Inferer``.

Valid-convolution networks (output smaller than input) are tiled *exactly*: the output is cut into
tiles laid edge to edge, every input tile is its output tile plus the network's context border on each
side, and context outside the image is mirrored. Tiles start on the ``2**depth`` pooling grid of the
whole (virtually padded) image, so the stitched result equals the whole-image prediction of the
mirror-padded image up to float rounding.

Same-padding networks (MONAI's, or ``medseg.networks.UNet(padding="same")``) use the same machinery with
an overlap whose margins are discarded ("crop" mode, the paper's idea applied to padded networks; every
output pixel comes from the tile in which it lies most centrally), or MONAI-style Gaussian blending.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import compute_importance_map
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, ensure_tuple_rep

from medseg.precision import Precision, normalise_precision, resolve_precision

__all__ = ["OverlapTileInferer"]

_DDP = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def mirror_index(start: int, length: int, size: int) -> torch.Tensor:
    """Indices ``start .. start+length-1`` mirrored into ``[0, size)`` (numpy ``reflect``, any amount).

    Unlike ``torch.nn.functional.pad(mode="reflect")`` this works for pads larger than the image
    (the mirror is repeated periodically) and for 1-pixel-thin images (edge replicated).
    """
    idx = torch.arange(start, start + length)
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * (size - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - idx, idx)


@dataclass(frozen=True)
class _AxisPlan:
    """Tiling of one spatial axis, in image coordinates."""

    size: int  # image size n
    tile: int  # input tile size
    border: int  # output offset of a tile w.r.t. its input (0 for same-padding networks)
    starts: tuple[int, ...]  # input start of each tile; may be < 0 or end beyond n (mirrored)
    cuts: tuple[int, ...]  # crop mode: tile j writes [cuts[j], cuts[j+1]) of the output

    @property
    def tile_out(self) -> int:
        return self.tile - 2 * self.border

    def source(self, j: int) -> tuple[int, int] | torch.Tensor:
        """A contiguous ``(start, length)`` inside the image, or a mirrored index tensor."""
        a = self.starts[j]
        if a >= 0 and a + self.tile <= self.size:
            return (a, self.tile)
        return mirror_index(a, self.tile, self.size)

    def written(self, j: int) -> tuple[slice, slice]:
        """Crop mode: (destination slice in the output, source slice in the tile output)."""
        lo, hi = self.cuts[j], self.cuts[j + 1]
        off = self.starts[j] + self.border
        return slice(lo, hi), slice(lo - off, hi - off)

    def covered(self, j: int) -> tuple[slice, slice]:
        """Blend mode: the whole tile output clipped to the image (destination, source)."""
        off = self.starts[j] + self.border
        lo, hi = max(off, 0), min(off + self.tile_out, self.size)
        return slice(lo, hi), slice(lo - off, hi - off)


def _valid_axis(n: int, tile: int, border: int, divisor: int) -> _AxisPlan:
    """Exact overlap-tile plan: output tiles edge to edge with a step on the pooling grid."""
    tile_out = tile - 2 * border
    if tile_out >= n:  # one tile covers the axis
        return _AxisPlan(n, tile, border, (-border,), (0, n))
    step = (tile_out // divisor) * divisor
    if step <= 0:
        raise ValueError(
            f"output tile {tile_out} is smaller than the size divisor {divisor}; use a larger roi_size"
        )
    k = 1 + max(0, math.ceil((n - tile_out) / step))
    starts = tuple(j * step - border for j in range(k))
    cuts = tuple([j * step for j in range(k)] + [n])
    return _AxisPlan(n, tile, border, starts, cuts)


def _same_axis(n: int, tile: int, divisor: int, overlap: float) -> _AxisPlan:
    """Same-padding plan: tiles flush with the image edges, starts on the pooling grid, midpoint cuts."""
    padded = -(-n // divisor) * divisor  # the image is mirrored up to a multiple of the divisor
    if padded <= tile:
        return _AxisPlan(n, padded, 0, (0,), (0, n))
    step = max(divisor, int(tile * (1.0 - overlap)) // divisor * divisor)
    starts = list(range(0, padded - tile, step)) + [padded - tile]
    starts = sorted(set(starts))
    cuts = [0] + [min(n, (s0 + tile + s1) // 2) for s0, s1 in itertools.pairwise(starts)] + [n]
    return _AxisPlan(n, tile, 0, tuple(starts), tuple(cuts))


class OverlapTileInferer(Inferer):
    """Overlap-tile sliding-window inference for valid-convolution and same-padding networks.

    Args:
        roi_size: spatial size of the *input* tile given to the network (as in MONAI). For a valid-conv
            network it is moved to the nearest valid size (``network.valid_input_size``) and enlarged if
            its output would be smaller than one pooling cell. Non-positive entries mean "whole image".
            Along axes where the image is smaller than the tile, the tile is shrunk to the smallest size
            that covers the image.
        sw_batch_size: number of tiles per forward pass.
        mode: same-padding networks only. ``"crop"`` (default): tiles overlap by ``overlap`` and every
            output pixel is taken from the tile in which it is most central, the rest is discarded; this
            is exact when the margin ``overlap * roi / 2`` reaches the network's receptive radius and costs
            no blending. ``"gaussian"`` / ``"constant"``: MONAI-style weighted blending of the overlap.
            Valid-conv networks always use exact edge-to-edge tiling.
        overlap: fraction of a tile shared with its neighbour (same-padding networks).
        sigma_scale: Gaussian blending sigma as a fraction of the tile size (MONAI's default 0.125).
        border: context border per side (input size - output size) / 2; default ``network.border`` or 0.
        size_divisor: pooling grid (``2**depth``); default ``network.size_divisor`` or 1.
        sw_device: device of the tiles and the forward passes (default: the input's).
        device: device of the stitched output (default: the input's). E.g. tiles on CUDA, output on CPU.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:mod:`medseg.precision`), resolved for
            ``sw_device``: autocast of the forward passes, and on CPU channels-last tiles and weights (the
            network's convolution weights are put in that layout in place, values unchanged). Outputs are
            cast to ``output_dtype`` (float32) per tile, so flip averaging and stitching stay in fp32.
        output_dtype: dtype of the stitched output (``None``: the network's output dtype).
        flip_tta: average the predictions over all mirrorings of ``flip_axes`` (nnU-Net's test-time
            mirroring: 4 passes in 2D, 8 in 3D).
        flip_axes: spatial axes (0-based) to mirror; default all.
        prefetch: build the next batch of tiles in a background thread while the network runs
            (default: on when ``sw_device`` is CUDA).
        progress: show a tqdm progress bar.
        output: ``"logits"`` (default): the network's output channels, stitched. ``"labels"``: each tile's
            label map is written straight into a ``(B, 1, *spatial)`` integer map (argmax over the
            channels; for one channel, output > 0: probability > 0.5 of a sigmoid), so that memory does not
            grow with the number of classes (uint8 up to 256 classes: 1 byte per voxel instead of 4 per
            class). Exact where each output voxel comes from one tile (``mode="crop"``, valid-conv nets);
            blending modes need the probabilities and refuse it.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        mode: str = "crop",
        overlap: float = 0.25,
        sigma_scale: float = 0.125,
        border: Sequence[int] | int | None = None,
        size_divisor: Sequence[int] | int | None = None,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        precision: str | Precision = "auto",
        output_dtype: torch.dtype | str | None = torch.float32,
        flip_tta: bool = False,
        flip_axes: Sequence[int] | None = None,
        prefetch: bool | None = None,
        progress: bool = False,
        output: str = "logits",
    ) -> None:
        super().__init__()
        if output not in ("logits", "labels"):
            raise ValueError(f"output must be 'logits' or 'labels', got {output!r}")
        if output == "labels" and mode != "crop":
            raise ValueError(f"output='labels' needs mode='crop' (mode {mode!r} blends probabilities)")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if mode not in ("crop", "gaussian", "constant"):
            raise ValueError(f"mode must be 'crop', 'gaussian' or 'constant', got {mode!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.roi_size = roi_size
        self.sw_batch_size = int(sw_batch_size)
        self.mode = mode
        self.overlap = float(overlap)
        self.sigma_scale = float(sigma_scale)
        self.border = border
        self.size_divisor = size_divisor
        self.sw_device = torch.device(sw_device) if sw_device is not None else None
        self.device = torch.device(device) if device is not None else None
        self.precision = precision if isinstance(precision, Precision) else normalise_precision(precision)
        self.output_dtype = None if output_dtype is None else _as_dtype(output_dtype)
        self.flip_tta = bool(flip_tta)
        self.flip_axes = None if flip_axes is None else tuple(int(a) for a in flip_axes)
        self.prefetch = prefetch
        self.progress = bool(progress)
        self.output = output

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def _core(network: Callable) -> Any:
        """The module that carries the shape helpers (unwraps DataParallel/DDP and torch.compile)."""
        core = network
        for _ in range(4):
            if hasattr(core, "_orig_mod"):
                core = core._orig_mod
            elif isinstance(core, _DDP):
                core = core.module
            else:
                break
        return core

    def plan(self, image_size: Sequence[int], network: Callable) -> list[_AxisPlan]:
        """Tiling of every spatial axis for an image of ``image_size`` (exposed for tests/benchmarks)."""
        nd = len(image_size)
        core = self._core(network)
        border = ensure_tuple_rep(self.border if self.border is not None else getattr(core, "border", 0), nd)
        divisor = ensure_tuple_rep(
            self.size_divisor if self.size_divisor is not None else getattr(core, "size_divisor", 1), nd
        )
        border, divisor = tuple(int(b) for b in border), tuple(max(1, int(d)) for d in divisor)
        roi = ensure_tuple_rep(self.roi_size, nd)
        roi = tuple(int(r) if int(r) > 0 else int(n) for r, n in zip(roi, image_size, strict=True))
        if any(b < 0 for b in border):
            raise ValueError(f"border must be >= 0, got {border}")
        valid = any(b > 0 for b in border)
        if not valid:
            tile = tuple(max(d, round(r / d) * d) for r, d in zip(roi, divisor, strict=True))
            return [
                _same_axis(n, t, d, self.overlap) for n, t, d in zip(image_size, tile, divisor, strict=True)
            ]
        if self.mode != "crop" and not getattr(self, "_warned_mode", False):
            self._warned_mode = True
            warnings.warn(
                f"mode={self.mode!r} is ignored for this valid-convolution network (border {border}): its "
                "tiles abut exactly, with nothing to blend (paper Fig. 2)",
                stacklevel=3,
            )
        tile = roi
        if hasattr(core, "valid_input_size") and hasattr(core, "input_size_for_output"):
            tile = tuple(core.valid_input_size(tile, mode="nearest"))
            smallest = tuple(core.input_size_for_output(divisor))  # an output of >= one pooling cell
            if any(t < s for t, s in zip(tile, smallest, strict=True)):
                tile = tuple(max(t, s) for t, s in zip(tile, smallest, strict=True))
                warnings.warn(
                    f"roi_size {roi} gives no output for this network; using tiles of {tile}", stacklevel=3
                )
            whole = tuple(core.input_size_for_output(tuple(int(n) for n in image_size)))
            tile = tuple(min(t, w) for t, w in zip(tile, whole, strict=True))  # small image: one tile
        return [_valid_axis(n, t, b, d) for n, t, b, d in zip(image_size, tile, border, divisor, strict=True)]

    # ------------------------------------------------------------------ pieces
    def _flip_sets(self, nd: int) -> list[tuple[int, ...]]:
        if not self.flip_tta:
            return [()]
        axes = self.flip_axes if self.flip_axes is not None else tuple(range(nd))
        if any(not 0 <= a < nd for a in axes):
            raise ValueError(f"flip_axes {axes} out of range for {nd} spatial dims")
        return [
            tuple(2 + a for a in c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)
        ]

    def _forward(
        self,
        network: Callable,
        x: torch.Tensor,
        flips: list[tuple[int, ...]],
        precision: Precision,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        acc: torch.Tensor | None = None
        for dims in flips:
            with precision.autocast():
                y = network(precision.format_input(torch.flip(x, dims) if dims else x), *args, **kwargs)
            if not isinstance(y, torch.Tensor):
                raise TypeError(
                    f"OverlapTileInferer needs a network that returns one tensor, got {type(y).__name__}"
                )
            if dims:
                y = torch.flip(y, dims)
            if len(flips) > 1:
                y = y.float()  # average the mirrored passes in fp32
            acc = y if acc is None else acc + y
        assert acc is not None
        return acc / len(flips) if len(flips) > 1 else acc

    # ------------------------------------------------------------------ main
    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Predict ``inputs`` (B, C, *spatial) with ``network``; returns (B, C_out, *spatial) on ``device``.

        Tiles are gathered/predicted on ``sw_device``, the result is stitched on ``device``.
        """
        if inputs.ndim < 3:
            raise ValueError(f"inputs must be (batch, channel, *spatial), got shape {tuple(inputs.shape)}")
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        if not x.is_floating_point():
            x = x.float()
        batch, channels, *spatial = x.shape
        nd = len(spatial)
        sw_device = self.sw_device or x.device
        device = self.device or x.device
        plans = self.plan(spatial, network)
        tile = tuple(p.tile for p in plans)
        tile_out = tuple(p.tile_out for p in plans)
        positions = list(itertools.product(*(range(len(p.starts)) for p in plans)))
        jobs = [(b, pos) for b in range(batch) for pos in positions]
        chunks = [jobs[i : i + self.sw_batch_size] for i in range(0, len(jobs), self.sw_batch_size)]
        # mirrored index tensors moved to the gather device once, not per tile
        sources = [
            [s if isinstance(s := p.source(j), tuple) else s.to(x.device) for j in range(len(p.starts))]
            for p in plans
        ]
        on_cuda = sw_device.type == "cuda"
        pin = on_cuda and x.device.type == "cpu"
        prefetch = on_cuda if self.prefetch is None else self.prefetch
        flips = self._flip_sets(nd)
        blend = self.mode != "crop" and all(p.border == 0 for p in plans)  # valid-conv nets: always exact
        labels = self.output == "labels"

        precision = resolve_precision(self.precision, sw_device)
        if isinstance(network, torch.nn.Module):
            precision.prepare(network)
        layout = precision.memory_format(len(tile) + 2) or torch.contiguous_format

        def make_batch(chunk: list[tuple[int, tuple[int, ...]]]) -> torch.Tensor:
            # built in the layout the network runs in, so no per-batch conversion follows
            buf = torch.empty(
                (len(chunk), channels, *tile), dtype=x.dtype, device=x.device, pin_memory=pin,
                memory_format=layout,
            )  # fmt: skip
            for i, (b, pos) in enumerate(chunk):
                t = x[b]
                picks = []
                for ax, j in enumerate(pos):  # contiguous axes first (views), then mirrored gathers
                    src = sources[ax][j]
                    if isinstance(src, tuple):
                        t = t.narrow(ax + 1, src[0], src[1])
                    else:
                        picks.append((ax, src))
                for ax, idx in picks:
                    t = t.index_select(ax + 1, idx)
                buf[i].copy_(t)
            return buf.to(sw_device, non_blocking=True) if buf.device != sw_device else buf

        weight: torch.Tensor | None = None
        weight_sum: torch.Tensor | None = None
        if blend:
            weight = compute_importance_map(
                tile_out, mode=self.mode, sigma_scale=self.sigma_scale, device=sw_device, dtype=torch.float32
            )
            weight_sum = torch.zeros(spatial, dtype=torch.float32, device=device)
            w_dev = weight.to(device)
            for pos in positions:
                dst, src = zip(*(plans[ax].covered(j) for ax, j in enumerate(pos)), strict=True)
                weight_sum[dst] += w_dev[src]

        out: torch.Tensor | None = None

        def write(
            pred: torch.Tensor, chunk: list[tuple[int, tuple[int, ...]]], event: torch.cuda.Event | None
        ) -> None:
            if event is not None:  # the asynchronous device-to-host copy of ``pred`` has finished
                event.synchronize()
            for i, (b, pos) in enumerate(chunk):
                if blend:
                    dst, src = zip(*(plans[ax].covered(j) for ax, j in enumerate(pos)), strict=True)
                    out[(b, slice(None), *dst)] += pred[(i, slice(None), *src)]
                else:
                    dst, src = zip(*(plans[ax].written(j) for ax, j in enumerate(pos)), strict=True)
                    out[(b, slice(None), *dst)] = pred[(i, slice(None), *src)]

        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(chunks), desc="overlap-tile", unit="batch")
        pool = ThreadPoolExecutor(max_workers=1) if prefetch and len(chunks) > 1 else None
        pending: tuple[torch.Tensor, list, Any] | None = None
        try:
            with torch.no_grad():
                future = pool.submit(make_batch, chunks[0]) if pool else None
                for k, chunk in enumerate(chunks):
                    tiles = future.result() if future is not None else make_batch(chunk)
                    if pool is not None and k + 1 < len(chunks):
                        future = pool.submit(make_batch, chunks[k + 1])
                    pred = self._forward(network, tiles, flips, precision, *args, **kwargs)
                    if out is None:
                        got = tuple(pred.shape[2:])
                        if pred.ndim != nd + 2 or pred.shape[0] != len(chunk) or got != tile_out:
                            raise ValueError(
                                f"the network maps input tiles of {tuple(tiles.shape)} to "
                                f"{tuple(pred.shape)}; "
                                f"expected (batch, C_out, *{tile_out}) for a context border of "
                                f"{tuple(p.border for p in plans)} per side. Pass border=/size_divisor= "
                                f"for a network whose output is smaller than its input."
                            )
                        out_shape = (batch, 1 if labels else pred.shape[1], *spatial)
                        alloc = torch.zeros if blend else torch.empty
                        out_dtype = self.output_dtype or pred.dtype
                        if labels:
                            out_dtype = torch.uint8 if pred.shape[1] <= 256 else torch.int16
                        out = alloc(out_shape, dtype=out_dtype, device=device)
                    if weight is not None:
                        pred = pred.float() * weight
                    if labels:  # the tile's label map, on the tile's device (argmax needs all channels)
                        pred = pred > 0 if pred.shape[1] == 1 else pred.argmax(1, keepdim=True)
                    pred = pred.to(out.dtype)
                    event = None
                    if pred.device != device:
                        pred = pred.to(device, non_blocking=True)  # pinned destination when D2H
                        if on_cuda:
                            event = torch.cuda.Event()
                            event.record()
                    # write the previous batch while this one is computed/copied asynchronously
                    if pending is not None:
                        write(*pending)
                    pending = (pred, chunk, event)
                    if bar is not None:
                        bar.update(1)
                if pending is not None:
                    write(*pending)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()
        assert out is not None
        if blend:
            assert weight_sum is not None
            out /= weight_sum
        if isinstance(inputs, MetaTensor):
            out = convert_to_dst_type(out, inputs, device=device)[0]
        return out
