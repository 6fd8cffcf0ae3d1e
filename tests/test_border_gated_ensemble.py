"""BorderGatedEnsemble and its training loss: the gated combination, the two training outputs, the
shape arithmetic it forwards, and that each member is trained on its own loss only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.inferers import OverlapTileInferer
from medseg.losses import BorderGatedEnsembleLoss, WeightedCrossEntropyLoss
from medseg.networks import BorderGatedEnsemble, UNet


class _Fixed(nn.Module):
    """A 'network' whose foreground probability is a fixed map (logits 0 and logit(p))."""

    def __init__(self, p: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("p", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = torch.logit(self.p).expand(x.shape[0], 1, *self.p.shape)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def _unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(
        spatial_dims=2, in_channels=1, out_channels=2, features=4, depth=2, padding="valid", norm="batch"
    )


def test_gated_foreground_keeps_the_border_networks_gaps() -> None:
    # pixel:            gap cut   filled   dim nucleus   plain alone   both sure
    p_border = torch.tensor([[0.30, 0.40, 0.45, 0.05, 0.95]])
    p_plain = torch.tensor([[0.90, 0.90, 0.70, 0.90, 0.90]])
    net = BorderGatedEnsemble(_Fixed(p_border), _Fixed(p_plain), gate=0.35).eval()
    prob = torch.softmax(net(torch.zeros(1, 1, 1, 5)), dim=1)[0]
    assert torch.allclose(prob.sum(0), torch.ones(1, 5))
    mask = prob.argmax(0)[0].tolist()
    # mean > 0.5 everywhere but the fourth pixel; the first stays background: the border net's 0.30 < gate
    assert mask == [0, 1, 1, 0, 1]
    mean = (p_border + p_plain) / 2
    # q is the mean where the border network is sure enough (it scores the objects) ...
    assert torch.allclose(prob[1, 0, [2, 4]], mean[0, [2, 4]], atol=1e-6)
    # ... else the border network's probability scaled so that the gate maps to 0.5
    assert torch.allclose(prob[1, 0, [0, 1, 3]], p_border[0, [0, 1, 3]] * 0.5 / 0.35, atol=1e-6)
    assert prob[1, 0, 0] < 0.5 < mean[0, 0]


def test_eval_output_matches_the_formula_on_real_unets() -> None:
    a, b = _unet(0).eval(), _unet(1).eval()
    net = BorderGatedEnsemble(a, b, gate=0.35).eval()
    x = torch.rand(2, 1, 44, 44)
    with torch.no_grad():
        pa, pb = torch.softmax(a(x), 1)[:, 1:], torch.softmax(b(x), 1)[:, 1:]
        q = torch.softmax(net(x), 1)[:, 1:]
    expected = torch.minimum((pa + pb) / 2, pa * (0.5 / 0.35))
    assert q.shape == (2, 1, 4, 4)
    assert torch.allclose(q, expected, atol=1e-6)
    assert torch.equal(q > 0.5, ((pa + pb) / 2 > 0.5) & (pa > 0.35))


def test_training_output_stacks_both_networks_and_the_loss_trains_each_on_its_own() -> None:
    a, b = _unet(0), _unet(1)
    net = BorderGatedEnsemble(a, b).train()
    x = torch.rand(2, 1, 44, 44)
    target = (torch.rand(2, 1, 4, 4) > 0.5).float()
    weight = 1 + 9 * torch.rand(2, 1, 4, 4)
    torch.manual_seed(0)
    out = net(x)
    assert out.shape == (2, 4, 4, 4)
    loss_fn = BorderGatedEnsembleLoss(plain_class_weights=[0.3, 1.0])
    loss = loss_fn(out, target, weight)
    border_term = WeightedCrossEntropyLoss()(out[:, :2], target, weight)
    plain_term = WeightedCrossEntropyLoss(class_weights=[0.3, 1.0])(out[:, 2:], target)
    assert torch.allclose(loss, border_term + plain_term)
    # the plain network's gradient does not see the weight map: same gradient with another map
    loss.backward()
    grads = [p.grad.clone() for p in b.parameters()]
    net.zero_grad()
    torch.manual_seed(0)
    loss_fn(net(x), target, torch.ones_like(weight)).backward()
    assert all(torch.allclose(g, p.grad) for g, p in zip(grads, b.parameters(), strict=True))
    assert any(p.grad.abs().sum() > 0 for p in a.parameters())
    with pytest.raises(ValueError, match="training mode"):
        loss_fn(out[:, :2], target, weight)


def test_shape_arithmetic_is_the_members_and_tiling_stays_exact() -> None:
    a, b = _unet(0).eval(), _unet(1).eval()
    net = BorderGatedEnsemble(a, b).eval()
    assert (net.border, net.size_divisor) == (a.border, a.size_divisor)
    assert net.output_size((44, 60)) == a.output_size((44, 60))
    assert net.valid_input_size((50, 50)) == a.valid_input_size((50, 50))
    assert net.input_size_for_output((30, 30)) == a.input_size_for_output((30, 30))
    x = torch.rand(1, 1, 70, 90)
    with torch.no_grad():
        whole = OverlapTileInferer(roi_size=(200, 200))(x, net)
        tiled = OverlapTileInferer(roi_size=(44, 44))(x, net)
    assert whole.shape == (1, 2, 70, 90)
    assert torch.allclose(whole, tiled, atol=1e-4)  # overlap-tile is exact for the valid-conv pair too


def test_members_must_share_their_geometry() -> None:
    deeper = UNet(spatial_dims=2, in_channels=1, out_channels=2, features=4, depth=3, padding="valid")
    with pytest.raises(ValueError, match="differ in border"):
        BorderGatedEnsemble(_unet(0), deeper)
    with pytest.raises(ValueError, match="gate"):
        BorderGatedEnsemble(_unet(0), _unet(1), gate=0.7)


def test_scripts_with_torchscript() -> None:
    net = BorderGatedEnsemble(_unet(0), _unet(1)).eval()
    x = torch.rand(1, 1, 44, 44)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(net)(x), net(x))


class _Counting(nn.Module):
    """Wraps a network and counts its forward passes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("axes", [[0], [0, 1]])
