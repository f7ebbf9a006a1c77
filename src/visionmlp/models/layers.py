"""Layers shared by several families: the input-size check of models built for one image size, linear
layers on oneDNN's matmul on CPU (fp32, and bf16 at inference, with weights packed once), a patchify conv whose
output layout comes from its kernel, a depth-wise conv whose weight gradient avoids a slow oneDNN path, a
stochastic-depth residual that computes its branch only for the samples it keeps, blocks run over small slices
of the batch at CPU inference, the spatial L2 norm of a global response norm, and the branch softmax of a re-weighting
MLP.

The functions that branch on run-time values are FX leaves twice over: registered with timm (whose feature
extractor passes them to the tracer) and wrapped with ``torch.fx.wrap`` for plain ``symbolic_trace``. That
wrapping binds a module's global name, so a model file calling one of them wraps its own imported name too.
"""

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_function, register_notrace_module
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "ChannelsLastConv2d", "ExpandingDepthwiseConv2d", "OneDnnLinear", "OneDnnMlp", "SkipsDroppedSamples",
    "blocks_in_batch_slices", "branch_softmax", "check_input_size", "depthwise_conv2d", "drop_path_residual",
    "in_batch_slices", "linear", "linear_gelu", "onednn_linear_pays", "per_sample_linear", "spatial_l2_norm",
    "use_onednn_linears",
]

# Activation bytes per batch slice at CPU inference (two samples of RaftMLP-S's first stage). The blocks'
# intermediates, up to 4x wider, are then small enough for glibc's default heap to reuse them rather than
# map and page in fresh memory for each (with the heap kept, both forms run alike), and for the cache.
_CPU_INFERENCE_SLICE_BYTES = 2 * 2**20
# oneDNN's fp32 matmul, which PyTorch keeps for its inductor's CPU fusions; eager F.linear calls the BLAS (MKL).
# On a 2-core EPYC (Zen 5) MKL's sgemm ran at 150-195 GFLOP/s and oneDNN's at 300-440, for the products of
# a linear layer's forward and input gradient alike, at fp32 accuracy (no reduced-precision math mode).
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
if _ONEDNN_LINEAR is not None:
    @register_flop_formula(_ONEDNN_LINEAR)  # so that FlopCounterMode (the benchmark's GMACs) counts its products
    def _onednn_linear_flops(x_shape: torch.Size, weight_shape: torch.Size, *args, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]
# Parameters in oneDNN's blocked layout, for products without gradients: packing a weight afresh at each call
# (what a plain-layout weight costs inside oneDNN) took 3-20 % of a product's time on a Zen 5 EPYC, in fp32
# and bf16. A copy per weight, kept while the parameter lives.
_REORDER_LINEAR_WEIGHT = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _ONEDNN_LINEAR else None
_PACKED_WEIGHTS = WeakIdKeyDictionary()
# Multiply-adds under which a product keeps F.linear: oneDNN's call costs ~10 us more.
_ONEDNN_LINEAR_MIN_MACS = 2**20
# Widest kernel whose depth-wise weight gradient oneDNN computes on its fast path. On a 2-core EPYC (Zen 5),
# channels-last, batch 8: 7x3 and 7x1 kernels take 0.05-0.07 ms per tap at 56x56, 7x4 to 7x7 0.2-0.25 ms
# (5-10x the forward's time for a 7x7 kernel).
_FAST_WEIGHT_GRAD_WIDTH = 3


@register_notrace_function
def check_input_size(x: torch.Tensor, img_size: tuple[int, int], multiple: int) -> torch.Tensor:
    """``x``, or a ValueError naming the fix unless its height and width are ``img_size``.

    For models whose token-mixing weights are sized for the token grid at ``img_size``; ``multiple`` is the
    step of the sizes such a model can be built for. Returning ``x`` keeps the check in traced graphs.
    """
    height, width = x.shape[-2], x.shape[-1]
    if height != img_size[0] or width != img_size[1]:
        raise ValueError(
            f"input is {height}x{width} but the model was built for img_size=({img_size[0]}, {img_size[1]}): its "
            f"token-mixing weights are sized for that token grid. Resize the input to {img_size[0]}x{img_size[1]}, "
            f"or build the model with img_size=({height}, {width}) if each side is a multiple of {multiple}")
    return x


