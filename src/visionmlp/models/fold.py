"""Folding for inference: BatchNorm into the adjacent convolution or linear layer, and re-parameterized branches.

In eval mode a BatchNorm is a per-channel affine map ``x * scale + shift``. When a convolution or
linear layer sits directly before it, the affine map folds into that layer's weight and bias; when a
dense 1x1 convolution or a linear layer sits directly after it, it folds into that layer's input
side. Either way the BatchNorm disappears and the outputs stay the same up to rounding.

What is adjacent is decided per model, since many forwards call layers in an order their module tree
does not show. Three places are searched:

* ``nn.Sequential`` containers: a conv / linear layer immediately followed by a BatchNorm;
* timm's ``ConvNormAct`` (conv, then a BatchNorm that carries the activation);
* any module with a ``fold_batchnorm() -> int`` method, which folds its own BatchNorms (knowing its
  forward) and returns how many it folded. Modules with ``local_inject()`` (RepMLPBlock) are
  re-parameterized first, which also folds their BatchNorms.

Folding uses the running statistics, so the folded model matches the original in eval mode only.
"""

from __future__ import annotations

import torch
from timm.layers import ConvNormAct
from torch import nn

__all__ = ["bn_scale_shift", "count_batchnorms", "fold_batchnorm", "fold_bn_after", "fold_bn_before", "reparameterize"]

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError(f"{type(bn).__name__} without running statistics cannot be folded")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _set_bias(layer: nn.Module, bias: torch.Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(bias)
    else:
        layer.bias.copy_(bias)


@torch.no_grad()
def fold_bn_after(layer: nn.Conv2d | nn.Conv1d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Change ``layer`` in place so that it computes ``bn(layer(x))``; it gains a bias if it had none."""
    scale, shift = bn_scale_shift(bn)
    weight_shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
    layer.weight.mul_(scale.view(weight_shape))
    _set_bias(layer, bias * scale + shift)


@torch.no_grad()
def fold_bn_before(bn: nn.modules.batchnorm._BatchNorm, layer: nn.Conv2d | nn.Linear) -> None:
    """Change ``layer`` (a dense 1x1 conv or linear) in place so that it computes ``layer(bn(x))``."""
    if isinstance(layer, nn.Conv2d) and (layer.kernel_size != (1, 1) or layer.groups != 1):
        # a wider or grouped kernel would see the shift at zero-padded borders differently
        raise ValueError("a BatchNorm folds into a following convolution only when it is a dense 1x1")
    scale, shift = bn_scale_shift(bn)
    weight = layer.weight.reshape(layer.weight.shape[0], -1)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(weight[:, 0])
    _set_bias(layer, bias + weight @ shift)
    layer.weight.mul_(scale.view((1, -1) + (1,) * (layer.weight.dim() - 2)))


def _fold_sequential(seq: nn.Sequential) -> int:
    count = 0
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        layer, bn = seq._modules[first], seq._modules[second]
        if isinstance(layer, _FOLDABLE) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
            fold_bn_after(layer, bn)
            seq._modules[second] = nn.Identity()
            count += 1
    return count


def _fold_conv_norm_act(module: ConvNormAct) -> int:
    bn = module.bn
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return 0
    fold_bn_after(module.conv, bn)
    # timm's BatchNormAct2d applies its dropout and activation after the norm; they stay
    module.bn = nn.Sequential(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))
    return 1


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that has an adjacent conv / linear layer into it, in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module, ConvNormAct):
            count += _fold_conv_norm_act(module)
        elif isinstance(module, nn.Sequential):
            count += _fold_sequential(module)
        elif callable(getattr(module, "fold_batchnorm", None)):
            count += module.fold_batchnorm()
    return count


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm layers in ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def reparameterize(model: nn.Module) -> nn.Module:
    """Convert ``model`` in place into its inference form (locality injection, then BatchNorm folding)."""
    for module in list(model.modules()):
        if callable(getattr(module, "local_inject", None)):
            module.local_inject()
    fold_batchnorm(model)
    return model
