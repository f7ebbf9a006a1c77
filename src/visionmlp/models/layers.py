"""Layers shared by several families: a patchify conv whose output layout comes from its kernel."""

import torch
from timm.layers import register_notrace_function
from torch import nn

__all__ = ["ChannelsLastConv2d", "training_layout"]


@register_notrace_function  # an FX leaf, so that traced graphs keep the run-time choice
def training_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last where gradients are taken, else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if torch.is_grad_enabled() else x


class ChannelsLastConv2d(nn.Conv2d):
    """A Conv2d whose output is channels-last whatever the input's layout (with ``training_only``, only while
    gradients are taken; NCHW otherwise).

    It convolves with a channels-last copy of its kernel rather than of its input: a recorded graph then
    keeps the image as it came (the caller holds it anyway) instead of a channels-last copy of it.
    """

    def __init__(self, *args, training_only: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.training_only = training_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x``; the result is channels-last (see the class)."""
        if self.training_only:
            return self._conv_forward(x, training_layout(self.weight), self.bias)
        return self._conv_forward(x, self.weight.contiguous(memory_format=torch.channels_last), self.bias)
