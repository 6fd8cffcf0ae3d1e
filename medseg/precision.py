"""Numeric precision and memory layout of a network's forward (and backward) passes, as one setting.

``precision`` is one of:

* ``"auto"``: bf16 autocast on CPUs that compute bf16 natively (AVX-512 BF16 or AMX, confirmed by a
  short timed probe), bf16 autocast on CUDA devices that support it, else fp16; fp32 otherwise.
* ``"fp32"``, ``"bf16"``, ``"fp16"``: that autocast dtype (``fp32``: no autocast).

On CPU the network's weights and inputs are also put in channels-last layout (``torch.channels_last``
/ ``channels_last_3d``): oneDNN's convolutions run fastest when weights and activations share it (see
PyTorch's "Channels Last Memory Format" tutorial); values are unchanged.

Parameters stay fp32 (master weights), autocast keeps reductions and losses in fp32, and every
:class:`Precision` consumer returns float32 outputs, so softmax, argmax, loss and tile aggregation are
computed in fp32.

Support is detected once per process. ``MEDSEG_CPU_BF16=1`` / ``0`` forces the CPU answer (skipping
the probe), e.g. to reproduce a run on another machine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "Precision",
    "cpu_bf16_support",
    "normalise_precision",
    "prepare_network",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_ALIASES = {
    "float32": "fp32", "fp32": "fp32", "32": "fp32", "none": "fp32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "half": "fp16", "fp16": "fp16", "16": "fp16",
    "auto": "auto",
}  # fmt: skip
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ENV_CPU_BF16 = "MEDSEG_CPU_BF16"
# the probe accepts native bf16 only when it beats fp32 by this factor (emulated bf16 runs at fp32 speed
# or slower; native AVX-512 BF16 / AMX runs 2-4x faster)
_PROBE_MIN_SPEEDUP = 1.3


@dataclass(frozen=True)
class Precision:
    """A resolved precision: autocast dtype and memory layout for one device type.

    Build it with :func:`resolve_precision`. ``name`` is ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """

    name: str
    device_type: str
    channels_last: bool

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, ``None`` for fp32."""
        return _DTYPES[self.name]

    @property
    def grad_scaling(self) -> bool:
        """Whether training needs loss scaling: fp16 on CUDA (``GradScaler``; MONAI's trainer ``amp``).

        bf16 has fp32's exponent range and needs none.
        """
        return self.name == "fp16" and self.device_type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this device type and dtype; a null context for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def memory_format(self, ndim: int) -> torch.memory_format | None:
        """Channels-last format for a tensor of ``ndim`` dims (4: 2D; 5: 3D in bf16/fp16), else ``None``."""
        if not self.channels_last:
            return None
        if ndim == 5 and self.dtype is None:
            return None  # oneDNN's fp32 3D convolutions run faster contiguous (benchmarks/bench_precision.py)
        return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)

    def format_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in this precision's memory layout (a copy only when the layout changes)."""
        fmt = self.memory_format(x.ndim)
        return x if fmt is None else x.contiguous(memory_format=fmt)

    def prepare(self, network: nn.Module) -> nn.Module:
        """Put the convolution weights of ``network`` in channels-last layout (in place; returns it).

        Parameters keep their dtype (fp32 master weights). A network already wrapped in
        ``DataParallel`` / ``DistributedDataParallel`` is left as it is (DDP's gradient buckets follow the
        parameters' layout): prepare it before wrapping.
        """
        if not self.channels_last or isinstance(network, _PARALLEL):
            return network
        for module in network.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                w = module.weight.data
                fmt = self.memory_format(w.ndim)
                if fmt is not None and w.stride() != _channels_last_strides(w):
                    # explicit channels-last strides, also for one input channel (where both layouts are
                    # "contiguous" and oneDNN would otherwise produce a contiguous output)
                    module.weight.data = torch.empty_like(w, memory_format=fmt).copy_(w)
        return network

    def __str__(self) -> str:
        what = "fp32" if self.dtype is None else f"{self.name} autocast"
        layout = " + channels_last" if self.channels_last else ""
        return f"{what}{layout} on {self.device_type}"


_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _channels_last_strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of a dense ``t.shape`` tensor in channels-last order (channels fastest)."""
    n, c, *spatial = t.shape
    inner = [c]  # stride of the last spatial axis
    for size in reversed(spatial[1:]):
        inner.insert(0, inner[0] * size)
    return (inner[0] * spatial[0], 1, *inner)


def normalise_precision(precision: str) -> str:
    """The canonical name (``auto``/``fp32``/``bf16``/``fp16``) of ``precision`` or one of its aliases."""
    key = str(precision).lower().replace("torch.", "").strip()
    if key not in _ALIASES:
        raise ValueError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
    return _ALIASES[key]


def _probe_cpu_bf16(rounds: int = 6) -> tuple[bool, str]:
    """Time one 3x3 convolution (64 -> 64 channels, 96x96, channels-last) in fp32 and in bf16 autocast.

    The two are timed in alternation and the fastest run of each is kept, so that a busy machine (which
    only ever adds time) slows both alike.
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
        torch.manual_seed(0)
        conv = nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.randn(1, 64, 96, 96).contiguous(memory_format=torch.channels_last)
    contexts = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    best = dict.fromkeys(contexts, float("inf"))
    with torch.no_grad():
        for i in range(rounds + 1):
            for name, ctx in contexts.items():
                with ctx():
                    t0 = time.perf_counter()
                    conv(x)
                    elapsed = time.perf_counter() - t0
                if i:  # the first round creates the oneDNN primitives
                    best[name] = min(best[name], elapsed)
    speedup = best["fp32"] / max(best["bf16"], 1e-9)
    return speedup >= _PROBE_MIN_SPEEDUP, f"probe: bf16 convolution {speedup:.1f}x the speed of fp32"


