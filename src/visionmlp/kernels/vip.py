"""ViP's fast Permute-MLP: the weighted sum of the three branches with contiguous, branch-major weights.

:func:`permute_mlp` computes what ``PermuteMlp.forward`` computes (``visionmlp.models.vip``). The reference reads its
softmax weights as strided (channel, branch) views, so the products that blend the branch maps run in runs of one
value; here the re-weighting MLP's last layer is regrouped branch-major, each branch's weights come out contiguous
over the channels, the pooled descriptor is the sum of the branches' own sums (no materialised h + w + c), and the
blend is one product and two fused multiply-adds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

if TYPE_CHECKING:
    from ..models.vip import PermuteMlp

__all__ = ["branch_softmax", "permute_mlp"]


def branch_softmax(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, channels: int, num_branches: int,
) -> torch.Tensor:
    """``linear(hidden, weight, bias).reshape(N, channels, num_branches).permute(2, 0, 1).softmax(0)``: the
    per-sample softmax weights over branches, (num_branches, N, channels), each branch's contiguous over the channels.

    ``weight`` is a re-weighting MLP's last layer (any trailing dims flattened) whose outputs are ordered
    (channel, branch); its rows are taken branch-major.
    """
    weight = weight.reshape(channels, num_branches, -1).transpose(0, 1).reshape(channels * num_branches, -1)
    if bias is not None:
        bias = bias.reshape(channels, num_branches).t().reshape(channels * num_branches)
    return F.linear(hidden, weight, bias).view(-1, num_branches, channels).softmax(dim=1).transpose(0, 1)


@register_notrace_function  # an FX leaf: the model file wraps it
def permute_mlp(module: PermuteMlp, x: torch.Tensor) -> torch.Tensor:
    """``PermuteMlp.forward`` of an NHWC token map (B, H, W, C)."""
    B, H, W, C = x.shape
    G = module.num_segments
    S = C // G
    x = x.reshape(B, H, W, G, S)
    # each branch's output copied back to the token layout once: the sums and products below read it contiguously
    h = module.mlp_h(x.permute(0, 3, 2, 1, 4).reshape(B, G, W, H * S))
    h = h.view(B, G, W, H, S).permute(0, 3, 2, 1, 4).contiguous()
    w = module.mlp_w(x.permute(0, 1, 3, 2, 4).reshape(B, H, G, W * S))
    w = w.view(B, H, G, W, S).transpose(2, 3).contiguous()
    c = module.mlp_c(x.view(B, H, W, C)).view(B, H, W, G, S)
    pooled = (h.sum((1, 2)) + w.sum((1, 2)) + c.sum((1, 2))).view(B, C) / (H * W)
    reweight = module.reweight
    hidden = reweight.norm(reweight.drop1(reweight.act(reweight.fc1(pooled))))
    weights = branch_softmax(hidden, reweight.fc2.weight, reweight.fc2.bias, C, 3).reshape(3, B, 1, 1, G, S)
    # out of place: an in-place op whose result is unused would be dropped from a torch.fx graph
    out = torch.addcmul(torch.addcmul(torch.mul(c, weights[2]), h, weights[0]), w, weights[1])
    return module.proj(out.view(B, H, W, C))
