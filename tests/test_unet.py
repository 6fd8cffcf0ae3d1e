"""Tests for medseg.networks.UNet and its shape arithmetic."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from medseg.networks import (
    UNet,
    unet_border,
    unet_input_size_for_output,
    unet_is_valid_input_size,
    unet_output_size,
    unet_size_divisor,
    unet_valid_input_size,
)

DEPTHS = (2, 3, 4, 5)


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are tiny: on a shared 2-core machine OpenMP spin-waiting made a training step ~20x
    slower with 2 threads than with 1 (measured). One thread keeps the file fast and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _smallest_valid(depth: int, padding: str) -> int:
    """Independent of the module: the smallest size found by running the network would do too, but a
    starting point for the other axes is needed; it is itself checked by the brute force below."""
    if padding == "same":
        return 2**depth
    return (7 if depth == 1 else 8) * 2**depth + 4 * (2**depth - 1)


def _brute_force_output(model: UNet, shape: tuple[int, ...], device: str = "cpu") -> tuple[int, ...] | None:
    """Runs ``model`` (built with ``check_size=False``) on a zero tensor of ``shape``.

    Returns the spatial output size, or None when the size is invalid: the network fails, or some
    max-pooling sees an odd size (it would silently drop a row and misalign the skip connections).
    """
    seen: list[tuple[int, ...]] = []
    hook = model.pool.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[2:])))
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, device=device))
    except RuntimeError:
        return None
    finally:
        hook.remove()
    if any(n % 2 for sizes in seen for n in sizes):
        return None
    return tuple(out.shape[2:])


def _check_against_brute_force(
    model: UNet, depth: int, padding: str, spatial_dims: int, sizes: list[int], device: str = "cpu"
) -> dict[int, int]:
    """Compares every helper with the network itself, varying axis 0, other axes at a valid size."""
    other = _smallest_valid(depth, padding)
    valid: dict[int, int] = {}
    for n in sizes:
        shape = (1, 1, n) + (other,) * (spatial_dims - 1)
        got = _brute_force_output(model, shape, device)
        spatial = shape[2:]
        assert unet_is_valid_input_size(spatial, depth, padding) == (got is not None), (depth, padding, n)
        if got is None:
            with pytest.raises(ValueError, match="nearest valid sizes"):
                unet_output_size(spatial, depth, padding)
        else:
            assert unet_output_size(spatial, depth, padding) == got
            valid[n] = got[0]
    assert len(valid) >= 3, "the size range must contain several valid sizes"
    # floor / ceil / nearest against the brute-force list, where the answer lies inside the range
    ordered = sorted(valid)
    for n in range(min(sizes), max(sizes) + 1):
        below = [v for v in ordered if v <= n]
        above = [v for v in ordered if v >= n]
        if above:
            assert unet_valid_input_size((n,), depth, padding, "ceil") == (above[0],)
        if below and (min(sizes) == 1 or below[0] != ordered[0]):
            assert unet_valid_input_size((n,), depth, padding, "floor") == (below[-1],)
        if below and above and (min(sizes) == 1 or below[0] != ordered[0]):
            lo, hi = below[-1], above[0]
            want = hi if hi - n <= n - lo else lo
            assert unet_valid_input_size((n,), depth, padding, "nearest") == (want,)
    # smallest input whose output covers a wanted output size
    for o in range(1, max(valid.values()) + 1):
        want = min(v for v in ordered if valid[v] >= o)
        if min(sizes) == 1 or want != ordered[0]:
            assert unet_input_size_for_output((o,), depth, padding) == (want,)
    return valid


# ---------------------------------------------------------------------------------------------------
# The paper's network
# ---------------------------------------------------------------------------------------------------


def test_paper_network_layout_and_size() -> None:
    with torch.device("meta"):  # shapes and counts only: no 31M-weight init on CPU
        model = UNet(spatial_dims=2, in_channels=1, out_channels=2)
    assert sum(p.numel() for p in model.parameters()) == 31_030_658
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert len(convs) == 23
    kinds = sorted((type(m).__name__, m.kernel_size) for m in convs)
    assert kinds.count(("Conv2d", (3, 3))) == 18
    assert kinds.count(("ConvTranspose2d", (2, 2))) == 4
    assert kinds.count(("Conv2d", (1, 1))) == 1
    assert all(m.padding == (0, 0) for m in convs)
    assert [m.out_channels for m in convs if m.kernel_size == (3, 3)][:10] == [
        64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024
    ]
    assert model.border == 92 and model.size_divisor == 16
    assert model.output_size((572, 572)) == (388, 388)
    assert model.input_size_for_output((388, 388)) == (572, 572)
    # the real forward at 572 x 572, run on the meta device (shapes only, no arithmetic)
    assert tuple(model(torch.empty(1, 1, 572, 572, device="meta")).shape) == (1, 2, 388, 388)


def test_he_normal_init() -> None:
    torch.manual_seed(0)
    model = UNet(features=64, depth=2)
    conv = model.encoders[1][2]  # 3x3, 128 -> 128: 147,456 weights
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 128)), rel=0.02)
    assert conv.weight.mean().abs().item() < 1e-3 and torch.all(conv.bias == 0)
    up = model.decoders[0].up  # 2x2 stride 2, 256 -> 128: one tap per input channel per output unit
    assert up.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.03)
    assert model.head.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.5)


def test_dropout_at_end_of_contracting_path() -> None:
    model = UNet(features=2, depth=2)
    assert isinstance(model.dropout, nn.Dropout2d) and model.dropout.p == 0.5
    assert isinstance(UNet(features=2, depth=2, dropout=0.0).dropout, nn.Identity)
    x = torch.randn(1, 1, 44, 44)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout active while training
    model.eval()
    assert torch.equal(model(x), model(x))


# ---------------------------------------------------------------------------------------------------
# Shape helpers against the network itself
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_helpers_match_network_meta(spatial_dims: int, padding: str) -> None:
    """Every size from 1 to three steps past the smallest valid one, for depths 1-5, in 2D and 3D.

    The network runs on the meta device: the real ops with their own shape functions but no arithmetic,
    which keeps hundreds of forwards of a 380^3 input cheap. test_helpers_match_network_cpu checks that
    the meta runs agree with CPU runs.
    """
    for depth in (1, *DEPTHS):
        with torch.device("meta"):
            model = UNet(spatial_dims, features=2, depth=depth, padding=padding, check_size=False)
        first = _smallest_valid(depth, padding)
        sizes = list(range(1, first + 3 * 2**depth + 2))
        valid = _check_against_brute_force(model, depth, padding, spatial_dims, sizes, "meta")
        assert min(valid) == first


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_helpers_match_network_cpu(padding: str) -> None:
    """Real 2D CPU forwards around the first two valid sizes of every depth, both axes."""
    torch.manual_seed(0)
    for depth in DEPTHS:
        cpu = UNet(features=2, depth=depth, padding=padding, check_size=False).eval()
        with torch.device("meta"):
            meta = UNet(features=2, depth=depth, padding=padding, check_size=False)
        first = _smallest_valid(depth, padding)
        step = 2**depth
        sizes = [n for n in (first - 2, first - 1, first, first + 1, first + step - 1, first + step) if n > 0]
        for n in sizes:
            for shape in ((1, 1, n, first), (1, 1, first, n)):
                got = _brute_force_output(cpu, shape)
                assert got == _brute_force_output(meta, shape, "meta"), (depth, shape)
                assert unet_is_valid_input_size(shape[2:], depth, padding) == (got is not None), shape
                if got is not None:
                    assert unet_output_size(shape[2:], depth, padding) == got


def test_real_3d_forward_matches_helpers() -> None:
    for padding, size in (("valid", (44, 48, 52)), ("same", (8, 12, 16))):
        model = UNet(spatial_dims=3, features=2, depth=2, padding=padding).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 1, *size))
        assert tuple(out.shape[2:]) == model.output_size(size)


def test_border_and_crop_arithmetic() -> None:
    for depth in DEPTHS:
        assert unet_border(depth) == 6 * 2**depth - 4
        assert unet_border(depth, "same") == 0
        assert unet_size_divisor(depth) == 2**depth
        n = _smallest_valid(depth, "valid") + 5 * 2**depth
        assert unet_output_size((n,), depth) == (n - 2 * unet_border(depth),)
    with torch.device("meta"):
        model = UNet(depth=4)
    assert [d.crop for d in model.decoders] == [4, 16, 40, 88]  # Fig. 1: 64->56, 136->104, ...
    assert model.output_size((188,)) == (4,)


def test_helper_inputs_and_errors() -> None:
    with torch.device("meta"):
        model = UNet()
    assert model.output_size([572, 572]) == unet_output_size((572, 572))
    assert model.output_size(np.array([572, 588])) == (388, 404)
    assert model.output_size((np.int64(572),)) == (388,)
    assert unet_output_size(572) == (388,)
    assert model.is_valid_input_size((572, 588, 188)) and not model.is_valid_input_size((572, 574))
    assert model.valid_input_size((571, 580, 590)) == (572, 588, 588)  # 580 is a tie: goes up
    assert model.valid_input_size((571, 580), mode="floor") == (556, 572)
    assert model.valid_input_size((571, 10), mode="ceil") == (572, 188)
    assert model.valid_input_size((10,)) == (188,)
    with pytest.raises(ValueError, match="smallest valid size is 188"):
        model.valid_input_size((10,), mode="floor")
    with pytest.raises(ValueError, match="mode must be one of"):
        model.valid_input_size((572,), mode="round")
    with pytest.raises(ValueError, match=r"Axis 1 has 573: nearest valid sizes are 572 and 588"):
        model.output_size((572, 573))
    with pytest.raises(ValueError, match=r"188 \(the smallest\)"):
        model.output_size((100,))
    with pytest.raises(TypeError, match="sequence of ints"):
        model.output_size((572.5,))
    with pytest.raises(ValueError, match="output_size must be >= 1"):
        model.input_size_for_output((0,))
    with torch.device("meta"):
        same = UNet(padding="same", depth=4)
    assert same.border == 0 and same.output_size((96, 112)) == (96, 112)
    assert same.valid_input_size((100, 104)) == (96, 112)
    assert same.input_size_for_output((97,)) == (112,)
    with pytest.raises(ValueError, match="nearest valid sizes are 96 and 112"):
        same.output_size((100,))


def test_forward_rejects_invalid_size_clearly() -> None:
    model = UNet(features=2, depth=2).eval()
    with pytest.raises(ValueError, match="Axis 0 has 45: nearest valid sizes are 44 and 48"):
        model(torch.zeros(1, 1, 45, 44))
    with pytest.raises(ValueError, match="2 spatial dims"):
        model(torch.zeros(1, 44, 44))
    same = UNet(features=2, depth=3, padding="same", norm="batch").eval()
    with pytest.raises(ValueError, match="nearest valid sizes are 16 and 24"):
        same(torch.zeros(1, 1, 20, 16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"depth": 0}, "depth"),
        ({"padding": "reflect"}, "padding"),
        ({"features": 0}, "features"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Padded variant
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, norm_type", [("batch", nn.modules.batchnorm._BatchNorm),
                                             ("instance", nn.modules.instancenorm._InstanceNorm)])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_padded_variant_keeps_size(spatial_dims: int, norm: str, norm_type: type) -> None:
    torch.manual_seed(0)
    for depth in (2, 3, 4):
        model = UNet(spatial_dims=spatial_dims, features=2, depth=depth, padding="same", norm=norm)
        norms = [m for m in model.modules() if isinstance(m, norm_type)]
        assert len(norms) == 4 * depth + 2 and all(m.affine for m in norms)
        convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        assert all(m.bias is None for m in convs if m.kernel_size[0] == 3)
        d = 2**depth
        ks = (1, 2, 3) if spatial_dims == 2 else (1, 2)
        for k in ks:
            size = tuple(d * (k + i) for i in range(spatial_dims))  # non-cubic too
            x = torch.randn(2, 1, *size)
            # instance/batch norm need > 1 value per channel while training: 1-pixel bottoms in eval
            model.train(k > 1)
            with torch.no_grad():
                y = model(x)
            assert y.shape == (2, 2, *size)
            assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------


def test_overfits_small_synthetic_task() -> None:
    """Discs on noise: the valid-mode network's loss on the center-cropped labels falls clearly."""
    torch.manual_seed(0)
    model = UNet(features=8, depth=2, dropout=0.0)
    n = model.valid_input_size((80,))[0]
    border = model.border
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    images, labels = [], []
    for _ in range(4):
        cy, cx = torch.randint(border, n - border, (2,)).tolist()
        r = int(torch.randint(5, 12, ()).item())
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).long()
        images.append(mask.float() + 0.3 * torch.randn(n, n))
        labels.append(mask)
    x = torch.stack(images)[:, None]
    y = torch.stack(labels)[:, border:-border, border:-border]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert min(losses[-5:]) < 0.2


