"""MS-MLP specifics: the mixing-and-shifting maths, input sizes, checkpoints, no per-call state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionmlp
from visionmlp.kernels import ms_mlp as ms_kernels
from visionmlp.kernels.tuning import MS_MLP_TRAIN_HIDDEN_BYTES
from visionmlp.models.ms_mlp import MixShiftBlock, MsMlp, checkpoint_filter_fn

from synthetic_weights import load_reference, relative_l2, synthetic_state_dict

# every test here runs with the fast kernels and with the reference maths
pytestmark = pytest.mark.usefixtures("both_forms")

OFFICIAL_MIX_SIZES = [(1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7)]


def _small_model(**kwargs) -> MsMlp:
    """A narrow, shallow MS-MLP with the official mix sizes, for fast checks."""
    torch.manual_seed(0)
    return MsMlp(**{"embed_dim": 20, "depths": (1, 1, 2, 1), "num_classes": 5, **kwargs}).double().eval()


def _randomize(module: nn.Module) -> nn.Module:
    """Replace every parameter by noise so that biases and layer scales matter in comparisons."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def _naive_block(block: MixShiftBlock, x: torch.Tensor) -> torch.Tensor:
    """The block as the paper states it: per group, torch.roll then its own zero-padded depth-wise conv."""
    groups = x.split(list(block.group_sizes), dim=1)
    branches = []
    for convs, dim in ((block.dwconv_lr, 3), (block.dwconv_td, 2)):
        branches.append(torch.cat([
            conv(torch.roll(g, shift, dim)) for g, conv, shift in zip(groups, convs, block.shift_dists)], dim=1))
    mixed = (branches[0] + branches[1]).permute(0, 2, 3, 1)
    hidden = F.gelu(F.linear(F.layer_norm(mixed, mixed.shape[-1:], block.norm.weight, block.norm.bias, 1e-6),
                             block.mlp.fc1.weight, block.mlp.fc1.bias))
    out = F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias) * block.gamma
    return x + out.permute(0, 3, 1, 2)


FORMS = pytest.mark.parametrize("fast_kernels", [False, True], ids=["reference", "fast"])


@FORMS
@pytest.mark.parametrize("mix_sizes", OFFICIAL_MIX_SIZES + [(3, 1, 5, 1, 3)])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 4), (7, 7), (24, 30)])
def test_block_matches_per_group_roll_and_conv(mix_sizes, size, fast_kernels):
    # 23 channels split 5-5-5-5-3 (torch.chunk); maps smaller than the shift distance wrap around; 2 x 24 x 30
    # tokens are more than one slice of the fast channel MLP at inference
    block = _randomize(MixShiftBlock(23, mix_sizes=mix_sizes, fast_kernels=fast_kernels)).double().eval()
    x = torch.randn(2, 23, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _naive_block(block, x), rtol=1e-12, atol=1e-12)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(block(channels_last), _naive_block(block, x), rtol=1e-12, atol=1e-12)