def _cpu_flags() -> set[str] | None:
    """The CPU feature flags the Linux kernel reports (``/proc/cpuinfo``); ``None`` elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _agree_across_ranks(supported: bool) -> bool:
    """Under ``torch.distributed`` (gloo, the CPU backend) every rank takes the same answer: native bf16
    only when every rank found it, so that all replicas build the same network layout (DDP checks it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return supported
    if dist.get_backend() != "gloo":
        return supported
    flag = torch.tensor([int(supported)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@functools.cache
def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (fast), and why: ``(supported, reason)``.

    ``MEDSEG_CPU_BF16=1``/``0`` forces the answer. Otherwise torch's report (oneDNN present and bf16
    supported by it, on an AVX-512 or AMX capable CPU) must be confirmed: a CPU without the
    ``avx512_bf16`` / ``amx_bf16`` flags (where the OS reports them: Linux) emulates bf16, which is slower
    than fp32; with them, or without a flag list, a timed probe (a few ms) must find bf16 at least 1.3x
    faster, since some CPUs with the instructions but no AMX run bf16 convolutions slower than fp32.
    In a distributed (gloo) run the ranks agree on one answer.
    """
    forced = os.environ.get(ENV_CPU_BF16, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True, f"forced by {ENV_CPU_BF16}={forced}"
    if forced in ("0", "false", "no", "off"):
        return False, f"forced by {ENV_CPU_BF16}={forced}"
    capability = torch.backends.cpu.get_cpu_capability()
    if not torch.backends.mkldnn.is_available():
        return False, "oneDNN (mkldnn) is not available in this torch build"
    try:
        reported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        reported = False
    if not reported or "AVX512" not in capability.upper():
        return False, f"torch reports no oneDNN bf16 support (CPU capability {capability})"
    flags = _cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"}) if flags is not None else []
    if flags is not None and not native:  # no bf16 instructions: emulated, no timing needed
        ok, reason = False, "no avx512_bf16/amx_bf16 CPU flag"
    else:
        # the instructions alone do not make bf16 faster: some AVX-512 BF16 CPUs without AMX run
        # oneDNN's bf16 convolutions slower than fp32, so the timed probe has the last word
        ok, reason = _probe_cpu_bf16()
        if native:
            reason = f"CPU flags {', '.join(native)}; {reason}"
    agreed = _agree_across_ranks(ok)
    if agreed != ok:
        reason += "; another process of this distributed run found no native bf16"
    return agreed, f"CPU capability {capability}; {reason}"


def _cuda_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported())


_logged: set[Precision] = set()


def resolve_precision(
    precision: str | Precision = "auto",
    device: torch.device | str | None = "cpu",
    channels_last: bool | None = None,
) -> Precision:
    """Resolve ``precision`` (``auto``/``fp32``/``bf16``/``fp16``) for ``device`` into a :class:`Precision`.

    ``channels_last``: ``None`` (default) uses channels-last layout on CPU only. An explicit ``bf16`` or
    ``fp16`` is honoured even where the hardware emulates it (with a warning); ``auto`` picks reduced
    precision only where it is native. The choice is logged once per process at INFO level.
    """
    if isinstance(precision, Precision):
        return precision
    name = normalise_precision(precision)
    dev = torch.device(device if device is not None else "cpu")
    kind = dev.type
    reason = ""
    if kind == "cpu":
        native, reason = cpu_bf16_support()
        if name == "auto":
            name = "bf16" if native else "fp32"
        elif name == "bf16" and not native:
            logger.warning("bf16 requested, but this CPU emulates bf16 (%s): it may be slow", reason)
        elif name == "fp16":
            logger.warning("precision fp16 requested on CPU: most CPUs emulate fp16 (slow); bf16 is native")
    elif kind == "cuda":
        bf16 = _cuda_bf16(dev)
        if name == "auto":
            name = "bf16" if bf16 else "fp16"
            reason = "bf16 supported by the GPU" if bf16 else "GPU without bf16: fp16 with loss scaling"
    elif name == "auto":
        name, reason = "fp32", f"no mixed precision on {kind}"
    plan = Precision(name, kind, (kind == "cpu") if channels_last is None else bool(channels_last))
    if plan not in _logged:
        _logged.add(plan)
        logger.info("precision: %s%s", plan, f" ({reason})" if reason else "")
    return plan


def prepare_network(network: nn.Module, precision: str | Precision = "auto") -> nn.Module:
    """Prepare ``network`` (in place) for ``precision`` on the device of its parameters; returns it.

    For bundle configs: ``"network": "$medseg.precision.prepare_network(@network_def.to(@device),
    @precision)"``.
    """
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return resolve_precision(precision, device).prepare(network)
