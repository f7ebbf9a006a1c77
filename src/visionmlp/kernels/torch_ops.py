"""The private PyTorch operators the kernels use, feature-detected here and nowhere else, and the one test of
where a kernel may run at all.

Each is ``None`` where this torch build lacks it; every kernel then falls back to its reference op.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["LINEAR_POINTWISE", "REORDER_LINEAR_WEIGHT", "eager_on_cpu"]

# oneDNN's matmul with an optional fused post-op, ``(x, weight, bias, post_op, scalars, algorithm)``; PyTorch keeps it
# for inductor's CPU fusions. Eager ``F.linear`` calls the BLAS (MKL) instead.
LINEAR_POINTWISE = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
                    if torch.backends.mkldnn.is_available() else None)
# A linear weight reordered into oneDNN's blocked layout for a given row count: ``(weight, rows)``.
REORDER_LINEAR_WEIGHT = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if LINEAR_POINTWISE else None

if LINEAR_POINTWISE is not None:
    @register_flop_formula(LINEAR_POINTWISE)  # so that FlopCounterMode (the benchmark's GMACs) counts its products
    def _linear_pointwise_flops(x_shape: torch.Size, weight_shape: torch.Size, *args, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]


def eager_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU tensor of plain eager code: not a symbolic trace (FX, TorchScript's tracer,
    ``torch.export``), not a compiled graph, not under CPU autocast. Elsewhere every kernel takes its reference op.
    """
    # the graph-capture checks come first, so that no guard is placed on a symbolic value
    return (not isinstance(x, torch.fx.Proxy) and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))
