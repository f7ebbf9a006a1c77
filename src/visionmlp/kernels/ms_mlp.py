"""MS-MLP's fast block: the mix-shift step in fewer, larger ops, the channel MLP in slices of the tokens.

:func:`mix_shift_block` computes what ``MixShiftBlock.forward`` computes (``visionmlp.models.ms_mlp``):

* groups that share a kernel size share one depth-wise conv call per branch (their kernels concatenated), 1x1
  groups are a per-channel affine, and each branch's rolls are slice copies into one channels-last tensor, recorded
  as one autograd node whose gradient is the opposite roll;
* in training the depth-wise biases are added after the two branches' sum (oneDNN's bias gradient of kernels over
  3x3 takes a slow path), and the layer scale multiplies fc2's weight instead of its output where that leaves
  autograd a smaller tensor to keep;
* on CPU the channel MLP runs over slices of the tokens: cache-sized at inference (also in compiled graphs), under
  glibc's fresh-mapping size in training (``tuning.py``);
* in CPU training the block's residual branch runs only for the samples its drop path keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from timm.layers import DropPath, register_notrace_function

from .conv import depthwise_conv2d
from .linear import linear
from .residual import drop_path_residual
from .tuning import MS_MLP_INFER_FP32_TOKENS_PER_SLICE, MS_MLP_TRAIN_HIDDEN_BYTES

if TYPE_CHECKING:
    from ..models.ms_mlp import MixShiftBlock

__all__ = ["mix", "mix_shift_block", "roll_groups"]


def _rolled_copy(x: torch.Tensor, group_sizes: list[int], shifts: list[int], dim: int) -> torch.Tensor:
    """A channels-last copy of ``x`` with each channel group cyclically rolled by its shift along ``dim``."""
    out = torch.empty_like(x, memory_format=torch.channels_last)
    length = x.shape[dim]
    start = 0
    for size, shift in zip(group_sizes, shifts):
        src = x.narrow(1, start, size)
        dst = out.narrow(1, start, size)
        shift = shift % length
        if shift == 0:
            dst.copy_(src)
        else:
            dst.narrow(dim, shift, length - shift).copy_(src.narrow(dim, 0, length - shift))
            dst.narrow(dim, 0, shift).copy_(src.narrow(dim, length - shift, shift))
        start += size
    return out


class _RollGroups(torch.autograd.Function):
    """The group roll as one autograd node whose gradient is the opposite roll (one copy). Recorded slice by slice,
    autograd would zero-fill and accumulate a gradient the size of ``x`` for every slice copied."""

    @staticmethod
    def forward(x: torch.Tensor, group_sizes: list[int], shifts: list[int], dim: int) -> torch.Tensor:
        return _rolled_copy(x, group_sizes, shifts, dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, group_sizes, shifts, dim = inputs
        ctx.inverse = (group_sizes, [-shift for shift in shifts], dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return roll_groups(grad, *ctx.inverse), None, None, None


def roll_groups(x: torch.Tensor, group_sizes: list[int], shifts: list[int], dim: int) -> torch.Tensor:
    """``torch.cat([g.roll(s, dim) for g, s in zip(x.split(group_sizes, 1), shifts)], 1)``, written channels-last."""
    if torch.compiler.is_compiling():
        # functional, for inductor to fuse into what reads it; its oneDNN fusions of frozen weights fail on the
        # scatters the slice copies become
        return torch.cat([group.roll(shift, dim) for group, shift in zip(x.split(group_sizes, 1), shifts)], 1)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RollGroups.apply(x, group_sizes, shifts, dim)
    return _rolled_copy(x, group_sizes, shifts, dim)


def _kernel_runs(kernel_sizes: list[int]) -> list[tuple[int, int, int]]:
    """(first group, end group, kernel size) of each run of consecutive groups with equal kernel sizes."""
    runs: list[tuple[int, int, int]] = []
    for i, k in enumerate(kernel_sizes):
        if runs and runs[-1][2] == k:
            runs[-1] = (runs[-1][0], i + 1, k)
        else:
            runs.append((i, i + 1, k))
    return runs


def _branch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], shifts: list[int],
            kernel_size: int, dim: int) -> torch.Tensor:
    """One branch for a run of groups sharing ``kernel_size``: roll each group along ``dim``, then mix."""
    rolled = roll_groups(x, sizes, shifts, dim)
    if kernel_size == 1 and bias is not None:  # a per-channel affine; conv2d would take a slow path
        return torch.addcmul(bias[:, None, None], rolled, weight.view(-1, 1, 1))
    return depthwise_conv2d(rolled, weight, bias)


def mix(block: MixShiftBlock, x: torch.Tensor) -> torch.Tensor:
    """``MixShiftBlock.mix``: the width-rolled and height-rolled branches, each mixed by its group kernels, summed."""
    runs = _kernel_runs([conv.kernel_size[0] for conv in block.dwconv_lr])
    sizes, shifts = block.group_sizes, block.shift_dists
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    parts = x.split([starts[last] - starts[first] for first, last, _ in runs], dim=1)
    mixed = []
    for part, (first, last, k) in zip(parts, runs):
        lr_convs, td_convs = block.dwconv_lr[first:last], block.dwconv_td[first:last]
        lr_weight, td_weight = torch.cat([c.weight for c in lr_convs]), torch.cat([c.weight for c in td_convs])
        lr_bias, td_bias = torch.cat([c.bias for c in lr_convs]), torch.cat([c.bias for c in td_convs])
        biases_apart = k > 1 and torch.is_grad_enabled() and lr_weight.requires_grad
        lr = _branch(part, lr_weight, None if biases_apart else lr_bias, sizes[first:last], shifts[first:last], k, 3)
        td = _branch(part, td_weight, None if biases_apart else td_bias, sizes[first:last], shifts[first:last], k, 2)
        mixed.append(torch.add(lr, td).add_((lr_bias + td_bias)[:, None, None]) if biases_apart else lr + td)
    return mixed[0] if len(mixed) == 1 else torch.cat(mixed, dim=1)


def _channel_mlp(block: MixShiftBlock, tokens: torch.Tensor) -> torch.Tensor:
    """LayerNorm, MLP and layer scale over the last dim. While gradients are recorded with more tokens than fc2 has
    inputs, the layer scale multiplies fc2's weight: autograd then keeps that weight-sized product, not the output."""
    x = block.norm(tokens)
    mlp, gamma = block.mlp, block.gamma
    if gamma is None:
        return mlp(x)
    if not (torch.is_grad_enabled() and tokens.shape[:-1].numel() > mlp.fc2.in_features):
        return mlp(x) * gamma
    x = mlp.norm(mlp.drop1(mlp.act(mlp.fc1(x))))
    bias = None if mlp.fc2.bias is None else mlp.fc2.bias * gamma
    return mlp.drop2(linear(x, mlp.fc2.weight * gamma[:, None], bias))


