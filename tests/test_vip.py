"""Vision Permutator specifics: size-dependent building, the Permute-MLP maths, checkpoints, the head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import visionmlp
from visionmlp.models.vip import PermuteMlp, checkpoint_filter_fn

from synthetic_weights import REFERENCE_DIR, load_reference, synthetic_state_dict

# every test here runs with the fast kernels and with the reference maths
pytestmark = pytest.mark.usefixtures("both_forms")

SMALL = 56  # 8 x 8 tokens after the patch embedding, 4 x 4 after the transition


def _model(**kwargs) -> nn.Module:
    """A narrow, shallow vip_s7 (same stage structure) for fast checks."""
    torch.manual_seed(0)
    kwargs = {"img_size": SMALL, "depths": (1, 1, 2, 1), "embed_dims": (64, 128, 128, 128), **kwargs}
    return visionmlp.create_model("vip_s7", **kwargs).double().eval()


def _einsum_permute_mlp(module: PermuteMlp, x: torch.Tensor) -> torch.Tensor:
    """The Permute-MLP written index by index: x is (B, H, W, G segments, S channels per segment)."""
    B, H, W, C = x.shape
    G = module.num_segments
    S = C // G
    x = x.reshape(B, H, W, G, S)
    # mlp_h mixes (height, channel-in-segment) pairs, laid out height-major; mlp_w likewise for width
    h = torch.einsum("pqhs,bhwgs->bpwgq", module.mlp_h.weight.reshape(H, S, H, S), x)
    h = h + module.mlp_h.bias.reshape(H, 1, 1, S)
    w = torch.einsum("vtws,bhwgs->bhvgt", module.mlp_w.weight.reshape(W, S, W, S), x)
    w = w + module.mlp_w.bias.reshape(1, W, 1, S)
    c = module.mlp_c(x.reshape(B, H, W, C)).reshape(B, H, W, G, S)
    pooled = (h + w + c).mean((1, 2)).reshape(B, C)
    branch_weights = module.reweight(pooled).reshape(B, G, S, 3).softmax(-1)  # per channel, over branches
    a_h, a_w, a_c = (branch_weights[..., k][:, None, None] for k in range(3))
    return module.proj((a_h * h + a_w * w + a_c * c).reshape(B, H, W, C))


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_permute_mlp_matches_index_formulation(grid):
    torch.manual_seed(0)
    module = PermuteMlp(48, grid, num_segments=8, qkv_bias=True).double()
    for p in module.parameters():
        nn.init.normal_(p, std=0.2)  # non-zero biases and strong reweighting
    x = torch.randn(2, *grid, 48, dtype=torch.float64)
    torch.testing.assert_close(module(x), _einsum_permute_mlp(module, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("img_size", [100, 63, (224, 100), 0])
def test_impossible_img_size_raises(img_size):
    with pytest.raises(ValueError, match="multiple of 14"):
        visionmlp.create_model("vip_s7", img_size=img_size)


def test_img_size_sets_mixing_widths():
    model = _model(img_size=(56, 84), num_classes=3)
    mixer = model.stages[0].blocks[0].attn  # grid 8 x 12, 64 channels in 32 segments of 2
    assert mixer.mlp_h.weight.shape == (8 * 2, 8 * 2)
    assert mixer.mlp_w.weight.shape == (12 * 2, 12 * 2)
    later = model.stages[1].blocks[0].attn  # grid 4 x 6 after the transition, 128 channels in 16 segments of 8
    assert later.mlp_h.weight.shape == (4 * 8, 4 * 8)
    assert later.mlp_w.weight.shape == (6 * 8, 6 * 8)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 56, 84, dtype=torch.float64)).shape == (1, 3)


def test_default_size_mixes_whole_channel_width():
    with torch.device("meta"):
        model = visionmlp.create_model("vip_m7")
    for stage in model.stages:
        attn = stage.blocks[0].attn
        dim = attn.mlp_c.weight.shape[0]
        assert attn.mlp_h.weight.shape == attn.mlp_w.weight.shape == (dim, dim)


def test_reset_classifier_works():
    model = _model(num_classes=10)
    x = torch.randn(2, 3, SMALL, SMALL, dtype=torch.float64)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model.num_classes == 5
    assert model.get_classifier().weight.dtype == torch.float64  # built like the rest of the model
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, global_pool="")
        assert model(x).shape == (2, 4, 4, model.num_features)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_feature_strides_follow_transitions():
    with torch.device("meta"):
        small = visionmlp.create_model("vip_s7")
        medium = visionmlp.create_model("vip_m7")
    assert [f["reduction"] for f in small.feature_info] == [7, 14, 14, 14]
    assert [f["reduction"] for f in medium.feature_info] == [7, 7, 14, 14]
    assert [f["num_chs"] for f in medium.feature_info] == [256, 256, 512, 512]


def test_drop_path_schedule():
    model = _model(drop_path_rate=0.1)
    blocks = [b for stage in model.stages for b in stage.blocks]
    assert isinstance(blocks[0].drop_path, nn.Identity)
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert blocks[2].drop_path.drop_prob == pytest.approx(0.1 * 2 / 4)


@pytest.mark.slow
def test_official_keys_under_model_with_module_prefix_load(tmp_path):
    if not (REFERENCE_DIR / "vip_m7.safetensors").is_file():
        pytest.skip("reference data for vip_m7 not present")
    layout, _, _ = load_reference("vip_m7")
    official = {k: v.float() for k, v in synthetic_state_dict(layout).items()}
    # official vip_m7 lists stage 0, stage 1, the stride-2 transition, stage 2, stage 3
    assert official["network.2.proj.weight"].shape == (512, 256, 2, 2)
    path = tmp_path / "vip_m7.pth"
    torch.save({"model": {"module." + k: v for k, v in official.items()}, "epoch": 3}, path)
    model = visionmlp.create_model("vip_m7", checkpoint_path=path)
    own = model.state_dict()
    torch.testing.assert_close(own["stages.2.downsample.weight"], official["network.2.proj.weight"])
    torch.testing.assert_close(own["stages.2.blocks.0.attn.mlp_h.weight"], official["network.3.0.attn.mlp_h.weight"])
    torch.testing.assert_close(own["stages.1.blocks.2.mlp.fc2.bias"], official["network.1.2.mlp.fc2.bias"])


def test_filter_passes_own_state_dict_through():
    model = _model()
    state_dict = model.state_dict()
    assert checkpoint_filter_fn(state_dict, model).keys() == state_dict.keys()


def test_forward_keeps_no_state_on_modules():
    model = _model()
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    with torch.no_grad():
        model(torch.randn(1, 3, SMALL, SMALL, dtype=torch.float64))
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name


def test_grad_checkpointing_gives_same_gradients():
    model = _model().train()
    x = torch.randn(2, 3, SMALL, SMALL, dtype=torch.float64)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    calls = []
    model.stages[0].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model(x).sum().backward()
    assert len(calls) == 2  # recomputed in the backward pass
    for expected, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, expected)


def test_fx_traced_model_matches_eager():
    """torch.fx tracing (as timm's FX tests do) keeps every op; in-place ops on unused results would be dropped."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = _model(num_classes=5)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    traced = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs).eval()
    x = torch.randn(2, 3, SMALL, SMALL, dtype=torch.float64)
    with torch.no_grad():
        (out,) = traced(x).values()
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
