"""RaftMLP's fast token mixing: on raft-shaped views without copies, raft-major in bf16 on CPU.

:func:`token_mixing` computes what ``RaftBlock.token_mixing`` computes (``visionmlp.models.raft_mlp``): the branches
return permuted views of the raft-shaped map (B, H, W, r, g), which the residual sums take as they are, and in CPU
training each branch runs only for the samples its drop path keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from timm.layers import register_notrace_function
from torch import nn

from .residual import drop_path_residual

if TYPE_CHECKING:
    from ..models.raft_mlp import RaftBlock

__all__ = ["token_mixing"]


def _raft_major(x: torch.Tensor) -> bool:
    """Whether the token mixing runs raft-major: bf16 on CPU, eager or compiled, where oneDNN computes the batched
    products and the permutes move runs of g channels instead of single values. In fp32 the token-last form's linears
    are faster. Traces (FX, TorchScript's tracer) keep the token-last form."""
    return (not isinstance(x, torch.fx.Proxy) and not torch.jit.is_tracing() and x.device.type == "cpu"
            and x.dtype == torch.bfloat16)


def _token_last_branch(x: torch.Tensor, norm: nn.Module, mlp: nn.Module, along: int) -> torch.Tensor:
    """The token-mixing branch along ``along`` (1: vertical, 2: horizontal) of raft-shaped ``x``, with the mixed
    values (r, position) last: a permuted view of raft shape."""
    order = (0, 3 - along, 4, 3, along)  # (B, across, g, r, along)
    y = norm(x.flatten(3)).reshape(x.shape).permute(order)
    across, groups, raft, length = y.shape[1:]
    y = mlp(y.reshape(x.shape[0], across, groups, raft * length))
    return y.reshape(x.shape[0], across, groups, raft, length).permute([order.index(d) for d in range(5)])


def _raft_major_branch(x: torch.Tensor, norm: nn.Module, mlp: nn.Module, along: int) -> torch.Tensor:
    """The same branch raft-major: each sample one matrix with a row per mixed value (r, position along) and a column
    per raft (position across, g), which the MLP's weights multiply from the left."""
    order = (0, 3, along, 3 - along, 4)  # (B, r, along, across, g)
    y = norm(x.flatten(3)).reshape(x.shape).permute(order)
    batch, raft_major = x.shape[0], y.shape
    y = y.reshape(batch, raft_major[1] * raft_major[2], raft_major[3] * raft_major[4])
    hidden = torch.baddbmm(mlp.fc1.bias.unsqueeze(-1), mlp.fc1.weight.expand(batch, -1, -1), y)
    # in place where no gradient is recorded: one activation-sized buffer fewer
    hidden = mlp.drop1(torch.ops.aten.gelu_(hidden) if not torch.is_grad_enabled() else mlp.act(hidden))
    y = mlp.drop2(torch.baddbmm(mlp.fc2.bias.unsqueeze(-1), mlp.fc2.weight.expand(batch, -1, -1), hidden))
    return y.view(raft_major).permute([order.index(d) for d in range(5)])


@register_notrace_function  # an FX leaf: the model file wraps it
def token_mixing(block: RaftBlock, x: torch.Tensor) -> torch.Tensor:
    """``RaftBlock.token_mixing`` of NHWC ``x`` (on the block's grid), computed on raft-shaped views."""
    B, H, W, C = x.shape
    branch = _raft_major_branch if _raft_major(x) else _token_last_branch
    rafts = x.reshape(B, H, W, block.raft_size, block.groups)
    rafts = drop_path_residual(
        rafts, lambda t: branch(t, block.norm_vertical, block.mlp_vertical, 1), block.drop_path)
    rafts = drop_path_residual(
        rafts, lambda t: branch(t, block.norm_horizontal, block.mlp_horizontal, 2), block.drop_path)
    return rafts.reshape(B, H, W, C)