def _tokens_per_slice(block: MixShiftBlock, x: torch.Tensor) -> int:
    """Tokens per channel-MLP call on CPU: without gradients as many bytes as ``MS_MLP_INFER_FP32_TOKENS_PER_SLICE``
    fp32 tokens (the hidden activations stay in cache); in training equal slices whose hidden activations stay under
    ``MS_MLP_TRAIN_HIDDEN_BYTES``. Off the CPU all tokens at once."""
    num_tokens = x.shape[:-1].numel()
    if x.device.type != "cpu":
        return num_tokens
    if not torch.is_grad_enabled():
        return min(num_tokens, MS_MLP_INFER_FP32_TOKENS_PER_SLICE * 4 // x.element_size())
    hidden_bytes = num_tokens * block.mlp.fc1.out_features * x.element_size()
    return -(-num_tokens // max(1, -(-hidden_bytes // MS_MLP_TRAIN_HIDDEN_BYTES)))


def _channel_mlp_in_slices(
        block: MixShiftBlock, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
    """The channel MLP of channels-last (B, H, W, C) ``x`` over slices of its tokens, each slice added to its part
    of ``shortcut`` if one is given."""
    size = _tokens_per_slice(block, x)
    tokens = x.reshape(-1, x.shape[-1])
    if size >= tokens.shape[0]:  # one call (also for an empty batch, every sample dropped)
        return _channel_mlp(block, x) if shortcut is None else shortcut + _channel_mlp(block, x)
    parts = [_channel_mlp(block, part) for part in tokens.split(size)]
    if shortcut is not None:
        parts = [add + part for part, add in zip(parts, shortcut.reshape(tokens.shape).split(size))]
    return torch.cat(parts).view(x.shape)


@register_notrace_function  # an FX leaf: the model file wraps it
def mix_shift_block(block: MixShiftBlock, x: torch.Tensor) -> torch.Tensor:
    """``MixShiftBlock.forward`` of an NCHW ``x`` (channels-last in memory, as the stem writes it)."""
    tokens = x.permute(0, 2, 3, 1)
    if isinstance(block.drop_path, DropPath) and block.drop_path.training:
        def residual_branch(t: torch.Tensor) -> torch.Tensor:
            return _channel_mlp_in_slices(block, mix(block, t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

        return drop_path_residual(tokens, residual_branch, block.drop_path).permute(0, 3, 1, 2)
    # no sample dropped: the shortcut is added slice by slice, as each slice of the MLP's output is written
    mixed = mix(block, x).permute(0, 2, 3, 1)
    return _channel_mlp_in_slices(block, mixed, tokens).permute(0, 3, 1, 2)

