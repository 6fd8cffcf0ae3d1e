"""Pixel-weighted cross-entropy (paper eq. 1) and the Dice + BCE/CE losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medseg.transforms import UNetWeightMap
from monai.losses import DiceCELoss, DiceLoss

from medseg.losses import DiceBCELoss, WeightedCrossEntropyLoss


@pytest.fixture(params=[(2, 3, 12, 10), (2, 4, 6, 5, 7)], ids=["2d", "3d"])
def logits_target(request: pytest.FixtureRequest) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = request.param
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    return logits, target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unit_weights_equal_torch_cross_entropy(logits_target, reduction: str) -> None:
    logits, target = logits_target
    expected = F.cross_entropy(logits, target, reduction=reduction)
    loss = WeightedCrossEntropyLoss(reduction=reduction)
    ones = torch.ones_like(target, dtype=torch.float64).unsqueeze(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).double()
    for tgt, w in [(target, None), (target.unsqueeze(1), ones), (target.unsqueeze(1).float(), ones[:, 0])]:
        torch.testing.assert_close(loss(logits, tgt, w), expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss(logits, onehot, ones), expected.float(), rtol=1e-5, atol=1e-5)
    # soft targets (class probabilities) too, as F.cross_entropy accepts them
    probs = torch.softmax(torch.randn_like(logits), 1)
    torch.testing.assert_close(
        loss(logits, probs, ones),
        F.cross_entropy(logits, probs, reduction=reduction).float(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_weights_scale_per_pixel_terms(logits_target) -> None:
    logits, target = logits_target
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(target.shape, generator=g, dtype=torch.float64) * 5
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    none = WeightedCrossEntropyLoss(reduction="none")(logits, target.unsqueeze(1), weight.unsqueeze(1))
    torch.testing.assert_close(none, (per_pixel * weight).float(), rtol=1e-5, atol=1e-6)
    mean = WeightedCrossEntropyLoss()(logits, target, weight)
    torch.testing.assert_close(mean, (per_pixel * weight).mean().float(), rtol=1e-5, atol=1e-6)
    normalized = WeightedCrossEntropyLoss(normalize=True)(logits, target, weight)
    torch.testing.assert_close(
        normalized, ((per_pixel * weight).sum() / weight.sum()).float(), rtol=1e-5, atol=1e-6
    )
    # weight 0 with normalize=True acts as an ignore label
    mask = torch.zeros_like(weight)
    mask[:, :2] = 1
    ign = WeightedCrossEntropyLoss(normalize=True)(logits, target, mask)
    torch.testing.assert_close(ign, per_pixel[:, :2].mean().float(), rtol=1e-5, atol=1e-6)


def test_class_weights_multiply_each_pixel_by_its_class_weight(logits_target) -> None:
    """``class_weights`` as ``F.cross_entropy``'s ``weight``, on top of the pixel weights; one-hot targets
    the same; a wrong number of weights is reported."""
    logits, target = logits_target
    n = logits.shape[1]
    cw = [1.0 + k for k in range(n)]
    weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = F.cross_entropy(logits, target, weight=torch.tensor(cw, dtype=torch.float64), reduction="none")
    loss = WeightedCrossEntropyLoss(reduction="none", class_weights=cw)
    want = (expected * weight).float()
    torch.testing.assert_close(loss(logits, target, weight), want, rtol=1e-5, atol=1e-6)
    onehot = F.one_hot(target, n).movedim(-1, 1).double()
    torch.testing.assert_close(loss(logits, onehot, weight), want, rtol=1e-5, atol=1e-6)
    plain = WeightedCrossEntropyLoss(reduction="none")(logits, target, weight)
    assert not torch.allclose(loss(logits, target, weight), plain)
    with pytest.raises(ValueError, match="class_weights"):
        WeightedCrossEntropyLoss(class_weights=[1.0] * (n + 1))(logits, target)


def test_gradients_flow_and_are_weighted() -> None:
    logits = torch.randn(1, 2, 8, 8, requires_grad=True)
    target = torch.randint(0, 2, (1, 1, 8, 8))
    weight = torch.ones(1, 1, 8, 8)
    weight[..., 4:] = 0.0
    weight[..., 0, 0] = 10.0
    WeightedCrossEntropyLoss(reduction="sum")(logits, target, weight).backward()
    grad = logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad[..., :4].abs().sum() > 0 and grad[..., 4:].abs().sum() == 0  # weight 0: no gradient
    ref = torch.autograd.grad(F.cross_entropy(logits, target[:, 0], reduction="sum"), logits)[0]
    torch.testing.assert_close(grad[..., 0, 0], 10 * ref[..., 0, 0])
    torch.testing.assert_close(grad[..., 1:4], ref[..., 1:4])


def test_with_unet_weight_map() -> None:
    lab = np.zeros((1, 40, 60), np.int32)
    lab[0, 10:30, 10:20], lab[0, 10:30, 22:40] = 1, 2
    weight = torch.as_tensor(UNetWeightMap()(lab))[None]
    target = torch.as_tensor(lab > 0).long()[None]
    logits = torch.zeros(1, 2, 40, 60)  # uniform prediction: every pixel term is w * ln 2
    loss = WeightedCrossEntropyLoss()(logits, target, weight)
    assert loss.item() == pytest.approx(weight.mean().item() * np.log(2), rel=1e-5)


def test_autocast_computes_in_float32() -> None:
    conv = torch.nn.Conv2d(1, 3, 1)
    x = torch.randn(2, 1, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        loss = WeightedCrossEntropyLoss()(logits, target, torch.ones(2, 1, 8, 8))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target[:, 0]))
    loss.backward()
    assert conv.weight.grad is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_autocast() -> None:
    logits = torch.randn(2, 3, 16, 16, device="cuda", requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 16, 16), device="cuda")
    weight = torch.rand(2, 1, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = WeightedCrossEntropyLoss()(logits.half(), target, weight.half())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = (
        F.cross_entropy(logits.half().float(), target[:, 0], reduction="none") * weight.half().float()
    ).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None


def test_bad_shapes_are_reported() -> None:
    loss = WeightedCrossEntropyLoss()
    with pytest.raises(ValueError, match="C >= 2"):
        loss(torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="class indices"):
        loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        WeightedCrossEntropyLoss(reduction="average")


def test_dice_bce_is_monai_dice_plus_bce() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 16, 16, generator=g)
    target = (torch.rand(2, 1, 16, 16, generator=g) > 0.6).float()
    expected = DiceLoss(sigmoid=True)(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(DiceBCELoss()(logits, target), expected)
    # several channels: multi-label BCE (not softmax CE as DiceCELoss would use)
    logits3 = torch.randn(2, 3, 8, 8, 8, generator=g)
    target3 = (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.5).float()
    expected3 = 0.5 * DiceLoss(sigmoid=True)(logits3, target3) + F.binary_cross_entropy_with_logits(
        logits3, target3
    )
    torch.testing.assert_close(DiceBCELoss(lambda_dice=0.5)(logits3, target3), expected3)
    with pytest.raises(ValueError, match="target shape"):
        DiceBCELoss()(logits3, target3[:, :1])
    assert isinstance(DiceBCELoss(), DiceCELoss)
