"""Linear layers on oneDNN's matmul, for CPU.

``F.linear`` on CPU calls the BLAS (MKL); oneDNN's matmul, which PyTorch keeps for inductor's CPU fusions, runs the
same products faster on the AMD EPYC CPUs measured (``tuning.py``, docs/performance.md). Each function here has the
contract of the reference op named in its docstring and falls back to it wherever oneDNN does not apply: off the
CPU, in traced or compiled graphs, under autocast, in other dtypes, and for products too small to pay for the call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from .torch_ops import LINEAR_POINTWISE, ONEDNN_BF16, eager_on_cpu
from .tuning import ONEDNN_LINEAR_MIN_MACS

__all__ = ["OneDnnLinear", "OneDnnMlp", "linear", "linear_gelu", "per_sample_linear", "use_onednn_linears"]


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post_op: str = "none") -> torch.Tensor:
    """``x @ weight.T + bias`` on oneDNN, then ``post_op`` ("none", or "gelu": the exact GELU) as it is written."""
    return LINEAR_POINTWISE(x, weight, bias, post_op, [], "none" if post_op == "gelu" else "")


def _onednn_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN computes ``x @ weight.T + bias``: eager CPU code, one dtype of fp32 or (where this CPU has
    oneDNN's bf16) bf16, large enough."""
    return (LINEAR_POINTWISE is not None and eager_on_cpu(x)
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and ONEDNN_BF16))
            and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
            and x.numel() * weight.shape[0] >= ONEDNN_LINEAR_MIN_MACS)


def _records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _OneDnnLinearFunction(torch.autograd.Function):
    """``F.linear`` whose forward, input gradient and weight gradient run on oneDNN (fp32).

    A backward that itself records gradients (``create_graph=True``) computes with ``F.linear`` and ``matmul``, so
    that second derivatives exist, as they do for the reference op.
    """

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _matmul(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_2d = grad_output.reshape(-1, weight.shape[0])
        x_2d = x.reshape(-1, weight.shape[1])
        grad_x = grad_weight = grad_bias = None
        differentiable = torch.is_grad_enabled()
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ weight if differentiable else _matmul(grad_2d, weight.t(), None)).view(x.shape)
        if ctx.needs_input_grad[1]:
            if differentiable:
                grad_weight = grad_2d.t() @ x_2d
            elif weight.shape[0] <= weight.shape[1]:
                # oneDNN runs the long (tokens) reduction fastest with the wider side as its output's columns
                grad_weight = _matmul(grad_2d.t(), x_2d.t(), None)
            else:
                grad_weight = _matmul(x_2d.t(), grad_2d.t(), None).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CPU on oneDNN's matmul in fp32 (forward and backward), and in bf16 where
    no gradient is recorded. The same products, summed in another order."""
    if _onednn_takes(x, weight, bias):
        if not _records_grad(x, weight, bias):
            return _matmul(x, weight, bias)
        if x.dtype == torch.float32:
            return _OneDnnLinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact GELU); where no gradient is recorded on CPU one oneDNN call that
    applies the GELU as it writes the product, saving a pass over the activation."""
    if _onednn_takes(x, weight, bias) and not _records_grad(x, weight, bias):
        return _matmul(x, weight, bias, "gelu")
    return F.gelu(linear(x, weight, bias))


def per_sample_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[i] @ weight[i].T + bias`` for each sample of ``x`` (N, ..., C_in) and ``weight`` (N, C_out, C_in): one
    batched product, or on CPU one oneDNN product per sample."""
    if _onednn_takes(x[0], weight[0], bias):
        return torch.stack([linear(sample, sample_weight, bias) for sample, sample_weight in zip(x, weight)])
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    product = torch.bmm(rows, weight.transpose(1, 2)) if bias is None else torch.baddbmm(
        bias, rows, weight.transpose(1, 2))
    return product.view(x.shape[:-1] + (weight.shape[1],))


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` computed by :func:`linear` (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(x, weight, bias)``."""
        return linear(x, self.weight, self.bias)


class OneDnnMlp(Mlp):
    """timm's ``Mlp`` (linear, exact GELU, linear, no norm) with its first linear and the GELU in one
    :func:`linear_gelu`; the same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Mlp.forward``, fc1 and the GELU fused."""
        return self.drop2(self.fc2(self.norm(self.drop1(linear_gelu(x, self.fc1.weight, self.fc1.bias)))))


def _fusable_mlp(module: nn.Module) -> bool:
    return (type(module) is Mlp and isinstance(module.fc1, nn.Linear) and type(module.act) is nn.GELU
            and module.act.approximate == "none")


def _onednn_form(module: nn.Module) -> nn.Module | None:
    """The oneDNN form of a plain ``nn.Linear`` or a fusable ``Mlp``, holding its parameters and submodules."""
    if type(module) is nn.Linear:
        fast = OneDnnLinear(module.in_features, module.out_features, bias=False, device="meta")
        fast.weight, fast.bias = module.weight, module.bias
    elif _fusable_mlp(module):
        fast = OneDnnMlp(module.fc1.in_features, module.fc1.out_features, module.fc2.out_features, device="meta")
        for name, child in module.named_children():
            setattr(fast, name, child)
    else:
        return None
    return fast.train(module.training)


def use_onednn_linears(module: nn.Module) -> nn.Module:
    """Put :class:`OneDnnLinear` and :class:`OneDnnMlp` in place of the plain ``nn.Linear`` layers and fusable timm
    ``Mlp`` blocks inside ``module``, holding the same parameters (same state-dict keys); returns ``module``.

    For a model's constructor, which chooses its form once.
    """
    for name, child in module.named_children():
        use_onednn_linears(child)
        fast = _onednn_form(child)
        if fast is not None:
            setattr(module, name, fast)
    return module
