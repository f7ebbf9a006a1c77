"""A stochastic-depth residual that computes its branch only for the samples that drop path keeps (CPU training)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import DropPath
from torch import nn

from .torch_ops import eager_on_cpu

__all__ = ["drop_path_residual"]


def drop_path_residual(
        x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop_path: nn.Module) -> torch.Tensor:
    """``x + drop_path(branch(x))``; in CPU training with a timm ``DropPath``, ``branch`` runs on the kept samples only.

    The mask is drawn as ``DropPath`` draws it (one Bernoulli per sample, same shape, dtype and generator), so the
    same seed drops the same samples, whose branch ``DropPath`` would only multiply by zero. ``branch`` must treat
    samples independently (no batch statistics). On a GPU, choosing the samples would read the mask on the host at
    every residual, so the reference form runs there.
    """
    if not (isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0. and eager_on_cpu(x)):
        return x + drop_path(branch(x))
    keep_prob = 1. - drop_path.drop_prob
    scale = 1. / keep_prob if drop_path.scale_by_keep and keep_prob > 0. else 1.
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    kept = mask.view(-1).nonzero().view(-1)
    if kept.numel() == x.shape[0]:
        return x + branch(x) * scale
    # With every sample dropped the branch still runs, on an empty batch: its parameters then get zero gradients,
    # as under DropPath, rather than none, which optimizers treat as "skip this parameter".
    return x.index_add(0, kept, branch(x.index_select(0, kept)), alpha=scale)
