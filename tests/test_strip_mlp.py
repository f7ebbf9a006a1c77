"""Strip-MLP specific behaviour: grid-bound sizes, the drop-path fix, official checkpoints, fused maths."""

from __future__ import annotations

import pytest
import timm
import torch
from synthetic_weights import (
    REFERENCE_DIR,
    load_reference,
    relative_l2,
    synthetic_state_dict,
)
from timm.layers import DropPath

import visionmlp
from visionmlp.kernels import spatial_l2_norm
from visionmlp.models.strip_mlp import ChannelMixing, StripMLPBlock, StripMLPNet

# every test here runs with the fast kernels and with the reference maths
pytestmark = pytest.mark.usefixtures("both_forms")

SMALL = 64  # smallest size with a 2x2 last-stage grid; keeps these tests fast


def _small_model(name: str = "strip_mlp_tiny_light", **kwargs) -> torch.nn.Module:
    return timm.create_model(name, img_size=SMALL, **kwargs)


def _tiny_net(**kwargs) -> StripMLPNet:
    """A narrow, one-block-per-stage net on a 32 px input (last grid 1x1) for tests that run it a lot."""
    return StripMLPNet(img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_classes=5, **kwargs)


@pytest.mark.parametrize("img_size", [100, 48, (64, 96), 0])
def test_impossible_img_size_names_valid_sizes(img_size):
    with pytest.raises(ValueError, match="square and a positive multiple of 32"):
        timm.create_model("strip_mlp_tiny_light", img_size=img_size)


def test_input_of_another_size_is_rejected():
    model = _small_model().eval()
    with pytest.raises(ValueError, match="built for img_size"):
        model(torch.randn(1, 3, 96, 96))


def test_builds_for_requested_size():
    model = _small_model(num_classes=7).eval()
    strip = model.stages[0].blocks[0].token_mixing.strip
    assert strip.proj_h.weight.shape == (strip.groups * SMALL // 4, SMALL // 4, 1, 3)
    assert strip.pos_h.shape == (2 * SMALL // 4 + 1, 40)
    assert model(torch.randn(2, 3, SMALL, SMALL)).shape == (2, 7)


def _drop_path_rates(model: torch.nn.Module) -> set[float]:
    return {
        block.drop_path.drop_prob if isinstance(block.drop_path, DropPath) else 0.0
        for block in model.modules() if isinstance(block, StripMLPBlock)
    }


def test_default_drop_path_matches_official_constant_rate():
    # The official BasicBlock uses DropPath(0.1) in every block whatever the config says.
    assert _drop_path_rates(_small_model()) == {0.1}


@pytest.mark.parametrize("rate", [0.0, 0.25])
def test_drop_path_rate_is_honoured(rate):
    assert _drop_path_rates(_small_model(drop_path_rate=rate)) == {rate}


def test_channel_patches_follow_official_width_rule():
    for name, expected in (("strip_mlp_tiny", 2), ("strip_mlp_small", 4)):
        model = _small_model(name)
        assert {b.token_mixing.strip.channel_patches for b in model.modules() if isinstance(b, StripMLPBlock)} == {
            expected}
    model = StripMLPNet(img_size=SMALL, embed_dim=40, depths=(1, 1, 1, 1))
    assert [s.blocks[0].token_mixing.strip.channel_patches for s in model.stages] == [4, 2, 2, 2]


@pytest.mark.skipif(not (REFERENCE_DIR / "strip_mlp_tiny_light_64.safetensors").exists(), reason="no reference")
def test_wrapped_official_checkpoint_loads_and_reproduces_reference(tmp_path):
    layout, logits, _ = load_reference("strip_mlp_tiny_light_64")
    official = synthetic_state_dict(layout)
    assert "patch_embed.weight" in official and "blocks1.0.channel_mixing.grn.gamma" in official
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}, "epoch": 3}, path)
    model = visionmlp.create_model("strip_mlp_tiny_light", checkpoint_path=path, img_size=SMALL).double().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(1234),
                                dtype=torch.float64))
    assert relative_l2(out, logits) < 1e-5  # weights pass through float32 on the way in