def test_border_flips_average_only_the_border_networks_mirrored_logits(axes: list[int]) -> None:
    a, b = _Counting(_unet(0).eval()), _Counting(_unet(1).eval())
    net = BorderGatedEnsemble(a, b, gate=0.35, border_flip_axes=axes).eval()
    x = torch.rand(2, 1, 60, 76)
    dims = [[2 + d for d in c] for c in ([[0]] if axes == [0] else [[0], [1], [0, 1]])]
    with torch.no_grad():
        q = torch.softmax(net(x), 1)[:, 1:]
        assert (a.calls, b.calls) == (1 + len(dims), 1)  # the plain network runs once
        logits = a.net(x) + sum(torch.flip(a.net(torch.flip(x, d)), d) for d in dims)
        pa = torch.softmax(logits / (1 + len(dims)), 1)[:, 1:]
        pb = torch.softmax(b.net(x), 1)[:, 1:]
        single = torch.softmax(BorderGatedEnsemble(a.net, b.net).eval()(x), 1)[:, 1:]
    assert torch.allclose(q, torch.minimum((pa + pb) / 2, pa * (0.5 / 0.35)), atol=1e-6)
    assert (q - single).abs().max() > 1e-3  # the mirrored passes change the output


def test_border_flips_keep_the_channels_last_layout_and_script() -> None:
    seen: list[bool] = []
    wide = BorderGatedEnsemble(_unet2(0), _unet2(1), border_flip_axes=[0]).eval()
    wide.border_net.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    net = BorderGatedEnsemble(_unet(0), _unet(1), border_flip_axes=[1]).eval()
    x = torch.rand(1, 1, 60, 60)
    with torch.no_grad():
        wide(torch.rand(1, 2, 60, 60).contiguous(memory_format=torch.channels_last))
        assert torch.equal(torch.jit.script(net)(x), net(x))
    assert seen == [True, True]  # the mirrored pass of a 2-channel input stays channels-last


def _unet2(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(
        spatial_dims=2, in_channels=2, out_channels=2, features=4, depth=2, padding="valid", norm="batch"
    )


def test_border_flips_are_eval_only_and_checked() -> None:
    a, b = _unet(0), _unet(1)
    net = BorderGatedEnsemble(a, b, border_flip_axes=[0]).train()
    x = torch.rand(2, 1, 44, 44)
    torch.manual_seed(0)
    out = net(x)
    torch.manual_seed(0)
    assert torch.equal(out, torch.cat([a(x), b(x)], dim=1))  # training: the raw logits, no mirrored pass
    with pytest.raises(ValueError, match="spatial axes"):
        BorderGatedEnsemble(_unet(0), _unet(1), border_flip_axes=[-1])
    with pytest.raises(ValueError, match="out of range"), torch.no_grad():
        BorderGatedEnsemble(_unet(0), _unet(1), border_flip_axes=[2]).eval()(x)
