"""Convolutions on oneDNN's fast paths: depth-wise weight gradients in narrow column slices, depth-wise convs with a
channel multiplier as plain depth-wise convs, and stems that write channels-last."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .torch_ops import eager_on_cpu
from .tuning import FAST_WEIGHT_GRAD_WIDTH

__all__ = ["ChannelsLastConv2d", "ExpandingDepthwiseConv2d", "depthwise_conv2d"]


def _column_slices(width: int) -> list[tuple[int, int]]:
    """Kernel columns ``[first, last)`` in slices at most ``FAST_WEIGHT_GRAD_WIDTH`` wide: the three around the
    centre, then the rest of each side, so that only the centre slice keeps symmetric padding."""
    centre = width // 2
    slices = [(centre - 1, centre + 2)]
    for first in range(0, centre - 1, FAST_WEIGHT_GRAD_WIDTH):
        slices.append((first, min(centre - 1, first + FAST_WEIGHT_GRAD_WIDTH)))
    for first in range(centre + 2, width, FAST_WEIGHT_GRAD_WIDTH):
        slices.append((first, min(width, first + FAST_WEIGHT_GRAD_WIDTH)))
    return sorted(slices)


class _ColumnSlicedGradDepthwiseConv(torch.autograd.Function):
    """A same-size depth-wise conv (stride 1, odd kernel) whose weight gradient is taken in column slices.

    The gradient of kernel columns ``[first, last)`` is the weight gradient of a conv with just those columns, over
    the input shifted so that they line up: the slice's own conv, padded (or cropped) on each side by the distance of
    the slice's edges from the kernel's centre. The backward is made of differentiable ops, so second derivatives
    exist.
    """

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, 1, (weight.shape[2] // 2, weight.shape[3] // 2), 1, weight.shape[0])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        channels, height, width = weight.shape[0], weight.shape[2], weight.shape[3]
        pad_h, pad_w = height // 2, width // 2
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, [1, 1], [pad_h, pad_w], [1, 1], False, [0, 0], channels,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grads = []
            for first, last in _column_slices(width):
                left, right = pad_w - first, last - 1 - pad_w
                # the slice centred on the kernel's centre pads symmetrically, inside the conv, without a copy
                shifted, pad = (x, left) if left == right else (F.pad(x, (left, right)), 0)
                grads.append(torch.ops.aten.convolution_backward(
                    grad_output, shifted, weight[..., first:last], None, [1, 1], [pad_h, pad], [1, 1], False,
                    [0, 0], channels, [False, True, False])[1])
            grad_weight = torch.cat(grads, dim=3)
        return grad_input, grad_weight


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=channels)`` for an odd depth-wise ``weight``
    (channels, 1, kh, kw): the output has the input's size.

    Where its weight gradient is recorded on CPU, for kernels wider than oneDNN's fast weight-gradient path, on
    maps at least as wide as the kernel, and without a bias, that gradient is taken in column slices
    (``_ColumnSlicedGradDepthwiseConv``).
    """
    if (bias is None and weight.requires_grad and torch.is_grad_enabled()
            and FAST_WEIGHT_GRAD_WIDTH < weight.shape[3] <= x.shape[3] and eager_on_cpu(x)):
        return _ColumnSlicedGradDepthwiseConv.apply(x, weight)
    return F.conv2d(x, weight, bias, 1, (weight.shape[2] // 2, weight.shape[3] // 2), 1, weight.shape[0])


class ExpandingDepthwiseConv2d(nn.Conv2d):
    """A grouped conv with one input channel and several output channels per group (a depth-wise conv with a
    channel multiplier), computed as one plain depth-wise conv per output of a group, interleaved channels-last.

    oneDNN runs plain depth-wise convs on a fast path and the multiplier form on a slow one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The grouped conv of ``x``, channels-last."""
        multiplier = self.out_channels // self.groups
        outputs = []
        for i in range(multiplier):
            bias = None if self.bias is None else self.bias[i::multiplier]
            out = F.conv2d(x, self.weight[i::multiplier], bias, self.stride, self.padding, self.dilation, self.groups)
            outputs.append(out.permute(0, 2, 3, 1))
        # output channel g * multiplier + i is output i of group g
        return torch.stack(outputs, dim=-1).flatten(3).permute(0, 3, 1, 2)


class ChannelsLastConv2d(nn.Conv2d):
    """A Conv2d whose output is channels-last whatever the input's layout, so that a stem's tokens come out as a
    contiguous NHWC map.

    It convolves with a channels-last copy of its kernel rather than of its input: a recorded graph then keeps the
    image as it came (the caller holds it anyway) instead of a channels-last copy of it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x``; the result is channels-last."""
        return self._conv_forward(x, self.weight.contiguous(memory_format=torch.channels_last), self.bias)