def test_our_state_dict_passes_filter_unchanged():
    model = _small_model()
    state_dict = model.state_dict()
    filtered = visionmlp.models.strip_mlp.checkpoint_filter_fn(dict(state_dict), model)
    assert filtered.keys() == state_dict.keys()


@pytest.mark.parametrize("grid_size", [8, 2])  # 64 tokens > 16 channels: GRN scales fc2's weight; 4 < 16: the input
def test_fast_channel_mixing_folds_grn_into_fc2_with_the_same_gradients(grid_size):
    torch.manual_seed(0)
    reference = ChannelMixing(16, 3, fast_kernels=False).double().train()
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fast = ChannelMixing(16, 3, fast_kernels=True).double().train()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 16, grid_size, grid_size, dtype=torch.float64, requires_grad=True)
    ours, ref = fast(x), reference(x)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours.square().sum(), [fast.grn.weight, x])
    g_ref = torch.autograd.grad(ref.square().sum(), [reference.grn.weight, x])
    torch.testing.assert_close(g_ours, g_ref)


def test_spatial_l2_norm_gradient_equals_tensor_norms():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x[1, :, :, 2] = 0  # a zero norm: its gradient is zero, as Tensor.norm's is
    x.requires_grad_(True)
    probe = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(spatial_l2_norm, (probe,))
    torch.autograd.gradgradcheck(spatial_l2_norm, (probe,))
    grad = torch.randn(2, 5, dtype=torch.float64)
    ours, ref = spatial_l2_norm(x), x.norm(p=2, dim=(1, 2))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, grad), torch.autograd.grad(ref, x, grad))
    assert spatial_l2_norm(x).grad_fn is not None and spatial_l2_norm(x.detach()).grad_fn is None


def test_spatial_l2_norm_of_a_bf16_map_is_the_norm_rounded_to_bf16():
    x = torch.randn(2, 56, 56, 8, dtype=torch.float64) * 10
    norm = spatial_l2_norm(x.to(torch.bfloat16))
    assert norm.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: its rounding alone is up to 2 ** -9 relative
    torch.testing.assert_close(norm.double(), x.norm(p=2, dim=(1, 2)), rtol=2 ** -7, atol=0)


def test_spatial_l2_norm_of_a_half_map_does_not_overflow():
    x = torch.full((1, 56, 56, 2), 10.0, dtype=torch.float16)  # squares sum to 313,600, past fp16's 65,504
    for requires_grad in (False, True):
        norm = spatial_l2_norm(x.clone().requires_grad_(requires_grad))
        assert norm.dtype == torch.float16 and torch.equal(norm, torch.full((1, 2), 560.0, dtype=torch.float16))


def test_forward_stores_no_state():
    model = _tiny_net().eval()

    def snapshot():
        return {name: (sorted(vars(m)), {k: v.clone() for k, v in m._buffers.items() if v is not None})
                for name, m in model.named_modules()}

    before = snapshot()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(2, 3, 32, 32))
    after = snapshot()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name][0] == after[name][0], name
        for key, value in before[name][1].items():
            assert torch.equal(value, after[name][1][key]), f"{name}.{key}"


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = _tiny_net(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("global_pool", ["avg", ""])
def test_fx_traced_model_matches_eager(global_pool):
    """The model traces with torchvision's feature extractor (timm's notrace lists) and gives the eager output."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    model = _tiny_net(global_pool=global_pool).eval()
    tracer_kwargs = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        (traced,) = fx_model(x).values()
    torch.testing.assert_close(traced, expected, rtol=0, atol=0)
    # The eager size check still guards the traced model.
    with pytest.raises(ValueError, match="built for img_size"):
        fx_model(torch.randn(1, 3, 64, 64))
