"""The fast kernels against the reference maths, through the public switch, and the kernels on their own.

Every model comparison builds the same weights twice, with ``fast_kernels=True`` and ``False``, and asks for the same
outputs and gradients (fp32, relative error <= 1e-5), at sizes where the fast kernels engage.
"""

import importlib
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath, set_scriptable
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import visionmlp
from synthetic_weights import relative_l2
from visionmlp.kernels import (
    ExpandingDepthwiseConv2d,
    OneDnnLinear,
    OneDnnMlp,
    depthwise_conv2d,
    drop_path_residual,
    linear,
    linear_gelu,
    per_sample_linear,
)
from visionmlp.kernels.torch_ops import LINEAR_POINTWISE, ONEDNN_BF16

# the module (the package's ``linear`` is the function of that name)
linear_module = importlib.import_module("visionmlp.kernels.linear")

# The smallest variant of each family at a small resolution where every fast kernel engages; batch 2
CASES = {
    "ms_mlp_tiny": 64,
    "vip_s7": 112,
    "strip_mlp_tiny_light": 64,
    "raft_mlp_s": 64,
    "repmlpnet_t224": 64,
}
needs_onednn = pytest.mark.skipif(LINEAR_POINTWISE is None, reason="this torch has no oneDNN linear")


def _randomized(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and layer scales, so that folding and scaling are exercised."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("running_mean") or name.endswith("gamma"):
                tensor.normal_(0, 0.2, generator=generator)
    return model


def _pair(name: str, **kwargs) -> tuple[nn.Module, nn.Module]:
    """The reference and the fast form of ``name`` holding the same weights."""
    torch.manual_seed(0)
    size = {} if name.startswith("ms_mlp") else {"img_size": CASES[name]}
    reference = _randomized(visionmlp.create_model(name, fast_kernels=False, **size, **kwargs))
    fast = visionmlp.create_model(name, fast_kernels=True, **size, **kwargs)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _inputs(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, CASES[name], CASES[name], generator=torch.Generator().manual_seed(1))


def _logits_and_gradients(model: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one forward and the gradients of their mean square, all parameters' concatenated."""
    torch.manual_seed(seed)
    model.zero_grad()
    logits = model(x)
    logits.square().mean().backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    return logits.detach(), grads


def _assert_same_gradients(got: torch.Tensor, expected: torch.Tensor) -> None:
    # relative to the whole gradient: parameters just before a training-mode BatchNorm have gradients near zero
    assert relative_l2(got, expected) <= 1e-5
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


class _RecordedOps(TorchDispatchMode):
    """The names of the operators dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------------------------
# the switch


def test_the_switch_decides_at_construction():
    assert visionmlp.use_fast_kernels()  # the default
    try:
        visionmlp.set_fast_kernels(False)
        model = visionmlp.create_model("raft_mlp_s", img_size=32)
        assert not model.fast_kernels and not visionmlp.use_fast_kernels()
        assert visionmlp.create_model("raft_mlp_s", img_size=32, fast_kernels=True).fast_kernels
    finally:
        visionmlp.set_fast_kernels(True)
    assert not model.fast_kernels  # a model keeps the form it was built with
    assert visionmlp.create_model("raft_mlp_s", img_size=32).fast_kernels
    assert not timm.create_model("vip_s7", img_size=28, fast_kernels=False).fast_kernels
    with set_scriptable(True):  # TorchScript compiles the reference maths
        assert not visionmlp.create_model("vip_s7", img_size=28).fast_kernels
    with pytest.raises(TypeError, match="True or False"):
        visionmlp.set_fast_kernels("no")


@pytest.mark.parametrize("value, expected", [
    ("0", False), ("1", True), (" Off ", False), ("yes", True), ("maybe", None)])
def test_the_environment_variable_values(monkeypatch, value, expected):
    from visionmlp.kernels.switch import _default_from_environment

    monkeypatch.setenv("VISIONMLP_FAST_KERNELS", value)
    if expected is None:
        with pytest.raises(ValueError, match="set it to 1 \\(fast kernels, the default\\) or 0"):
            _default_from_environment()
    else:
        assert _default_from_environment() is expected


def test_the_environment_variable_sets_the_default_of_a_new_process():
    code = ("import visionmlp; "
            "print(visionmlp.use_fast_kernels(), visionmlp.create_model('vip_s7', img_size=28).fast_kernels)")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "VISIONMLP_FAST_KERNELS": "0"},
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    result = subprocess.run([sys.executable, "-c", "import visionmlp"], capture_output=True, text=True,
                            env={**os.environ, "VISIONMLP_FAST_KERNELS": "maybe"})
    assert result.returncode != 0 and "set it to 1 (fast kernels, the default) or 0" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# the models: reference and fast forms agree


@pytest.mark.parametrize("name", CASES)
def test_fast_and_reference_forms_give_the_same_outputs_and_gradients(name):
    reference, fast = _pair(name, drop_path_rate=0.0)
    x = _inputs(name)
    for training in (False, True):
        reference.train(training), fast.train(training)
        (logits, grads), (expected_logits, expected_grads) = (
            _logits_and_gradients(fast, x), _logits_and_gradients(reference, x))
        assert relative_l2(logits, expected_logits) <= 1e-5
        _assert_same_gradients(grads, expected_grads)
    with torch.no_grad():
        assert relative_l2(fast.eval()(x), reference.eval()(x)) <= 1e-5


def test_raft_mlp_one_level_models_fast_and_reference_forms_agree():
    # the MLP-Mixer baseline's blocks (the generic fast kernels: oneDNN MLPs, residuals on kept samples) and a one-level
    # raft model, narrow, in training with drop path and in evaluation
    for name in ("raft_mlp_org_mixer", "raft_mlp_r4"):
        torch.manual_seed(0)
        kwargs = dict(img_size=64, embed_dims=(32,), drop_path_rate=0.5)
        reference = visionmlp.create_model(name, fast_kernels=False, **kwargs)
        fast = visionmlp.create_model(name, fast_kernels=True, **kwargs)
        fast.load_state_dict(reference.state_dict())
        x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        (logits, grads), (expected_logits, expected_grads) = (
            _logits_and_gradients(fast.train(), x, seed=7), _logits_and_gradients(reference.train(), x, seed=7))
        assert relative_l2(logits, expected_logits) <= 1e-5, name
        _assert_same_gradients(grads, expected_grads)
        with torch.no_grad():
            assert relative_l2(fast.eval()(x), reference.eval()(x)) <= 1e-5, name


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("repmlpnet")])  # RepMLPNet: no drop path
def test_with_drop_path_the_fast_form_drops_the_same_samples(name):
    # the fast residuals draw the drop mask as timm's DropPath does: same seed, same samples, same gradients
    reference, fast = _pair(name, drop_path_rate=0.5)
    x = _inputs(name, batch=4)
    (logits, grads), (expected_logits, expected_grads) = (
        _logits_and_gradients(fast.train(), x, seed=7), _logits_and_gradients(reference.train(), x, seed=7))
    assert relative_l2(logits, expected_logits) <= 1e-5
    _assert_same_gradients(grads, expected_grads)


@pytest.mark.parametrize("name", CASES)
def test_the_reference_form_runs_public_ops_only_and_the_fast_form_takes_its_kernels(name):
    reference, fast = _pair(name, drop_path_rate=0.0)
    x = _inputs(name, batch=4)  # RepMLPNet's one linear layer, the classifier, takes oneDNN from 3 images on
    recorded = {}
    for label, model in (("reference", reference), ("fast", fast)):
        with _RecordedOps() as ops:
            model.train()(x).sum().backward()
            with torch.no_grad():
                model.eval()(x)
        recorded[label] = ops.names
    assert not any(op.startswith(("mkldnn::", "mkl::")) for op in recorded["reference"])
    if LINEAR_POINTWISE is not None:
        assert "mkldnn::_linear_pointwise" in recorded["fast"]


@pytest.mark.parametrize("name", CASES)
def test_channels_last_and_folded_forms_match_plain_fp32(name):
    reference, fast = _pair(name)
    x = _inputs(name)
    with torch.no_grad():
        expected = reference.eval()(x)
        for model in (reference, fast):
            prepared = visionmlp.optimize_for_inference(model, channels_last=True)
            assert relative_l2(prepared(x.contiguous(memory_format=torch.channels_last)), expected) <= 1e-5


def test_under_cpu_autocast_the_fast_form_takes_the_reference_ops():
    reference, fast = _pair("vip_s7")
    x = _inputs("vip_s7")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _RecordedOps() as ops:
        got = fast.eval()(x)
        expected = reference.eval()(x)
    assert "mkldnn::_linear_pointwise" not in ops.names
    assert got.dtype == expected.dtype == torch.bfloat16
    assert relative_l2(got.float(), expected.float()) <= 1e-2  # bf16 rounding; the stem's layout differs


# ---------------------------------------------------------------------------------------------------------------
# inference preparation


def test_optimize_for_inference_returns_a_frozen_copy_and_leaves_the_model_trainable():
    model = visionmlp.create_model("repmlpnet_t224", img_size=64).train()
    x = torch.randn(2, 3, 64, 64)
    prepared = visionmlp.optimize_for_inference(model, dtype=torch.bfloat16, channels_last=True)
    assert prepared is not model and model.training and all(p.requires_grad for p in model.parameters())
    assert not prepared.training and not any(p.requires_grad for p in prepared.parameters())
    assert all(p.dtype == torch.bfloat16 for p in prepared.parameters())
    assert not any(hasattr(m, "local_inject") and not m.deploy for m in prepared.modules())  # folded
    with torch.no_grad():
        expected = model.eval()(x)
        got = prepared(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)).float()
    assert relative_l2(got, expected) <= 2e-2
    assert visionmlp.optimize_for_inference(model, inplace=True) is model
    with pytest.raises(ValueError, match="compile=True"):
        visionmlp.optimize_for_inference(model, cuda_graphs=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_model_compiled_for_inference_matches_eager(name):
    # weights frozen into the graph, where inductor packs them for oneDNN
    from torch._inductor.utils import run_and_get_code

    # one block a stage: every kernel of the family in a graph a few times quicker to compile than the full depth
    reference, fast = _pair(name, depths=[1, 1, 1, 1])
    x = _inputs(name)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = reference.eval()(x)
        output, (code,) = run_and_get_code(visionmlp.optimize_for_inference(fast, compile=True), x)
    assert relative_l2(output, expected) <= 1e-5
    assert "_frozen_param" in code


# ---------------------------------------------------------------------------------------------------------------
# the kernels on their own


@needs_onednn
@pytest.mark.parametrize("x_shape, out_features, bias", [
    ((300, 64), 96, True),  # weight wider than tall: its gradient in the other orientation
    ((2, 150, 96), 64, False),
    ((3, 5, 70, 48), 48, True),
])
@pytest.mark.parametrize("strided", [False, True])
def test_linear_runs_on_onednn_forward_and_backward_with_f_linear_results(x_shape, out_features, bias, strided):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape[:-2], x_shape[-1], x_shape[-2], generator=generator).transpose(-1, -2) if strided \
        else torch.randn(*x_shape, generator=generator)
    weight = torch.randn(out_features, x_shape[-1], generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    grad = torch.randn(*x_shape[:-1], out_features, generator=generator)
    results = []
    for fn, dtype in ((linear, torch.float32), (F.linear, torch.float64)):
        inputs = [t.to(dtype).requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
        out = fn(inputs[0], inputs[1], inputs[2] if bias else None)
        results.append([out, *torch.autograd.grad(out, inputs, grad.to(dtype))])
        if fn is linear:
            assert type(out.grad_fn).__name__ == "_OneDnnLinearFunctionBackward"
    for got, expected in zip(*results):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert relative_l2(got.double(), expected) <= 1e-6


@needs_onednn
def test_linear_without_gradients_calls_onednn_and_keeps_f_linear_elsewhere(onednn_calls):
    x, weight = torch.randn(64, 128), torch.randn(256, 128)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        assert onednn_calls == ["none"]
        linear(x.double(), weight.double())  # oneDNN has no fp64 matmul
        linear(x[:2, :8], weight[:4, :8])  # too small to pay for the call
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, weight).dtype == torch.bfloat16
    assert onednn_calls == ["none"]


@needs_onednn
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_linear_gelu_runs_as_one_onednn_call_without_gradients(dtype, tolerance, onednn_calls):
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((64, 128), (256, 128), (256,)))
    with torch.no_grad():
        out = linear_gelu(x.to(dtype), weight.to(dtype), bias.to(dtype))
    # a CPU without oneDNN's bf16 (AVX2) computes bf16 with the reference ops
    assert onednn_calls == (["gelu"] if dtype == torch.float32 or ONEDNN_BF16 else []) and out.dtype == dtype
    expected = F.gelu(F.linear(x.double(), weight.double(), bias.double()))
    assert relative_l2(out.double(), expected) <= tolerance
    bias.requires_grad_()  # with gradients: the product (oneDNN in fp32), then the GELU
    out = linear_gelu(x, weight, bias)
    (grad_bias,) = torch.autograd.grad(out.sum(), bias)
    reference_bias = bias.detach().double().requires_grad_()
    (expected_grad,) = torch.autograd.grad(F.gelu(F.linear(x.double(), weight.double(), reference_bias)).sum(),
                                           reference_bias)
    assert relative_l2(grad_bias.double(), expected_grad) <= 1e-6


@needs_onednn
@pytest.mark.parametrize("has_bf16", [True, False], ids=["onednn-bf16", "no-onednn-bf16"])
def test_bf16_linears_take_onednn_only_where_this_cpu_has_its_bf16(has_bf16, monkeypatch, onednn_calls):
    if has_bf16 and not ONEDNN_BF16:
        pytest.skip("this CPU has no oneDNN bf16 (AVX2)")
    monkeypatch.setattr(linear_module, "ONEDNN_BF16", has_bf16)
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((64, 128), (256, 128), (256,)))
    with torch.no_grad():
        got = [fn(x.bfloat16(), weight.bfloat16(), bias.bfloat16()) for fn in (linear, linear_gelu)]
    assert onednn_calls == (["none", "gelu"] if has_bf16 else [])
    expected = F.linear(x.double(), weight.double(), bias.double())
    for out, reference in zip(got, (expected, F.gelu(expected))):
        assert out.dtype == torch.bfloat16 and relative_l2(out.double(), reference) <= 1e-2


@needs_onednn
def test_linear_has_second_derivatives_and_works_under_torch_func():
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(64, 32, generator=generator), torch.randn(48, 32, generator=generator)
    results = []
    for fn in (linear, F.linear):
        w = weight.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(x, w).tanh().sum(), w, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), w)
        results.append((grad.detach(), second))
    for got, expected in zip(*results):
        assert relative_l2(got, expected) <= 1e-5
    loss = lambda fn: (lambda w: fn(x, w).tanh().sum())  # noqa: E731
    assert relative_l2(torch.func.grad(loss(linear))(weight), torch.func.grad(loss(F.linear))(weight)) <= 1e-5


@needs_onednn
def test_per_sample_linear_takes_one_onednn_product_per_sample(onednn_calls):
    x, weight, bias = torch.randn(3, 16, 16, 64), torch.randn(3, 128, 64), torch.randn(128)
    with torch.no_grad():
        out = per_sample_linear(x, weight, bias)
    assert onednn_calls == ["none"] * 3
    expected = torch.einsum("nhwi,noi->nhwo", x.double(), weight.double()) + bias.double()
    assert relative_l2(out.double(), expected) <= 1e-6


def test_fast_models_put_onednn_modules_in_place_of_linears_with_the_same_state_dict():
    reference, fast = _pair("vip_s7")
    assert reference.state_dict().keys() == fast.state_dict().keys()
    assert not any(isinstance(m, (OneDnnLinear, OneDnnMlp)) for m in reference.modules())
    assert isinstance(fast.head, OneDnnLinear) and isinstance(fast.stages[0].blocks[0].mlp, OneDnnMlp)
    assert isinstance(fast.stages[0].blocks[0].attn.reweight, OneDnnMlp)


@pytest.mark.parametrize("kernel", [(7, 7), (3, 7), (5, 5), (5, 11), (1, 9)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_depthwise_conv2d_takes_wide_kernel_weight_gradients_in_column_slices_as_conv2d(kernel, memory_format):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 12, dtype=torch.float64, generator=generator).contiguous(memory_format=memory_format)
    weight = torch.randn(5, 1, *kernel, dtype=torch.float64, generator=generator)
    grad = torch.randn(2, 5, 9, 12, dtype=torch.float64, generator=generator)
    results = []
    for conv in (depthwise_conv2d, lambda x, w: F.conv2d(x, w, padding=(w.shape[2] // 2, w.shape[3] // 2), groups=5)):
        x_, weight_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = conv(x_, weight_)
        grads = torch.autograd.grad(out, (x_, weight_), grad, create_graph=True)
        second = torch.autograd.grad(grads[1].square().sum(), x_)  # second derivatives exist
        results.append([out, *grads, *second, type(out.grad_fn).__name__])
    *got, kind = results[0]
    *expected, _ = results[1]
    assert kind == "_ColumnSlicedGradDepthwiseConvBackward"
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_depthwise_conv2d_keeps_conv2d_where_its_weight_gradient_is_fast_or_not_wanted():
    x, weight = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 7, 7, requires_grad=True)
    sliced = "_ColumnSlicedGradDepthwiseConvBackward"
    assert type(depthwise_conv2d(x, weight).grad_fn).__name__ == sliced
    assert type(depthwise_conv2d(x, weight, torch.zeros(4)).grad_fn).__name__ != sliced  # a bias: conv2d
    assert type(depthwise_conv2d(x, torch.randn(4, 1, 7, 3, requires_grad=True)).grad_fn).__name__ != sliced
    assert type(depthwise_conv2d(x[..., :6], weight).grad_fn).__name__ != sliced  # narrower than the kernel
    assert type(depthwise_conv2d(x.requires_grad_(), weight.detach()).grad_fn).__name__ != sliced
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(depthwise_conv2d(x, weight).grad_fn).__name__ != sliced
    with torch.no_grad():
        assert depthwise_conv2d(x, weight).grad_fn is None


@pytest.mark.parametrize("drop_prob", [0.0, 0.5, 1.0])
def test_drop_path_residual_equals_timm_drop_path_and_skips_dropped_samples(drop_prob):
    layer, drop_path = nn.Linear(4, 4), DropPath(drop_prob).train()
    batches: list[int] = []

    def branch(t: torch.Tensor) -> torch.Tensor:
        batches.append(t.shape[0])
        return layer(t)

    x = torch.randn(64, 3, 4)
    torch.manual_seed(3)
    expected = x + drop_path(layer(x))
    kept = int((expected != x).any(-1).any(-1).sum())
    torch.manual_seed(3)
    got = drop_path_residual(x, branch, drop_path)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert batches == [kept] and {0.0: kept == 64, 0.5: 0 < kept < 64, 1.0: kept == 0}[drop_prob]
    # every sample dropped: zero gradients, as under DropPath, not none (which optimizers skip)
    got.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("multiplier, kernel, stride, bias", [(2, 2, 2, False), (3, 3, 1, True)])
def test_expanding_depthwise_conv2d_equals_the_grouped_conv(multiplier, kernel, stride, bias):
    torch.manual_seed(0)
    grouped = nn.Conv2d(4, 4 * multiplier, kernel, stride=stride, groups=4, bias=bias)
    expanding = ExpandingDepthwiseConv2d(4, 4 * multiplier, kernel, stride=stride, groups=4, bias=bias)
    expanding.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = expanding(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, grouped(x))
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x), torch.autograd.grad(grouped(x).sum(), x))


@pytest.mark.parametrize("name", ["vip_s7", "strip_mlp_tiny_light"])
def test_fast_stems_write_channels_last_tokens_and_keep_the_image_itself_for_backward(name):
    # the stem convolves with a channels-last kernel: its output is channels-last without a copy of the image,
    # which the recorded graph would keep for the kernel's gradient
    _, fast = _pair(name)
    x = _inputs(name)
    stem = fast.patch_embed.proj if name == "vip_s7" else fast.stem
    image_sized = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.shape == x.shape:
            image_sized.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = stem(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert image_sized and all(t.data_ptr() == x.data_ptr() for t in image_sized)


def test_fast_blocks_have_the_reference_second_derivatives():
    # double backward through every custom autograd Function of the fast forms (float64, where oneDNN steps aside)
    from visionmlp.models.ms_mlp import MixShiftBlock
    from visionmlp.models.raft_mlp import RaftBlock
    from visionmlp.models.strip_mlp import ChannelMixing, LocalStripMixing

    cases = [
        (lambda fast: MixShiftBlock(15, mix_sizes=(1, 3, 3, 5, 7), fast_kernels=fast), (2, 15, 8, 8)),
        (lambda fast: ChannelMixing(8, 3, fast_kernels=fast), (2, 8, 8, 8)),
        (lambda fast: LocalStripMixing(8, fast_kernels=fast), (2, 8, 8, 8)),
        (lambda fast: RaftBlock(12, (4, 4), raft_size=3, fast_kernels=fast), (2, 4, 4, 12)),
    ]
    for build, shape in cases:
        torch.manual_seed(0)
        reference = build(False).double()
        for p in reference.parameters():
            nn.init.normal_(p, std=0.3)
        fast = build(True).double()
        fast.load_state_dict(reference.state_dict())
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        results = []
        for block in (fast, reference):
            (grad,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
            results.append(torch.autograd.grad(grad.square().sum(), [x, *block.parameters()]))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