@torch.jit.unused
def _inference_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` for a oneDNN product with ``x`` that records no gradient: packed where it is a parameter
    (not recomputed per call, nor an inference tensor, whose in-place changes are not counted), else as it is.

    Packed at its first use, for the product's row count, and reused until the parameter's data is replaced
    or changed in place.
    """
    if _REORDER_LINEAR_WEIGHT is None or not isinstance(weight, nn.Parameter) or weight.is_inference():
        return weight
    data, version, packed = _PACKED_WEIGHTS.get(weight, (None, -1, None))
    if (data is None or data.data_ptr() != weight.data_ptr() or data.dtype != weight.dtype
            or version != weight._version):
        # `data` aliases the packed tensor's source, so that its memory cannot be reused under the same address
        data, version = weight.detach(), weight._version
        packed = _REORDER_LINEAR_WEIGHT(data, x.numel() // x.shape[-1])
        _PACKED_WEIGHTS[weight] = (data, version, packed)
    return packed


def _onednn_matmul(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, post_op: str = "none",
) -> torch.Tensor:
    """``x @ weight.T + bias`` on oneDNN, then ``post_op`` ("none", or "gelu": the exact GELU) as it is written."""
    return _ONEDNN_LINEAR(x, weight, bias, post_op, [], "none" if post_op == "gelu" else "")


@torch.jit.unused
def _eager_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU tensor in plain eager code: no graph capture (first, so that no guard is added
    on a symbolic shape), no autocast."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and x.device.type == 'cpu'
            and not torch.is_autocast_enabled('cpu'))


@torch.jit.unused
def _wants_grad(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a product of these operands (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))


class _OneDnnLinearFunction(torch.autograd.Function):
    """``F.linear`` whose three products (output, input gradient, weight gradient) run on oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    @once_differentiable  # a second derivative through it raises, naming this function
    def backward(ctx, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        grad_2d = grad_output.reshape(-1, weight.shape[0])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul(grad_2d, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            x_2d = x.reshape(-1, weight.shape[1])
            # oneDNN runs the long (tokens) reduction fastest with the wider side as its output's columns
            if weight.shape[0] <= weight.shape[1]:
                grad_weight = _onednn_matmul(grad_2d.t(), x_2d.t())
            else:
                grad_weight = _onednn_matmul(x_2d.t(), grad_2d.t()).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


@torch.jit.unused
def _onednn_takes(x: torch.Tensor, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether a product of ``x`` and ``weight``, both of one of ``dtypes``, runs on oneDNN: on CPU, in plain
    eager code, and large enough to pay for the call."""
    return (_ONEDNN_LINEAR is not None and _eager_on_cpu(x) and x.dtype in dtypes and weight.dtype == x.dtype
            and x.numel() * weight.shape[0] >= _ONEDNN_LINEAR_MIN_MACS)


@torch.jit.unused  # TorchScript cannot compile these checks; scripted models take F.linear
def onednn_linear_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` runs on oneDNN with gradients (see there): in fp32."""
    return _onednn_takes(x, weight, (torch.float32,))


@register_notrace_function  # an FX leaf: which kernel runs is decided at run time
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CPU on oneDNN's matmul: in fp32 forward and backward, and without
    gradients in bf16 too, where a parameter weight is packed once (``_inference_weight``).

    Same products, summed in another order; oneDNN's fp32 matmul ran about twice as fast as the MKL sgemm
    behind ``F.linear`` on an AMD EPYC. Compiled graphs, traces, autocast and other dtypes take F.linear.
    """
    if not torch.jit.is_scripting():
        if _onednn_inference_pays(x, weight, bias):
            return _onednn_matmul(x, _inference_weight(x, weight), bias)
        if onednn_linear_pays(x, weight):
            return _OneDnnLinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


torch.fx.wrap("linear")  # for plain symbolic_trace, which traces into OneDnnLinear.forward


