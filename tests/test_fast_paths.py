"""Every fast path computes what the plain fp32 eager model computes (relative L2 error <= 1e-5)."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, get_notrace_functions, get_notrace_modules, set_scriptable
from torch import nn
from torch._inductor.utils import run_and_get_code
from torchvision.models.feature_extraction import create_feature_extractor

import visionmlp
from visionmlp.engine.compilation import compiled
from visionmlp.models import layers, ms_mlp, raft_mlp, strip_mlp
from visionmlp.models.layers import (
    ExpandingDepthwiseConv2d, OneDnnLinear, OneDnnMlp, depthwise_conv2d, drop_path_residual, linear, linear_gelu,
    branch_softmax, per_sample_linear,
)
from visionmlp.models.ms_mlp import MixShiftBlock
from synthetic_weights import relative_l2

# The smallest variant of each family at a small resolution; batch 2 so that batch-dependent paths show.
CASES = {
    "ms_mlp_tiny": 64,
    "vip_s7": 112,
    "strip_mlp_tiny_light": 64,
    "raft_mlp_s": 64,
    "repmlpnet_t224": 64,
}


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and layer scales, so that folding and scaling are exercised."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("running_mean") or name.endswith("gamma"):
                tensor.normal_(0, 0.2, generator=generator)
    return model.eval()


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    size = {} if name.startswith("ms_mlp") else {"img_size": CASES[name]}
    return _randomized(visionmlp.create_model(name, **size, **kwargs))


def _inputs(name: str) -> torch.Tensor:
    return torch.randn(2, 3, CASES[name], CASES[name], generator=torch.Generator().manual_seed(1))


def _logits_and_gradients(model: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """The logits of one training forward and the gradients of their mean square (zeros for unused ones)."""
    torch.manual_seed(seed)
    logits = model(x)
    logits.square().mean().backward()
    return [logits.detach()] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("name", CASES)
def test_channels_last_and_deploy_match_plain_fp32(name):
    model, x = _model(name), _inputs(name)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        assert relative_l2(model(x.contiguous(memory_format=torch.channels_last)), expected) <= 1e-5
        visionmlp.reparameterize(model)
        assert relative_l2(model(x.contiguous(memory_format=torch.channels_last)), expected) <= 1e-5


def test_ms_mlp_cache_blocked_channel_mlp_matches_plain_path():
    # 2 x 32 x 32 stage-1 tokens at 128 px: two CPU slices of the channel MLP; the scriptable build has none
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    blocked = _model("ms_mlp_tiny")
    with set_scriptable(True):
        plain = _model("ms_mlp_tiny")
    assert blocked.stages[0].blocks[0].fast_channel_mlp and not plain.stages[0].blocks[0].fast_channel_mlp
    with torch.no_grad():
        assert relative_l2(blocked(x), plain(x)) <= 1e-5


def test_ms_mlp_training_step_matches_plain_path_fp32():
    # At 64 px, stage 1 has 2 x 16 x 16 = 512 tokens, more than fc2's 384 inputs: its layer scale is folded
    x = _inputs("ms_mlp_tiny")
    fast = _model("ms_mlp_tiny", drop_path_rate=0.0).train()
    with set_scriptable(True):
        plain = _model("ms_mlp_tiny", drop_path_rate=0.0).train()
    plain.load_state_dict(fast.state_dict())
    for got, expected in zip(_logits_and_gradients(fast, x), _logits_and_gradients(plain, x)):
        assert relative_l2(got, expected) <= 1e-5


def _counted(monkeypatch: pytest.MonkeyPatch, attribute: str) -> list[int]:
    """Wrap ``layers.<attribute>`` so that each call is recorded; returns the record."""
    calls: list[int] = []
    original = getattr(layers, attribute)
    monkeypatch.setattr(layers, attribute, lambda *args: calls.append(1) or original(*args))
    return calls


def _fast_and_plain_training(name: str, monkeypatch: pytest.MonkeyPatch, switch: str, off: object, fast: str):
    """Logits and gradients of a training step with ``layers.<switch>`` set to ``off`` and as it is, and
    checks that the second step called ``layers.<fast>``."""
    x = _inputs(name)
    monkeypatch.setattr(layers, switch, off)
    plain = _logits_and_gradients(_model(name, drop_path_rate=0.0).train(), x)
    monkeypatch.undo()
    calls = _counted(monkeypatch, fast)
    fast_result = _logits_and_gradients(_model(name, drop_path_rate=0.0).train(), x)
    assert calls
    return fast_result, plain


needs_onednn = pytest.mark.skipif(layers._ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")


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


def test_linear_without_gradients_calls_onednn_and_keeps_f_linear_elsewhere(onednn_calls):
    calls = onednn_calls
    x, weight = torch.randn(64, 128), torch.randn(256, 128)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        linear(x.double(), weight.double())  # oneDNN has no fp64 matmul
        linear(x[:2, :8], weight[:4, :8])  # too small to pay for the call
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, weight).dtype == torch.bfloat16
    assert len(calls) == 1


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_linear_gelu_runs_as_one_onednn_call_without_gradients(dtype, tolerance, onednn_calls):
    calls = onednn_calls
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((2, 300, 64), (256, 64), (256,)))
    expected = F.gelu(F.linear(x.double(), weight.double(), bias.double()))
    with torch.no_grad():
        out = linear_gelu(x.to(dtype), weight.to(dtype), bias.to(dtype))
    assert calls == ["gelu"] and out.dtype == dtype
    assert relative_l2(out.double(), expected) <= tolerance
    bias.requires_grad_()  # a gradient wanted for the bias alone: the oneDNN linear, then GELU
    out = linear_gelu(x, weight, bias)
    assert calls == ["gelu", "none"] and relative_l2(out.detach().double(), expected) <= 1e-6
    (grad_bias,) = torch.autograd.grad(out.sum(), bias)
    reference_bias = bias.detach().double().requires_grad_()
    (expected_grad,) = torch.autograd.grad(F.gelu(F.linear(x.double(), weight.double(), reference_bias)).sum(),
                                           reference_bias)
    assert relative_l2(grad_bias.double(), expected_grad) <= 1e-6


@needs_onednn
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_linear_packs_a_parameter_once_for_inference_and_again_when_its_data_changes(dtype, tolerance, monkeypatch):
    packs = []
    reorder = layers._REORDER_LINEAR_WEIGHT
    monkeypatch.setattr(layers, "_REORDER_LINEAR_WEIGHT", lambda *args: packs.append(1) or reorder(*args))
    generator = torch.Generator().manual_seed(0)
    layer = OneDnnLinear(64, 256).to(dtype)
    x = torch.randn(2, 300, 64, generator=generator).to(dtype)

    def check() -> None:
        expected = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        assert relative_l2(layer(x).double(), expected) <= tolerance

    with torch.no_grad():
        check()
        check()
        assert len(packs) == 1
        layer.weight.mul_(-2.)  # in place, as load_state_dict and EMA updates change weights
        check()
        assert len(packs) == 2
        layer.weight.data = torch.randn(256, 64, generator=generator).to(dtype)
        check()
        assert len(packs) == 3
        linear(x, layer.weight * 1., layer.bias)  # a weight computed per call is used as it is
        assert len(packs) == 3
    layer(x).sum().backward()  # training products take the weight as it is
    assert len(packs) == 3 and layer.weight.grad is not None
    entries = len(layers._PACKED_WEIGHTS)
    layer = None
    assert len(layers._PACKED_WEIGHTS) == entries - 1  # the packed copy goes with its parameter


def test_per_sample_linear_takes_one_onednn_product_per_sample(onednn_calls):
    x, weight, bias = torch.randn(3, 16, 16, 96), torch.randn(3, 48, 96), torch.randn(48)
    out = per_sample_linear(x, weight, bias)
    assert len(onednn_calls) == 3
    expected = torch.einsum("nhwi,noi->nhwo", x.double(), weight.double()) + bias.double()
    assert relative_l2(out.double(), expected) <= 1e-6


def test_models_build_their_linears_as_onednn_linears_with_the_same_state_dict():
    for name in ("vip_s7", "raft_mlp_s", "ms_mlp_tiny", "strip_mlp_tiny_light"):
        model = _model(name)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is OneDnnLinear for m in linears)
        linear_mlps = [m for m in model.modules() if isinstance(m, Mlp) and isinstance(m.fc1, nn.Linear)]
        assert all(type(m) is OneDnnMlp for m in linear_mlps)
        assert linear_mlps or name.startswith("strip")  # Strip-MLP's MLPs are convs, or its own fc1/fc2
        assert any(key.endswith("fc1.weight") for key in model.state_dict())


@needs_onednn
@pytest.mark.parametrize("name", ["vip_s7", "raft_mlp_s", "ms_mlp_tiny", "strip_mlp_tiny_light"])
def test_training_with_onednn_linears_matches_f_linear(name, monkeypatch):
    got, expected = _fast_and_plain_training(name, monkeypatch, "_ONEDNN_LINEAR", None, "_ONEDNN_LINEAR")
    # Gradients that are zero but for rounding (Strip-MLP's biases before a BatchNorm) differ in their noise
    noise = 1e-6 * max(float(want.norm()) for want in expected)
    for tensor, want in zip(got, expected):
        assert relative_l2(tensor, want) <= 1e-5 or max(float(tensor.norm()), float(want.norm())) <= noise


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
        results.append([out, *torch.autograd.grad(out, (x_, weight_), grad)])
        results[-1].append(type(out.grad_fn).__name__)
    (out, grad_x, grad_w, kind), (out_ref, grad_x_ref, grad_w_ref, _) = results
    assert kind == "_DepthwiseConvColumnSlicedGradBackward"
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_x, grad_x_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_w, grad_w_ref, rtol=1e-12, atol=1e-12)


def test_depthwise_conv2d_keeps_conv2d_where_its_weight_gradient_is_fast_or_not_wanted():
    x, weight = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 7, 7, requires_grad=True)
    sliced = "_DepthwiseConvColumnSlicedGradBackward"
    assert type(depthwise_conv2d(x, weight).grad_fn).__name__ == sliced
    assert type(depthwise_conv2d(x, weight, torch.zeros(4)).grad_fn).__name__ != sliced  # a bias: conv2d
    assert type(depthwise_conv2d(x, torch.randn(4, 1, 7, 3, requires_grad=True)).grad_fn).__name__ != sliced
    assert type(depthwise_conv2d(x[..., :6], weight).grad_fn).__name__ != sliced  # narrower than the kernel
    assert type(depthwise_conv2d(x.requires_grad_(), weight.detach()).grad_fn).__name__ != sliced
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(depthwise_conv2d(x, weight).grad_fn).__name__ != sliced
    with torch.no_grad():
        assert depthwise_conv2d(x, weight).grad_fn is None


@pytest.mark.parametrize("name", ["ms_mlp_tiny", "strip_mlp_tiny_light"])
def test_training_with_column_sliced_depthwise_gradients_matches_conv2d_gradients(name, monkeypatch):
    # MS-MLP's 5x5 and 7x7 kernels, Strip-MLP's 7x7 and 3x7 take the sliced weight gradient
    got, expected = _fast_and_plain_training(
        name, monkeypatch, "_FAST_WEIGHT_GRAD_WIDTH", 10**6, "_depthwise_conv2d_column_sliced_grad")
    for tensor, want in zip(got, expected):
        assert relative_l2(tensor, want) <= 1e-5


class _LinearBranchBlock(nn.Module):
    """A residual block whose branch is one linear layer, recording the batch sizes it runs on."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.drop_path = DropPath(drop_prob)
        self.branch_batches: list[int] = []

    def residual_branch(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        self.branch_batches.append(x.shape[0])
        return self.linear(x) * scale


@pytest.mark.parametrize("drop_prob", [0.0, 0.5, 1.0])
def test_drop_path_residual_equals_timm_drop_path_and_skips_dropped_samples(drop_prob):
    block = _LinearBranchBlock(drop_prob).train()
    x = torch.randn(64, 3, 4)
    torch.manual_seed(3)
    expected = x + block.drop_path(block.linear(x))
    kept = int((expected != x).any(-1).any(-1).sum())
    torch.manual_seed(3)
    got = drop_path_residual(block, x)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert block.branch_batches == [kept]
    assert {0.0: kept == 64, 0.5: 0 < kept < 64, 1.0: kept == 0}[drop_prob]
    # every sample dropped: zero gradients, as under DropPath, not none (which optimizers skip)
    got.sum().backward()
    assert all(p.grad is not None for p in block.linear.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 branch added to an fp32 residual
        torch.manual_seed(3)
        expected = x + block.drop_path(block.linear(x))
        torch.manual_seed(3)
        got = drop_path_residual(block, x)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("hidden_limit", [None, 2**18])
def test_ms_mlp_training_with_drop_path_skips_dropped_samples_and_matches_plain_path(hidden_limit, monkeypatch):
    # Drop path 0.5 over batch 2 under one seed: blocks that keep both samples, one, or none (an empty batch).
    # With a 256 KiB limit on the channel MLP's hidden activations in training, stage 1 runs it in slices.
    if hidden_limit is not None:
        monkeypatch.setattr(ms_mlp, "_CPU_TRAIN_HIDDEN_BYTES", hidden_limit)
    x = _inputs("ms_mlp_tiny")
    fast = _model("ms_mlp_tiny", drop_path_rate=0.5).train()
    with set_scriptable(True):
        plain = _model("ms_mlp_tiny", drop_path_rate=0.5).train()
    plain.load_state_dict(fast.state_dict())
    branch_batches = []
    branch = MixShiftBlock.residual_branch
    monkeypatch.setattr(MixShiftBlock, "residual_branch",
                        lambda self, x, scale: branch_batches.append(x.shape[0]) or branch(self, x, scale))
    outputs = [_logits_and_gradients(fast, x, seed=7), _logits_and_gradients(plain, x, seed=7)]
    assert {0, 1, 2} <= set(branch_batches)
    for got, expected in zip(*outputs):
        assert relative_l2(got, expected) <= 1e-5


@pytest.mark.parametrize("multiplier, kernel, stride, bias", [(2, 2, 2, False), (3, 3, 1, True)])
def test_expanding_depthwise_conv2d_equals_the_grouped_conv(multiplier, kernel, stride, bias):
    torch.manual_seed(0)
    grouped = nn.Conv2d(6, 6 * multiplier, kernel, stride=stride, padding=kernel // 2, groups=6, bias=bias)
    expanding = ExpandingDepthwiseConv2d(6, 6 * multiplier, kernel, stride=stride, padding=kernel // 2, groups=6,
                                         bias=bias)
    expanding.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    got, expected = expanding(x), grouped(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert relative_l2(got, expected) <= 1e-6
    got_grads = torch.autograd.grad(got.square().sum(), [x, *expanding.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *grouped.parameters()])
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        assert relative_l2(got_grad, expected_grad) <= 1e-6


@pytest.mark.parametrize("trailing, bias", [((), True), ((1, 1), True), ((), False)])
def test_branch_softmax_equals_the_softmax_of_channel_major_logits(trailing, bias):
    # a linear layer's weight, or a 1x1 conv's as in Strip-MLP's re-weighting MLP
    torch.manual_seed(0)
    channels, branches, hidden_width = 5, 3, 4
    weight = torch.randn(channels * branches, hidden_width, *trailing, dtype=torch.float64)
    bias_values = torch.randn(channels * branches, dtype=torch.float64) if bias else None
    hidden = torch.randn(2, hidden_width, dtype=torch.float64)
    channel_major = F.linear(hidden, weight.flatten(1), bias_values).view(2, channels, branches)
    got = branch_softmax(hidden, weight, bias_values, channels, branches)
    assert got.shape == (branches, 2, channels)
    torch.testing.assert_close(got, channel_major.softmax(dim=-1).permute(2, 0, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vip_s7", "raft_mlp_s"])
def test_training_with_drop_path_matches_drop_path_applied_to_every_sample(name, monkeypatch):
    x = _inputs(name)
    fast = _model(name, drop_path_rate=0.5).train()
    reference = _model(name, drop_path_rate=0.5).train()
    module = {"vip_s7": visionmlp.models.vip, "raft_mlp_s": visionmlp.models.raft_mlp}[name]
    got_outputs = _logits_and_gradients(fast, x, seed=7)
    # the reference: the plain sum, timm's DropPath multiplying the branch of every sample
    monkeypatch.setattr(module, "drop_path_residual",
                        lambda block, x, branch: x + block.drop_path(getattr(block, branch)(x, 1.)))
    for got, expected in zip(got_outputs, _logits_and_gradients(reference, x, seed=7)):
        assert relative_l2(got, expected) <= 1e-5


@pytest.mark.parametrize("name", ["vip_s7", "raft_mlp_s"])
def test_inference_over_batch_slices_matches_one_call(name, monkeypatch):
    model, x = _model(name), torch.cat([_inputs(name)] * 2)
    batches = []
    for stage in model.stages:
        stage.blocks[0].register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    with torch.no_grad():  # at these sizes a batch of 4 fits the default slice in one call
        expected = model(x)
    assert batches == [4] * len(model.stages)
    batches.clear()
    monkeypatch.setattr(layers, "_CPU_INFERENCE_SLICE_BYTES", 1)  # one sample per slice
    with torch.inference_mode():
        got = model(x)
    assert batches == [1] * 4 * len(model.stages)
    assert relative_l2(got, expected) <= 1e-5
    batches.clear()
    model(x)  # recording gradients: one call, whatever the size
    assert batches == [4] * len(model.stages)
    with torch.no_grad():  # traced graphs keep one call, so they run at other batch sizes too
        traced = torch.jit.trace(model, x, check_trace=False)
        assert relative_l2(traced(x[:3]), expected[:3]) <= 1e-5
        tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
        graph_module = create_feature_extractor(model, return_nodes=["head"], tracer_kwargs=tracer_kwargs)
        assert relative_l2(graph_module(x[:3])["head"], expected[:3]) <= 1e-5


def test_compiled_model_matches_eager():
    model, x = _model("raft_mlp_s"), _inputs("raft_mlp_s")
    with torch.no_grad():
        assert relative_l2(torch.compile(model)(x), model(x)) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_model_compiled_for_inference_matches_eager(name):
    """As the benchmark compiles: weights frozen into the graph and packed, compiled afresh where compilations of
    the same functions before used up dynamo's recompilation limit."""
    model, x = _model(name), _inputs(name)
    with torch.no_grad():
        expected = model(x)
        with torch._dynamo.config.patch(recompile_limit=1):
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            output, (code,) = run_and_get_code(compiled(model, "infer"), x)
            assert relative_l2(output, expected) <= 1e-5
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    # frozen weights, packed for oneDNN (convolutions and most linears) or MKL (fp32 linears)
    assert "_frozen_param" in code and ("torch.ops.mkl._mkl_linear" in code or "torch.ops.mkldnn." in code)


def test_strip_mlp_runs_channels_last_in_training_and_inference_with_one_result():
    model, x = _model("strip_mlp_tiny_light"), _inputs("strip_mlp_tiny_light")
    maps = []
    for module in (model.stem, model.stages[0].blocks[0].token_mixing.strip):
        module.register_forward_hook(lambda module, args, output: maps.append(output))
    with torch.no_grad():
        expected = model(x)
    logits = model(x)  # gradients enabled
    assert len(maps) == 4
    assert all(m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous() for m in maps)
    assert relative_l2(logits.detach(), expected) <= 1e-5


def test_strip_mlp_channel_mlp_in_sample_groups_matches_the_whole_batch(monkeypatch):
    model, x = _model("strip_mlp_tiny_light"), _inputs("strip_mlp_tiny_light")
    with set_scriptable(True):
        whole_batch = _model("strip_mlp_tiny_light")
    calls = []
    plain_mlp = strip_mlp.ChannelMixing.mlp
    monkeypatch.setattr(strip_mlp.ChannelMixing, "mlp", lambda self, x: calls.append(len(x)) or plain_mlp(self, x))
    with torch.no_grad():
        expected = whole_batch(x)
        assert calls == [2] * 12  # at 64 px the default budget holds the whole batch in every block
        calls.clear()
        # a budget of one first-stage sample's hidden activations: samples one at a time there, pairs later
        monkeypatch.setattr(strip_mlp, "_CPU_INFER_HIDDEN_BYTES", 16 * 16 * 240 * 4)
        grouped = model(x)
        assert calls == [1, 1] * 2 + [2] * 10
        calls.clear()
    assert relative_l2(grouped, expected) <= 1e-5
    model(x)  # gradients enabled: the whole batch at once
    assert calls == [2] * 12
    with torch.no_grad():  # a traced graph keeps the whole batch, so that it runs any batch size
        traced = torch.jit.trace(model, x, check_trace=False)
        x3 = torch.randn(3, *x.shape[1:])
        assert relative_l2(traced(x3), model(x3)) <= 1e-5


def test_raft_mlp_mixes_tokens_raft_major_in_bf16_on_cpu(monkeypatch):
    model, x = _model("raft_mlp_s"), _inputs("raft_mlp_s")
    branches = []
    raft_major_branch = raft_mlp.RaftBlock.raft_major_branch

    def recorded(block, x, along, scale=1.):
        branches.append(along)
        return raft_major_branch(block, x, along, scale)

    monkeypatch.setattr(raft_mlp.RaftBlock, "raft_major_branch", recorded)
    with torch.no_grad():
        expected = model(x)
        assert branches == []  # fp32 keeps the token-last form
        got = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert branches == [1, 2] * sum(len(stage.blocks) for stage in model.stages)
    assert relative_l2(got.float(), expected) <= 2e-2
    with torch.no_grad():  # compiled as the benchmark compiles its bf16 fast path
        assert relative_l2(compiled(model, "infer")(x.to(torch.bfloat16)).float(), expected) <= 2e-2


def test_raft_mlp_embeds_the_image_channels_last_into_contiguous_tokens():
    model, x = _model("raft_mlp_s"), _inputs("raft_mlp_s")
    tokens = []
    model.stages[0].embed.register_forward_hook(lambda module, args, output: tokens.append(output))
    with torch.no_grad():
        model(x)
    assert tokens[0].is_contiguous()


@pytest.mark.parametrize("name", ["vip_s7", "strip_mlp_tiny_light", "raft_mlp_s"])
def test_training_graph_keeps_the_image_itself_not_a_channels_last_copy(name):
    # The embedding's conv runs with a channels-last kernel, so its output is channels-last without a copy
    # of the image, which the recorded graph would keep for the kernel's gradient
    model, x = _model(name).train(), _inputs(name)
    paths = {"vip_s7": "patch_embed", "strip_mlp_tiny_light": "stem", "raft_mlp_s": "stages.0.embed"}
    embed = model.get_submodule(paths[name])
    image_sized = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.shape == x.shape:
            image_sized.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        embedded = embed(x)
    nchw = embedded if name == "strip_mlp_tiny_light" else embedded.permute(0, 3, 1, 2)  # the others give NHWC
    assert nchw.is_contiguous(memory_format=torch.channels_last)
    assert image_sized and all(t.data_ptr() == x.data_ptr() for t in image_sized)
