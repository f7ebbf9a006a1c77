"""The spatial L2 norm of a global response norm, with a one-pass backward."""

from __future__ import annotations

from typing import Any

import torch

from .torch_ops import eager_on_cpu

__all__ = ["spatial_l2_norm"]


def _square_sum_norm(x: torch.Tensor) -> torch.Tensor:
    # faster on CPU than torch.linalg.vector_norm over the non-innermost dims; a bf16 sum accumulates in fp32
    return x.square().sum(dim=(1, 2)).sqrt()


class _SpatialL2Norm(torch.autograd.Function):
    """L2 norm over H and W of an NHWC map. ``Tensor.norm``'s backward makes three passes over the map (a division,
    a mask for zero norms, a product); here the division and the mask act on the small (N, C) result."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _square_sum_norm(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm, 0.0)
        return x * scale[:, None, None, :]


def spatial_l2_norm(x: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.vector_norm(x, dim=(1, 2))`` of an (N, H, W, C) map, (N, C); on CPU in fp32, fp64 or bf16 as a
    sum of squares with a one-pass backward. fp16 keeps the norm kernel, whose fp32 accumulation does not overflow."""
    if not eager_on_cpu(x) or x.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return torch.linalg.vector_norm(x, dim=(1, 2))
    if x.requires_grad and torch.is_grad_enabled():
        return _SpatialL2Norm.apply(x)
    return _square_sum_norm(x)