# ---------------------------------------------------------------------------------------------------
# Export and execution modes
# ---------------------------------------------------------------------------------------------------


def _roundtrip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({"spatial_dims": 2, "depth": 2}, (44, 60)),
        ({"spatial_dims": 3, "depth": 2, "padding": "same", "norm": "instance"}, (8, 12, 16)),
        ({"spatial_dims": 2, "depth": 3, "padding": "same", "norm": "batch"}, (16, 24)),
    ],
)
def test_torchscript_script_save_load(kwargs: dict, size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = UNet(features=4, **kwargs).eval()
    loaded = _roundtrip(torch.jit.script(model))
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    bad = list(size)
    bad[0] += 1
    with pytest.raises((ValueError, RuntimeError, torch.jit.Error), match="nearest valid sizes"):
        loaded(torch.randn(1, 1, *bad))


def test_torchscript_trace_generalises_over_sizes() -> None:
    torch.manual_seed(0)
    model = UNet(features=4, depth=2).eval()
    traced = _roundtrip(torch.jit.trace(model, torch.randn(1, 1, 44, 44)))
    x = torch.randn(2, 1, 60, 76)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_monai_bundle_ckpt_export(tmp_path) -> None:
    from monai.bundle import ckpt_export

    torch.manual_seed(0)
    net = {"_target_": "medseg.networks.UNet", "spatial_dims": 2, "features": 4, "depth": 2}
    config = tmp_path / "inference.json"
    config.write_text(json.dumps({"network_def": net}))
    model = UNet(spatial_dims=2, features=4, depth=2).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        config_file=str(config),
    )
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(1, 1, 60, 44)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("spatial_dims, padding", [(2, "valid"), (3, "same")])
def test_channels_last(spatial_dims: int, padding: str) -> None:
    torch.manual_seed(0)
    model = UNet(spatial_dims=spatial_dims, features=4, depth=2, padding=padding).eval()
    size = (44, 48, 52)[:spatial_dims] if padding == "valid" else (8, 12, 16)[:spatial_dims]
    x = torch.randn(2, 1, *size)
    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=fmt)
        out = model_cl(x.contiguous(memory_format=fmt))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_autocast_cpu_bfloat16() -> None:
    torch.manual_seed(0)
    model = UNet(features=4, depth=2).eval()
    x = torch.randn(1, 1, 60, 60)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_channels_last() -> None:
    torch.manual_seed(0)
    model = UNet(features=8, depth=3).eval().cuda()
    x = torch.randn(2, 1, 124, 124, device="cuda")
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_torch_compile_full_graph() -> None:
    """Dynamo captures forward as one graph (no graph breaks), also once sizes turn dynamic; the eager
    backend keeps this fast. Without fullgraph an invalid size still gets the clear ValueError (under
    fullgraph=True Dynamo turns any raised exception into its own "Observed exception" error)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = UNet(features=4, depth=2, padding="same", norm="batch").eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for size in ((16, 24), (32, 28)):
            x = torch.randn(1, 1, *size)
            torch.testing.assert_close(compiled(x), model(x))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), pytest.raises(ValueError, match="nearest valid sizes are 16 and 20"):
        compiled(torch.randn(1, 1, 18, 24))
