"""The private PyTorch operators the kernels use, feature-detected here and nowhere else, and the one test of
where a kernel may run at all.

Each is ``None`` where this torch build lacks it; every kernel then falls back to its reference op.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["LINEAR_POINTWISE", "ONEDNN_BF16", "eager_on_cpu"]

# oneDNN's matmul with an optional fused post-op, ``(x, weight, bias, post_op, scalars, algorithm)``; PyTorch keeps it
# for inductor's CPU fusions. Eager ``F.linear`` calls the BLAS (MKL) instead.
LINEAR_POINTWISE = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
                    if torch.backends.mkldnn.is_available() else None)
# Whether oneDNN computes in bf16 on this CPU (AVX-512 or newer); without it, e.g. on AVX2 CPUs, its bf16 matmul
# fails to build a primitive, and bf16 products take the reference ops.
_BF16_SUPPORTED = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
ONEDNN_BF16 = bool(LINEAR_POINTWISE is not None and _BF16_SUPPORTED is not None and _BF16_SUPPORTED())

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