@FORMS
@pytest.mark.parametrize("size", [(2, 3), (7, 6), (7, 7)])
def test_block_gradients_match_per_group_roll_and_conv(size, fast_kernels):
    # The fast group roll has its own backward (the opposite roll); every input and weight gradient must agree.
    # At 7 x 7 the batch has 98 tokens, more than fc2's 92 inputs, so the fast form folds the layer scale into fc2.
    # Its depth-wise biases of the 3x3 to 7x7 kernels are added after the branches' sum in training.
    block = _randomize(MixShiftBlock(23, mix_sizes=(1, 3, 3, 5, 7), fast_kernels=fast_kernels)).double().train()
    x = torch.randn(2, 23, *size, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 23, *size, dtype=torch.float64)
    ours = torch.autograd.grad((block(x) * upstream).sum(), [x, *block.parameters()])
    naive = torch.autograd.grad((_naive_block(block, x) * upstream).sum(), [x, *block.parameters()])
    for got, expected in zip(ours, naive):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fast_block_trains_in_token_slices_at_full_width_with_the_reference_gradients():
    # MS-MLP-T's first-stage width at 64 x 64 and batch 3: a 19 MB hidden activation, two slices in CPU training
    torch.manual_seed(0)
    reference = MixShiftBlock(96, fast_kernels=False).train()
    fast = MixShiftBlock(96, fast_kernels=True).train()
    fast.load_state_dict(_randomize(reference).state_dict())
    x = torch.randn(3, 96, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert ms_kernels._tokens_per_slice(fast, x.permute(0, 2, 3, 1)) < 3 * 64 * 64
    got = torch.autograd.grad(fast(x).square().sum(), [x, *fast.parameters()])
    expected = torch.autograd.grad(reference(x).square().sum(), [x, *reference.parameters()])
    for g, e in zip(got, expected):
        assert relative_l2(g, e) <= 1e-5


def _saved_bytes(fn, x: torch.Tensor, params: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``fn(x)``, parameters excluded."""
    param_ptrs = {p.data_ptr() for p in params}
    saved = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in param_ptrs:
            saved[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn(x)
    return sum(saved.values())


def test_fast_channel_mlp_keeps_the_scaled_fc2_instead_of_its_output():
    # 512 tokens of 10 channels: fc2's output (512 x 10) is larger than its weight (10 x 40)
    torch.manual_seed(0)
    block = MixShiftBlock(10, mix_sizes=(1, 3, 3, 5, 7)).train()
    tokens = torch.randn(2, 16, 16, 10, requires_grad=True)
    params = list(block.parameters())
    fc2_output, fc2_weight = 2 * 16 * 16 * 10 * 4, 10 * 40 * 4
    reference = _saved_bytes(lambda t: block.gamma * block.mlp(block.norm(t)), tokens, params)
    fast = _saved_bytes(lambda t: ms_kernels._channel_mlp(block, t), tokens, params)
    assert reference - fast == fc2_output - fc2_weight


def test_channel_mlp_slices_keep_cpu_training_activations_under_the_limit():
    block = MixShiftBlock(96)  # fc1: 384 outputs
    x = torch.empty(8, 56, 56, 96)  # MS-MLP-T's first stage at batch 8: a 38.5 MB hidden activation in fp32
    size = ms_kernels._tokens_per_slice(block, x)
    assert size == 8363 and size * 384 * 4 <= MS_MLP_TRAIN_HIDDEN_BYTES  # three slices
    with torch.no_grad():  # at inference, cache-sized slices, of the same bytes in bf16
        assert ms_kernels._tokens_per_slice(block, x) == 1024
        assert ms_kernels._tokens_per_slice(block, x.bfloat16()) == 2048
    assert ms_kernels._tokens_per_slice(block, x.to("meta")) == 8 * 56 * 56  # off the CPU: one call
    assert ms_kernels._tokens_per_slice(block, x[:0]) == 0  # every sample dropped


def test_channel_split_follows_torch_chunk_and_rejects_impossible_widths():
    assert MixShiftBlock(96).group_sizes == [20, 20, 20, 20, 16]
    assert MixShiftBlock(192).group_sizes == [c.shape[0] for c in torch.zeros(192).chunk(5)]
    with pytest.raises(ValueError, match="torch.chunk"):
        MixShiftBlock(6)  # torch.chunk(6 channels, 5) gives only 3 chunks
    with pytest.raises(ValueError, match="odd"):
        MixShiftBlock(20, mix_sizes=(1, 2, 3, 5, 7))
    with pytest.raises(ValueError, match="one mix size per shift"):
        MixShiftBlock(20, mix_sizes=(1, 3, 5))


def test_any_multiple_of_32_works_and_other_sizes_raise():
    model = _small_model()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 96, dtype=torch.float64)).shape == (1, 5)
        final, maps = model.forward_intermediates(torch.randn(1, 3, 64, 32, dtype=torch.float64))
    assert [m.shape[-2:] for m in maps] == [(16, 8), (8, 4), (4, 2), (2, 1)]
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="img_size"):
        visionmlp.create_model("ms_mlp_tiny", img_size=100)
    assert visionmlp.create_model("ms_mlp_tiny", img_size=(64, 96), num_classes=0) is not None


def test_forward_leaves_no_state_on_modules():
    model = _small_model()

    def attributes():
        return {name: {k: v for k, v in vars(m).items() if not k.startswith("_")} for name, m in model.named_modules()}

    before = attributes()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
        model(torch.randn(2, 3, 32, 96, dtype=torch.float64))
    assert attributes() == before


def test_drop_path_rates_follow_the_official_linear_rule():
    with torch.device("meta"):
        model = visionmlp.create_model("ms_mlp_small")
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert len(rates) == 36
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.4, 36), rtol=0, atol=1e-7)


def _official_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under the official names (the inverse of checkpoint_filter_fn)."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "stages" and parts[2] == "downsample":
            key = ".".join(["layers", str(int(parts[1]) - 1), "downsample", *parts[3:]])
        elif parts[0] == "stages":
            key = ".".join(["layers", *parts[1:]]).replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        elif key.startswith("head.norm."):
            key = key[len("head."):]
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        out[key] = value
    return out


def test_official_checkpoint_under_model_with_module_prefix_loads(tmp_path):
    layout, _, _ = load_reference("ms_mlp_tiny")
    official = synthetic_state_dict(layout)
    assert "layers.0.downsample.proj.weight" in official and "layers.0.blocks.0.pwconv1.weight" in official
    path = tmp_path / "ckpt_epoch299.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}, "epoch": 299}, path)
    model = visionmlp.create_model("ms_mlp_tiny", checkpoint_path=path)
    converted = visionmlp.convert_official_state_dict("ms_mlp_tiny", official)
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted[key]), key
    assert torch.equal(converted["stages.1.downsample.norm.weight"], official["layers.0.downsample.norm.weight"])
    torch.testing.assert_close(converted["head.fc.weight"], official["head.weight"])
    assert _official_keys(converted).keys() == official.keys()


def test_converter_passes_our_state_dict_through():
    model = _small_model()
    ours = model.state_dict()
    assert checkpoint_filter_fn(ours, model).keys() == ours.keys()
    assert checkpoint_filter_fn(_official_keys(ours), model).keys() == ours.keys()


def test_pruned_feature_model_keeps_only_needed_stages():
    model = _small_model()
    kept = model.prune_intermediate_layers(indices=(0, 1))
    assert kept == [0, 1] and len(model.stages) == 2 and model.num_features == 40
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 64, 64, dtype=torch.float64), intermediates_only=True)
    assert [m.shape[1] for m in maps] == [20, 40]


def test_fx_traced_model_matches_eager_output():
    # timm's FX feature extraction: the size check, the group rolls and the CPU-sliced channel MLP are leaves
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = _randomize(_small_model())
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    # 5 x 16 x 16 stage-1 tokens: more than one CPU slice of the channel MLP; then another size and batch
    for x in (torch.randn(5, 3, 64, 64, dtype=torch.float64), torch.randn(2, 3, 32, 96, dtype=torch.float64)):
        with torch.no_grad():
            (traced,) = fx_model(x).values()
            torch.testing.assert_close(traced, model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of 32"):
        fx_model(torch.randn(1, 3, 48, 64, dtype=torch.float64))