@register_notrace_module  # a leaf for timm's tracer, like the nn.Linear it replaces
class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` computed by :func:`linear` (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(x, weight, bias)``."""
        return linear(x, self.weight, self.bias)


@torch.jit.unused  # TorchScript takes the batched product
def _onednn_linear_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear(x[i], weight[i], bias)`` for each sample ``i``, stacked."""
    return torch.stack([linear(sample, sample_weight, bias) for sample, sample_weight in zip(x, weight)])


@register_notrace_function  # an FX leaf: the kernel is chosen at run time
def per_sample_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x[i] @ weight[i].T + bias`` for each sample of ``x`` (N, ..., C_in) and ``weight`` (N, C_out, C_in).

    In fp32 on CPU one oneDNN product per sample (``linear``): 1.4-2x the speed of MKL's batched product on a
    Zen 5 EPYC. Elsewhere one batched product.
    """
    if not torch.jit.is_scripting() and onednn_linear_pays(x[0], weight[0]):
        return _onednn_linear_per_sample(x, weight, bias)
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    out = torch.bmm(rows, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias, rows, weight.transpose(1, 2))
    return out.view(x.shape[:-1] + (weight.shape[1],))


torch.fx.wrap("per_sample_linear")


@torch.jit.unused
def _onednn_inference_pays(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether a product without gradients runs on oneDNN: in fp32 or bf16 (see ``_onednn_takes``)."""
    # the gradient check first: a training product then asks ``_onednn_takes`` once, in ``onednn_linear_pays``
    return (not _wants_grad(x, weight, bias) and _onednn_takes(x, weight, (torch.float32, torch.bfloat16))
            and (bias is None or bias.dtype == x.dtype))


@register_notrace_function  # an FX leaf: which kernel runs is decided at run time
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.gelu(linear(x, weight, bias))``; without gradients on CPU (fp32 or bf16) one oneDNN call, the exact
    GELU applied as the product's output is written, which saves a pass over the activation."""
    if not torch.jit.is_scripting() and _onednn_inference_pays(x, weight, bias):
        return _onednn_matmul(x, _inference_weight(x, weight), bias, "gelu")
    return F.gelu(linear(x, weight, bias))


torch.fx.wrap("linear_gelu")  # for plain symbolic_trace, which traces into OneDnnMlp.forward


@register_notrace_module  # a leaf for timm's tracer, like the Mlp it replaces
class OneDnnMlp(Mlp):
    """A timm ``Mlp`` (linear, exact GELU, linear, no norm) whose first linear and GELU run as one oneDNN call
    at inference (:func:`linear_gelu`); the same parameters and state-dict keys. Its ``act`` module stays,
    unused, as in the ``Mlp`` it was built as."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``Mlp.forward`` (its norm is an identity) with fc1 and the GELU in one :func:`linear_gelu`."""
        return self.drop2(self.fc2(self.drop1(linear_gelu(x, self.fc1.weight, self.fc1.bias))))


def use_onednn_linears(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` in ``module`` into a :class:`OneDnnLinear` and every timm ``Mlp`` of
    linears with an exact GELU and no norm into a :class:`OneDnnMlp`, in place; returns ``module``.

    Models call this at the end of their construction, which covers the linears inside timm's ``Mlp``.
    """
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = OneDnnLinear
        elif (type(layer) is Mlp and isinstance(layer.fc1, nn.Linear) and isinstance(layer.norm, nn.Identity)
              and type(layer.act) is nn.GELU and layer.act.approximate == 'none'):
            layer.__class__ = OneDnnMlp
    return module


def branch_softmax(
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], channels: int, num_branches: int,
) -> torch.Tensor:
    """The per-sample softmax weights over branches, (num_branches, N, channels), from a re-weighting MLP's hidden
    activations (N, K) and its last layer (``weight`` with any trailing dims flattened, ``bias``), whose outputs
    are ordered (channel, branch).

    The last layer's rows are taken branch-major, so each branch's weights come out contiguous over the channels
    and the products that blend the branch maps read them as vectors; inductor's fused blend of the interleaved
    ones runs scalar.
    """
    weight = weight.reshape(channels, num_branches, -1).transpose(0, 1).reshape(channels * num_branches, -1)
    if bias is not None:
        bias = bias.reshape(channels, num_branches).t().reshape(channels * num_branches)
    return F.linear(hidden, weight, bias).view(-1, num_branches, channels).softmax(dim=1).transpose(0, 1)


def _column_slices(width: int) -> list[tuple[int, int]]:
    """Kernel columns ``[first, last)`` in slices at most ``_FAST_WEIGHT_GRAD_WIDTH`` wide: the three around
    the centre, then the rest of each side, so that only the centre slice keeps symmetric padding."""
    centre = width // 2
    slices = [(centre - 1, centre + 2)]
    for first in range(0, centre - 1, _FAST_WEIGHT_GRAD_WIDTH):
        slices.append((first, min(centre - 1, first + _FAST_WEIGHT_GRAD_WIDTH)))
    for first in range(centre + 2, width, _FAST_WEIGHT_GRAD_WIDTH):
        slices.append((first, min(width, first + _FAST_WEIGHT_GRAD_WIDTH)))
    return sorted(slices)


class _DepthwiseConvColumnSlicedGrad(torch.autograd.Function):
    """A same-size depth-wise conv (stride 1, odd kernel) whose weight gradient is taken in column slices.

    The gradient of kernel columns ``[first, last)`` is the weight gradient of a conv with just those columns,
    over the input shifted so that they line up: the slice's own conv, padded (or cropped) on each side by
    the distance of the slice's edges from the kernel's centre.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, None, 1, (weight.shape[2] // 2, weight.shape[3] // 2), 1, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        x, weight = ctx.saved_tensors
        channels, height, width = weight.shape[0], weight.shape[2], weight.shape[3]
        pad_h, pad_w = height // 2, width // 2
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, [1, 1], [pad_h, pad_w], [1, 1], False, [0, 0], channels,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grads = []
            for first, last in _column_slices(width):
                left, right = pad_w - first, last - 1 - pad_w
                # a slice centred on the kernel's centre pads symmetrically, inside the conv without a copy
                shifted, pad = (x, left) if left == right else (F.pad(x, (left, right)), 0)
                grads.append(torch.ops.aten.convolution_backward(
                    grad_output, shifted, weight[..., first:last], None, [1, 1], [pad_h, pad], [1, 1], False,
                    [0, 0], channels, [False, True, False])[1])
            grad_weight = torch.cat(grads, dim=3)
        return grad_input, grad_weight


@torch.jit.unused  # TorchScript cannot compile a custom autograd function; scripted models take F.conv2d
def _column_sliced_grad_pays(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether ``depthwise_conv2d`` takes its weight gradient in column slices (see there)."""
    # the slices' shifted inputs crop up to half the kernel's width, hence maps at least as wide as the kernel
    return (_eager_on_cpu(x) and bias is None and weight.requires_grad and torch.is_grad_enabled()
            and _FAST_WEIGHT_GRAD_WIDTH < weight.shape[3] <= x.shape[3])


@torch.jit.unused
def _depthwise_conv2d_column_sliced_grad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``_DepthwiseConvColumnSlicedGrad`` applied (a function TorchScript can leave out)."""
    return _DepthwiseConvColumnSlicedGrad.apply(x, weight)


@register_notrace_function  # an FX leaf: the choice of backward depends on the grad mode at run time
def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depth-wise conv of ``x`` with an odd ``weight`` (channels, 1, height, width), stride 1, output the size
    of the input.

    Where its weight gradient is wanted on CPU, for kernels wider than oneDNN's fast weight-gradient path
    (3), on maps at least as wide as the kernel and without a bias, the gradient is taken in column slices of
    at most 3: 4x faster for 7x7 kernels at 7x7 to 28x28, 2x at 56x56 on a 2-core EPYC; same sums, in another
    order.
    """
    if not torch.jit.is_scripting() and _column_sliced_grad_pays(x, weight, bias):
        return _depthwise_conv2d_column_sliced_grad(x, weight)
    return F.conv2d(x, weight, bias, 1, (weight.shape[2] // 2, weight.shape[3] // 2), 1, weight.shape[0])


class ExpandingDepthwiseConv2d(nn.Conv2d):
    """A grouped conv with one input channel and several output channels per group (a depthwise conv with a
    channel multiplier), computed as one plain depthwise conv per output of a group, interleaved channels-last.

    oneDNN runs plain depthwise convs on a fast path and the multiplier form on a slow one: Strip-MLP's 2x2
    strided shortcuts (multiplier 2, channels-last, batch 8) took 1.5-1.9 ms in bf16 and 0.5-0.6 ms in fp32
    against 0.16-0.32 ms this way, on a 2-core Zen 5 EPYC.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The grouped conv of ``x``, channels-last."""
        multiplier = self.out_channels // self.groups
        bias = self.bias
        outputs = []
        for i in range(multiplier):
            out = F.conv2d(x, self.weight[i::multiplier], None if bias is None else bias[i::multiplier], self.stride,
                           self.padding, self.dilation, self.groups)
            outputs.append(out.permute(0, 2, 3, 1))
        # output channel g * multiplier + i is output i of group g
        return torch.stack(outputs, dim=-1).flatten(3).permute(0, 3, 1, 2)


class ChannelsLastConv2d(nn.Conv2d):
    """A Conv2d whose output is channels-last whatever the input's layout.

    It convolves with a channels-last copy of its kernel rather than of its input: a recorded graph then
    keeps the image as it came (the caller holds it anyway) instead of a channels-last copy of it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x``; the result is channels-last (see the class)."""
        return self._conv_forward(x, self.weight.contiguous(memory_format=torch.channels_last), self.bias)


class SkipsDroppedSamples:
    """Mixin for blocks whose residual branches go through :func:`drop_path_residual` in training."""

    @torch.jit.unused  # TorchScript knows no DropPath type; scripted models take the plain form
    def skips_dropped_samples(self) -> bool:
        """Whether the residual branches run only for the samples drop path keeps (training with a DropPath)."""
        return self.training and isinstance(self.drop_path, DropPath)


@register_notrace_function  # an FX leaf: which samples run is decided at run time
def drop_path_residual(block: nn.Module, x: torch.Tensor, branch: str = "residual_branch") -> torch.Tensor:
    """``x + block.drop_path(f(x))`` in training, with the branch ``f`` computed (on CPU) only for the samples
    that drop path keeps.

    ``block.drop_path`` is a timm ``DropPath``; ``getattr(block, branch)(x, scale)`` returns ``f(x) * scale``, so
    that the branch can fold drop path's rescaling into a weight. The mask is drawn as ``DropPath`` draws it
    (one Bernoulli per sample, same shape, dtype and generator), so the same seed drops the same samples,
    whose branch ``DropPath`` would only multiply by zero. The branch must treat samples independently
    (no batch statistics).
    """
    drop_path: DropPath = block.drop_path
    branch_fn = getattr(block, branch)
    # Choosing the samples reads the mask on the host: on a GPU that is a synchronization per branch (not
    # measured yet, so GPUs keep the plain form), and a compiled graph would break there (it fuses the plain form).
    if x.device.type != 'cpu' or torch.compiler.is_compiling():
        return x + drop_path(branch_fn(x, 1.))
    keep_prob = 1. - drop_path.drop_prob
    scale = 1. / keep_prob if drop_path.scale_by_keep and keep_prob > 0. else 1.
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    kept = mask.view(-1).nonzero().view(-1)
    if kept.numel() == x.shape[0]:
        return x + branch_fn(x, scale)
    # With every sample dropped the branch still runs, on an empty batch: its parameters then get zero
    # gradients, as under DropPath, rather than none, which optimizers would treat as "skip this parameter".
    kept_branch = branch_fn(x.index_select(0, kept), scale)
    dtype = torch.promote_types(x.dtype, kept_branch.dtype)  # under autocast the branch may be in bf16
    return x.to(dtype).index_add(0, kept, kept_branch.to(dtype))


def in_batch_slices(
        fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, slice_bytes: int) -> torch.Tensor:
    """``fn(x)``; at inference on CPU, over equal slices of the batch of at most ``slice_bytes`` of ``x`` each
    (at least one sample), whose temporaries the heap reuses.

    ``fn`` must treat samples independently (no batch statistics). Training keeps one call: its activations
    are saved for the backward anyway. So do tracing, export and compilation, whose graphs would fix the
    slicing to the example's batch size.
    """
    if (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.is_grad_enabled() or x.device.type != 'cpu'):
        return fn(x)
    n = x.shape[0]
    sample_bytes = max(1, x.shape[1:].numel() * x.element_size())
    num_slices = -(-n // max(1, slice_bytes // sample_bytes))
    if num_slices == 1:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(-(-n // num_slices))])


def blocks_in_batch_slices(blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``blocks(x)``; in eval mode on CPU over slices of ``_CPU_INFERENCE_SLICE_BYTES`` (``in_batch_slices``),
    which holds samples apart for LayerNorm models."""
    if blocks.training:
        return blocks(x)
    return in_batch_slices(blocks, x, _CPU_INFERENCE_SLICE_BYTES)


def _spatial_norm_forward(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.bfloat16):
        # 3-20x faster on CPU than torch.linalg.vector_norm over the same non-innermost dims; the bf16 sum
        # accumulates in fp32, and bf16 has fp32's range
        return x.square().sum(dim=(1, 2)).sqrt()
    # in fp16 the squares and their sum overflow where the norm does not; the norm kernel accumulates in fp32
    return torch.linalg.vector_norm(x, dim=(1, 2))


class _SpatialL2Norm(torch.autograd.Function):
    """L2 norm over H and W of an NHWC map, with a backward of one pass over the map.

    ``Tensor.norm``'s backward makes three (a division, a mask for zero norms, a product); here the
    division and the mask act on the small (N, C) result, leaving one product with the map.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        norm = _spatial_norm_forward(x)
        ctx.save_for_backward(x, norm)
        return norm

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm, 0.0)
        return x * scale[:, None, None, :]


@register_notrace_function
@torch.fx.wrap
def spatial_l2_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of an (N, H, W, C) map over H and W, (N, C); an FX leaf function."""
    if torch.jit.is_scripting() or not x.requires_grad:
        return _spatial_norm_forward(x)
    return _SpatialL2Norm.apply(x)
