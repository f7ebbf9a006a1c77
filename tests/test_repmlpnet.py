"""RepMLPNet specifics: the partition FC maths, locality injection, deploy checkpoints, size handling."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import visionmlp
from visionmlp.models.repmlpnet import RepMLPBlock, checkpoint_filter_fn

from synthetic_weights import relative_l2

# every test here runs with the fast kernels and with the reference maths
pytestmark = pytest.mark.usefixtures("both_forms")

SMALL = 64  # stage maps (= partitions) 16, 8, 4 and 2 pixels wide
TINY = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), sharesets=(1, 4, 16, 32))  # fast, same structure
NAMES = ("repmlpnet_t224", "repmlpnet_b224", "repmlpnet_t256", "repmlpnet_b256", "repmlpnet_d256", "repmlpnet_l256")
DEPLOY_PARAMS = {
    "repmlpnet_t224": 38_331_720, "repmlpnet_b224": 68_332_664, "repmlpnet_t256": 58_739_400,
    "repmlpnet_b256": 96_568_184, "repmlpnet_d256": 86_985_280, "repmlpnet_l256": 117_820_600,
}


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (identity BN hides fold errors)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model


def _model(name: str = "repmlpnet_t224", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(visionmlp.create_model(name, img_size=SMALL, **(TINY | kwargs))).eval()


def _direct_block(block: RepMLPBlock, x: torch.Tensor) -> torch.Tensor:
    """The block written as in the paper: partitions -> grouped 1x1 conv FC (+ per-partition convs) -> merge."""
    B, C, H, W = x.shape
    (h, w), S = block.partition_size, block.num_sharesets
    rows, cols = H // h, W // w
    parts = x.reshape(B, C, rows, h, cols, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, S * h * w, 1, 1)
    out = F.conv2d(parts, block.fc3.weight, block.fc3.bias, groups=S).reshape(-1, S, h, w)
    out = block.fc3_bn(out)
    for branch in block.repconvs.values():
        out = out + branch.bn(branch.conv(parts.reshape(-1, S, h, w)))
    out = out.reshape(B, rows, cols, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    return out * block.gp(x)


@pytest.mark.parametrize("deploy", [False, True])
@pytest.mark.parametrize(("size", "partition", "sharesets"), [((6, 10), (6, 10), 4), ((12, 10), (4, 5), 2)])
def test_block_matches_direct_formulation(deploy, size, partition, sharesets):
    torch.manual_seed(0)
    block = _randomize_bn(RepMLPBlock(16, partition, sharesets, conv_kernels=(1, 3, 5), deploy=deploy)).double()
    block.eval()
    if deploy:
        nn.init.normal_(block.fc3.bias)
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    torch.testing.assert_close(block(x), _direct_block(block, x), rtol=1e-10, atol=1e-12)


def test_block_trains_standalone():
    block = RepMLPBlock(8, 4, num_sharesets=2).train()
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    block(x).square().mean().backward()
    assert x.grad is not None and block.repconvs["3"].conv.weight.grad.abs().sum() > 0
    assert block.fc3.weight.grad.abs().sum() > 0


def test_block_rejects_input_off_the_partition_grid():
    block = RepMLPBlock(8, 4).eval()
    with pytest.raises(ValueError, match="multiple of the partition size"):
        block(torch.randn(1, 8, 6, 8))


def test_local_inject_is_exact_in_fp32():
    model = _model(**dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), sharesets=(1, 4, 16, 128)))  # real T224
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        expected = model(x)
        model.locality_injection()
        folded = model(x)
    assert relative_l2(folded, expected) <= 1e-5


def test_folded_model_has_the_deploy_layout_and_refolding_is_harmless():
    model = _model()
    deploy_keys = set(visionmlp.create_model("repmlpnet_t224", img_size=SMALL, deploy=True, **TINY).state_dict())
    assert any(".repconvs.3." in k for k in model.state_dict())
    visionmlp.reparameterize(model)
    assert set(model.state_dict()) == deploy_keys
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        before = model(x)
        visionmlp.reparameterize(model)
        model.locality_injection()
        for m in model.modules():
            if isinstance(m, RepMLPBlock):
                m.local_inject()
        after = model(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", NAMES)
def test_deploy_parameter_count(name):
    with torch.device("meta"):
        model = timm.create_model(name, deploy=True)
    assert sum(p.numel() for p in model.parameters()) == DEPLOY_PARAMS[name]
    block = model.stages[0][0].repmlp_block
    assert block.fc3.bias is not None and isinstance(block.fc3_bn, nn.Identity) and not block.conv_kernels


def test_official_deploy_checkpoint_loads(tmp_path):
    trained = _model()
    visionmlp.reparameterize(trained)
    path = tmp_path / "deploy.pth"
    torch.save({"model": {f"module.{k}": v for k, v in trained.state_dict().items()}}, path)
    model = visionmlp.create_model("repmlpnet_t224", img_size=SMALL, deploy=True, checkpoint_path=path, **TINY)
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained(x))


def test_training_checkpoint_is_folded_for_a_deploy_model():
    trained = _model().double()
    deploy = timm.create_model("repmlpnet_t224", img_size=SMALL, deploy=True, **TINY).double().eval()
    deploy.load_state_dict(checkpoint_filter_fn(trained.state_dict(), deploy), strict=True)
    x = torch.randn(2, 3, SMALL, SMALL, dtype=torch.float64)
    with torch.no_grad():
        assert relative_l2(deploy(x), trained(x)) <= 1e-10


def test_deploy_checkpoint_into_training_model_raises():
    folded = visionmlp.reparameterize(_model())
    with pytest.raises(ValueError, match="deploy=True"):
        checkpoint_filter_fn(folded.state_dict(), _model())


@pytest.mark.parametrize("img_size", [100, 0, (224, 100), 48])
def test_impossible_img_size_raises(img_size):
    with pytest.raises(ValueError, match="multiple of 32"):
        visionmlp.create_model("repmlpnet_t224", img_size=img_size)


def test_img_size_sets_partition_fc_sizes():
    model = visionmlp.create_model("repmlpnet_t256", img_size=(64, 96), num_classes=3, **TINY).eval()
    for i, (h, w, sharesets) in enumerate([(16, 24, 1), (8, 12, 4), (4, 6, 16), (2, 3, 32)]):
        block = model.stages[i][0].repmlp_block
        assert block.partition_size == (h, w)
        assert block.fc3.weight.shape == (sharesets * h * w, h * w, 1, 1)
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 3)


def test_larger_input_runs_on_several_partitions_per_map():
    model = _model()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 2 * SMALL, 3 * SMALL)).shape == (1, 1000)
        with pytest.raises(ValueError, match="partition size"):
            model(torch.randn(1, 3, SMALL + 32, SMALL))


def test_forward_stores_no_state():
    model = _model()
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    with torch.no_grad():
        model(torch.randn(1, 3, SMALL, SMALL))
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = visionmlp.create_model("repmlpnet_t224", img_size=SMALL, num_classes=4, **TINY).double().train()
    x = torch.randn(2, 3, SMALL, SMALL, dtype=torch.float64)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("deploy", [False, True])
def test_fx_trace_matches_eager(deploy):
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    model = _model(deploy=deploy)
    tracer_kwargs = {
        "leaf_modules": get_notrace_modules(),
        "autowrap_functions": get_notrace_functions(),
        "param_shapes_constant": True,
    }
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs).eval()
    with torch.no_grad():
        for x in (torch.randn(2, 3, SMALL, SMALL), torch.randn(1, 3, 2 * SMALL, SMALL)):  # 1 and 2 partitions per map
            (traced,) = fx_model(x).values()
            torch.testing.assert_close(traced, model(x), rtol=0, atol=0)
        # the input-size check is kept in the graph as a leaf call
        with pytest.raises(ValueError, match="partition size"):
            fx_model(torch.randn(1, 3, SMALL + 32, SMALL))
