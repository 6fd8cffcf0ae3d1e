"""fold_batch_norm: eval-mode batch norms folded into the convolutions before them, outputs unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medseg.networks import BorderGatedEnsemble, UNet, fold_batch_norm


def _randomise_batch_norms(net: nn.Module, seed: int = 0) -> int:
    """Give every batch norm non-trivial statistics and affine parameters; returns how many there are."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
            n += 1
    return n


_KW = dict(in_channels=1, out_channels=2, features=4, depth=2, norm="batch")


def _batch_norms(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize(
    ("dims", "padding", "size"), [(2, "valid", 108), (2, "same", 32), (3, "valid", 52), (3, "same", 16)]
)
def test_folded_unet_gives_the_same_output(dims: int, padding: str, size: int) -> None:
    torch.manual_seed(0)
    net = UNet(spatial_dims=dims, padding=padding, **_KW)
    n = _randomise_batch_norms(net.eval())
    assert n == 10  # two per double convolution, (2 * depth + 1) double convolutions
    x = torch.randn(2, 1, *([size] * dims), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
        assert fold_batch_norm(net) == n
        out = net(x)
    assert not _batch_norms(net)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _fold_and_compare(seq: nn.Module, x: torch.Tensor, folded: int, tol: float) -> None:
    """Fold ``seq`` in place: ``folded`` batch norms go, and its output on ``x`` stays within ``tol``."""
    with torch.no_grad():
        ref = seq(x)
        assert fold_batch_norm(seq) == folded
        torch.testing.assert_close(seq(x), ref, rtol=tol, atol=tol)


def test_both_networks_of_the_border_gated_pair_are_folded() -> None:
    torch.manual_seed(0)
    border, plain = (UNet(spatial_dims=2, padding="valid", **_KW) for _ in range(2))
    pair = BorderGatedEnsemble(border, plain).eval()
    n = _randomise_batch_norms(pair)
    x = torch.rand(1, 1, 108, 108, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pair(x)
        assert fold_batch_norm(pair) == n == 20
        torch.testing.assert_close(pair(x), ref, rtol=1e-4, atol=1e-4)


def test_training_mode_is_refused() -> None:
    net = UNet(spatial_dims=2, **_KW)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(net.train())
    assert len(_batch_norms(net)) == 10


def test_batch_statistics_norms_and_other_layers_are_left_alone() -> None:
    """A batch norm without running statistics normalises by the batch even in eval mode: it stays;
    so do instance norms and a batch norm that does not follow a convolution."""
    seq = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
        nn.Conv2d(3, 3, 3), nn.InstanceNorm2d(3, affine=True), nn.ReLU(),
        nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1),
    ).eval()  # fmt: skip
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    _fold_and_compare(seq, x, folded=0, tol=0.0)
    assert len(_batch_norms(seq)) == 2


def test_prediction_engine_folds_a_copy(tmp_path: Path) -> None:
    """medseg predict runs the folded network; the caller's network keeps its batch norms."""
    from monai.inferers import SimpleInferer

    from medseg.predict.engine import BatchPredictor

    torch.manual_seed(0)
    net = UNet(spatial_dims=2, padding="same", **_KW)
    n = _randomise_batch_norms(net)
    engine = BatchPredictor(net, lambda d: d, SimpleInferer(), None, tmp_path / "out", precision="fp32")
    assert not _batch_norms(engine.network) and len(_batch_norms(net)) == n
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(engine.network(x), net(x), rtol=1e-4, atol=1e-4)


def test_transposed_convolutions_and_norms_without_affine_parameters_are_folded() -> None:
    seq = nn.Sequential(
        nn.ConvTranspose2d(2, 3, 2, stride=2), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False),
    )  # fmt: skip
    _randomise_batch_norms(seq.eval())
    x = torch.randn(2, 2, 9, 9, generator=torch.Generator().manual_seed(5))
    _fold_and_compare(seq, x, folded=2, tol=1e-5)
    assert isinstance(seq[0], nn.ConvTranspose2d) and isinstance(seq[4], nn.Identity)


def test_a_grouped_transposed_convolution_keeps_its_batch_norm() -> None:
    seq = nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6))
    _randomise_batch_norms(seq.eval())
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(6))
    _fold_and_compare(seq, x, folded=0, tol=0.0)
    assert len(_batch_norms(seq)) == 1
