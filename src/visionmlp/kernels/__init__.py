"""Fast kernels: CPU-specific forms of the models' reference maths, kept apart from it.

Each kernel is a function or module with the contract of a reference op (named in its docstring) and falls back to
that op wherever it does not apply: off the CPU, in traced or compiled graphs, under autocast, in dtypes it does not
cover. A model chooses once, when it is built, between its reference maths (public PyTorch ops only) and these forms:
``visionmlp.set_fast_kernels``, the ``VISIONMLP_FAST_KERNELS`` environment variable, or
``create_model(..., fast_kernels=...)``. Both give the same outputs and gradients up to rounding. Private PyTorch
operators are detected in :mod:`.torch_ops` only; every tuned constant sits in :mod:`.tuning` with its provenance.

Nothing here changes a weight or keeps a derived copy of one: forms that do (packed weights, folding, casting,
compiling) belong to the explicit :func:`visionmlp.optimize_for_inference`.
"""

from . import ms_mlp, raft_mlp, strip_mlp, vip
from .conv import ChannelsLastConv2d, ExpandingDepthwiseConv2d, depthwise_conv2d
from .linear import OneDnnLinear, OneDnnMlp, linear, linear_gelu, per_sample_linear, use_onednn_linears
from .norm import spatial_l2_norm
from .residual import drop_path_residual
from .switch import ENVIRONMENT_VARIABLE, resolve_fast_kernels, set_fast_kernels, use_fast_kernels

__all__ = [
    "ChannelsLastConv2d", "ENVIRONMENT_VARIABLE", "ExpandingDepthwiseConv2d", "OneDnnLinear", "OneDnnMlp",
    "depthwise_conv2d", "drop_path_residual", "linear", "linear_gelu", "ms_mlp", "per_sample_linear", "raft_mlp",
    "resolve_fast_kernels", "set_fast_kernels", "spatial_l2_norm", "strip_mlp", "use_fast_kernels",
    "use_onednn_linears", "vip",
]
