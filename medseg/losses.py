"""Losses: U-Net pixel-weighted cross-entropy (Ronneberger et al. 2015, section 3, eq. 1), Dice + CE/BCE.

``WeightedCrossEntropyLoss`` is the paper's energy: softmax over the classes, cross-entropy per pixel,
multiplied by a per-pixel weight map (e.g. from :class:`medseg.transforms.UNetWeightMapd`). MONAI has
no per-pixel weighted cross-entropy. Dice + cross-entropy is MONAI's :class:`monai.losses.DiceCELoss`,
re-exported here; :class:`DiceBCELoss` is that loss for one sigmoid output (BCE + Dice, a common U-Net
brain-tumour recipe). :class:`BorderGatedEnsembleLoss` trains the two members of
:class:`medseg.networks.BorderGatedEnsemble`, one with the weight map and one without its border term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = ["WeightedCrossEntropyLoss", "DiceCELoss", "DiceBCELoss", "BorderGatedEnsembleLoss"]


class WeightedCrossEntropyLoss(_Loss):
    """Softmax cross-entropy per pixel times a per-pixel weight map, 2D or 3D.

    ``loss(logits, target, weight)`` with

    - ``logits``: ``(B, C, *spatial)``, ``C >= 2`` unnormalised scores;
    - ``target``: class indices ``(B, 1, *spatial)`` or ``(B, *spatial)`` (integer, or float holding
      integers, e.g. after a spatial transform), or one-hot / class probabilities ``(B, C, *spatial)``
      (float, as ``torch.nn.functional.cross_entropy`` accepts);
    - ``weight``: ``(B, 1, *spatial)``, ``(B, *spatial)`` or anything broadcastable to ``(B, *spatial)``;
      ``None`` = all ones.

    The per-pixel term is ``weight(x) * -log softmax(logits)(x)[target(x)]``, computed in float32 (also
    under autocast). Reduction, as MONAI losses: ``"mean"`` = plain mean over all ``B * prod(spatial)``
    pixel terms (the paper's sum over pixels, divided by their number; with weight 1 this is
    ``F.cross_entropy``), ``"sum"`` = their sum, ``"none"`` = the ``(B, *spatial)`` map of terms.
    With ``normalize=True``, ``"mean"`` divides by the sum of the weights instead (a weighted average,
    so weight 0 excludes a pixel, like an ignore label). ``class_weights`` (one per class) multiply the
    term of each pixel by its target class's weight, as ``weight`` of ``F.cross_entropy`` (e.g. to
    emphasise a thin contour class); the normalising sum does not include them.
    """

    def __init__(
        self,
        reduction: LossReduction | str = LossReduction.MEAN,
        normalize: bool = False,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.normalize = normalize
        self.class_weights = (
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        )

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if logits.dim() < 3:
            raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
        n_classes = logits.shape[1]
        if n_classes < 2:
            raise ValueError("softmax cross-entropy needs C >= 2 channels (use DiceBCELoss for one channel)")
        batch, spatial = logits.shape[0], logits.shape[2:]
        cw = None
        if self.class_weights is not None:
            if self.class_weights.numel() != n_classes:
                raise ValueError(f"{self.class_weights.numel()} class_weights for {n_classes} classes")
            cw = self.class_weights.to(logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if target.shape == logits.shape and target.is_floating_point():
                nll = F.cross_entropy(logits.float(), target.float(), weight=cw, reduction="none")
            else:
                if target.dim() == logits.dim():
                    if target.shape[1] != 1:
                        raise ValueError(
                            f"target {tuple(target.shape)} is neither class indices (B, 1, ...) / (B, ...) "
                            f"nor one-hot {tuple(logits.shape)}"
                        )
                    target = target[:, 0]
                if target.shape != (batch, *spatial):
                    raise ValueError(
                        f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
                    )
                nll = F.cross_entropy(logits.float(), target.long(), weight=cw, reduction="none")
            if weight is not None:
                w = weight.float()
                if w.dim() == logits.dim() and w.shape[1] == 1:
                    w = w[:, 0]
                nll = nll * w
            if self.reduction == LossReduction.SUM.value:
                return nll.sum()
            if self.reduction == LossReduction.NONE.value:
                return nll
            if self.normalize and weight is not None:
                total = torch.broadcast_to(w, nll.shape).sum()
                return nll.sum() / total.clamp_min(torch.finfo(nll.dtype).tiny)
            return nll.mean()


class DiceBCELoss(DiceCELoss):
    """Dice + binary cross-entropy on sigmoid outputs, for a single foreground class.

    MONAI's :class:`~monai.losses.DiceCELoss` with ``sigmoid=True``: for one output channel it uses
    ``BCEWithLogitsLoss``. For several channels (multi-label, e.g. overlapping tumour regions) the BCE
    is applied per channel here as well, instead of the softmax cross-entropy DiceCELoss would use;
    the target must then have the logits' shape. All arguments are DiceCELoss's.
    """

    def __init__(self, sigmoid: bool = True, **kwargs: object) -> None:
        super().__init__(sigmoid=sigmoid, **kwargs)  # type: ignore[arg-type]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape[1] == 1:
            return super().forward(input, target)
        if target.shape != input.shape:
            raise ValueError(
                f"multi-label DiceBCELoss needs target shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        bce = self.bce(input, target.to(input.dtype))  # DiceCELoss own BCE: reduction, pos_weight
        return self.lambda_dice * self.dice(input, target) + self.lambda_ce * bce


class BorderGatedEnsembleLoss(_Loss):
    """The sum of the two members' losses of :class:`medseg.networks.BorderGatedEnsemble` in training.

    ``loss(logits, target, weight)`` with ``logits`` the ``(B, 4, *spatial)`` training output (the border
    network's two channels, then the plain network's): the border network gets the pixel-weighted
    cross-entropy of Eq. (1) with the weight map ``weight`` of Eq. (2); the plain network gets the same
    cross-entropy without the map, only ``plain_class_weights`` (``w_c`` of Eq. (2), e.g. the fixed
    class weights the map was built with; ``None``: unweighted), i.e. the map with ``w0 = 0``. The
    members share no parameters, so each is trained exactly as on its own loss.
    """

    def __init__(self, plain_class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.border_loss = WeightedCrossEntropyLoss()
        self.plain_loss = WeightedCrossEntropyLoss(class_weights=plain_class_weights)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if logits.dim() < 3 or logits.shape[1] != 4:
            raise ValueError(
                "BorderGatedEnsembleLoss expects the ensemble's training output (B, 4, *spatial), "
                f"got shape {tuple(logits.shape)}; is the network in training mode?"
            )
        return self.border_loss(logits[:, :2], target, weight) + self.plain_loss(logits[:, 2:], target)
