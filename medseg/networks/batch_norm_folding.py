"""Batch normalisation folded into the convolution before it, for inference.

In eval mode a batch norm is a per-channel affine map with fixed statistics, so
``bn(conv(x)) == conv'(x)`` with ``conv'`` the convolution whose weights and bias absorbed it
(``torch.nn.utils.fusion.fuse_conv_bn_eval``; Ioffe & Szegedy 2015, Sec. 3.1). The folded network
skips one pass over every activation map per convolution.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batch_norm"]


def fold_batch_norm(network: nn.Module) -> int:
    """Fold each batch norm that directly follows a convolution in an ``nn.Sequential`` (in place).

    The convolution is replaced by the folded one and the batch norm by ``nn.Identity``, so the
    network's outputs are unchanged (up to rounding) but its ``state_dict`` no longer matches the
    unfolded network's: load weights first, then fold. Batch norms without running statistics
    (``track_running_stats=False`` normalise by the batch even in eval mode) and those after a grouped
    transposed convolution are left as they are.

    Returns:
        the number of batch norms folded.

    Raises:
        ValueError: ``network`` is in training mode (its batch norms still learn).
    """
    if network.training:
        raise ValueError("fold_batch_norm needs a network in eval mode (call .eval() first)")
    folded = 0
    for seq in [m for m in network.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names[:-1], names[1:], strict=True):
            conv, bn = seq._modules[a], seq._modules[b]
            if not (isinstance(conv, _ConvNd) and isinstance(bn, _BatchNorm)) or bn.running_mean is None:
                continue
            transpose = isinstance(conv, _ConvTransposeNd)
            if bn.num_features != conv.out_channels or (transpose and conv.groups > 1):
                continue  # fuse_conv_bn_eval scales a transposed weight per group, not per output channel
            seq._modules[a] = fuse_conv_bn_eval(conv, bn, transpose=transpose)
            seq._modules[b] = nn.Identity()
            folded += 1
    return folded
