"""Strip-MLP's fast forms: each block's mixing computed channels-last, on oneDNN's fast paths.

Each function takes the module whose forward it replaces and computes what that forward computes (the reference
maths in ``visionmlp.models.strip_mlp``). They expect the channels-last maps the fast model's stem produces: on CPU
oneDNN runs 1x1 and depth-wise convs of NCHW maps with few channels on slow paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .conv import depthwise_conv2d
from .linear import linear, linear_gelu, per_sample_linear
from .norm import spatial_l2_norm
from .vip import branch_softmax

if TYPE_CHECKING:
    from ..models.strip_mlp import ChannelMixing, LocalStripMixing, StripMixing, TokenMixing

__all__ = ["channel_mixing", "local_strip_mixing", "strip_mixing", "token_mixing"]


def _conv1x1_of_concat(
        a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1 conv of ``cat([a, b], 1)`` without materialising the concatenation."""
    split = a.shape[1]
    return F.conv2d(a, weight[:, :split], bias).add_(F.conv2d(b, weight[:, split:]))


def _strip_mlp(module: StripMixing, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One strip MLP over ``x`` (N, patches, strips, groups, L): dense over the L positions of each strip per group,
    with 3 taps across the strips; laid out (groups, L) innermost, channels-last for the grouped conv."""
    n = x.shape[0]
    p, s, g, length = module.channel_patches, module.grid_size, module.groups, module.grid_size
    x = x.reshape(n, p, s, g * length).permute(0, 3, 1, 2)
    x = F.conv2d(x, weight, bias, padding=(0, 1), groups=g)
    return x.permute(0, 2, 3, 1).reshape(n, p, s, g, length)


@register_notrace_function  # an FX leaf: the model file wraps it
def strip_mixing(module: StripMixing, x: torch.Tensor) -> torch.Tensor:
    """``StripMixing.forward``, both strip MLPs writing channels-last and the fusing 1x1 convs without concatenation."""
    n = x.shape[0]
    c, h, w = module.dim, module.grid_size, module.grid_size
    p, g = module.channel_patches, module.groups
    rows = (x + module.position_bias(module.pos_h)).view(n, p, g, h, w).permute(0, 1, 3, 2, 4)
    rows = _strip_mlp(module, rows, module.proj_h.weight, module.proj_h.bias).permute(0, 2, 4, 1, 3)
    rows = rows.reshape(n, h, w, c).permute(0, 3, 1, 2)
    rows = module.act(module.norm(_conv1x1_of_concat(rows, x, module.fuse_h.weight, module.fuse_h.bias)))
    cols = (rows + module.position_bias(module.pos_w)).view(n, p, g, h, w).permute(0, 1, 4, 2, 3)
    cols = _strip_mlp(module, cols, module.proj_w.weight, module.proj_w.bias).permute(0, 4, 2, 1, 3)
    cols = cols.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return _conv1x1_of_concat(x, cols, module.fuse_w.weight)


@register_notrace_function  # an FX leaf: the model file wraps it
def local_strip_mixing(module: LocalStripMixing, x: torch.Tensor) -> torch.Tensor:
    """``LocalStripMixing.forward`` with the strip convs' weight gradients in column slices, the pooled sum of the
    branches taken as the sum of their pooled means, and branch-major blend weights (:func:`.vip.branch_softmax`)."""
    x_row = depthwise_conv2d(x, module.conv_row.weight)
    x_col = depthwise_conv2d(x, module.conv_col.weight)
    pooled = x_col.mean((2, 3), keepdim=True) + x_row.mean((2, 3), keepdim=True) + x.mean((2, 3), keepdim=True)
    reweight = module.reweight
    hidden = reweight.norm(reweight.drop1(reweight.act(reweight.fc1(pooled)))).flatten(1)
    weights = branch_softmax(hidden, reweight.fc2.weight, reweight.fc2.bias, x.shape[1], 3)[..., None, None]
    return (x_col * weights[0]).addcmul_(x_row, weights[1]).addcmul_(x, weights[2])


@register_notrace_function  # an FX leaf: the model file wraps it
def token_mixing(module: TokenMixing, x: torch.Tensor) -> torch.Tensor:
    """``TokenMixing.forward`` with the fusing 1x1 conv taking the two halves without concatenating them."""
    x = module.conv_dw(module.act(module.norm(x)))
    x = module.act(module.proj_in_norm(module.proj_in(x)))
    x_strip, x_local = x.chunk(2, dim=1)
    return _conv1x1_of_concat(strip_mixing(module.strip, x_strip), local_strip_mixing(module.local, x_local),
                              module.fuse.weight)


def _grn_mlp(module: ChannelMixing, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm, fc1 with GELU, GRN and fc2 over a channels-last (N, H, W, C) map.

    GRN is ``x * (1 + gamma * r) + beta`` with a per-sample, per-channel ratio ``r``: beta passes through fc2 into a
    constant bias, and the scale goes on the hidden activations or, where the map has more tokens than fc2 has
    outputs, on fc2's weight (fewer products).
    """
    x = linear_gelu(module.norm(x), module.fc1.weight, module.fc1.bias)
    n, height, width, hidden = x.shape
    x_g = spatial_l2_norm(x)
    ratio = x_g / (x_g.mean(dim=-1, keepdim=True) + module.grn.eps)
    scale = torch.addcmul(torch.ones_like(ratio), module.grn.weight, ratio)
    bias = F.linear(module.grn.bias, module.fc2.weight, module.fc2.bias)
    if height * width > module.fc2.out_features:
        return per_sample_linear(x, module.fc2.weight * scale.unsqueeze(1), bias)
    return linear(x * scale.view(n, 1, 1, hidden), module.fc2.weight, bias)


@register_notrace_function  # an FX leaf: the model file wraps it
def channel_mixing(module: ChannelMixing, x: torch.Tensor) -> torch.Tensor:
    """``ChannelMixing.forward`` with the depth-wise conv's weight gradient in column slices and GRN folded into fc2."""
    x = depthwise_conv2d(x.contiguous(memory_format=torch.channels_last), module.conv_dw.weight)
    return _grn_mlp(module, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
