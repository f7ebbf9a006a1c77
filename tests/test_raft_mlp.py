"""RaftMLP specifics: size-dependent building, no per-call state, the raft and embedding maths, checkpoints."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import visionmlp
from visionmlp.kernels import raft_mlp as raft_kernels
from visionmlp.models.raft_mlp import CrossScaleEmbed, MixerBlock, RaftBlock, checkpoint_filter_fn

from synthetic_weights import load_reference, relative_l2, synthetic_state_dict

# every test here runs with the fast kernels and with the reference maths
pytestmark = pytest.mark.usefixtures("both_forms")

SMALL = 64  # token grids 16, 8, 4, 2
TINY = dict(embed_dims=(8, 16, 16, 32), depths=(1, 1, 2, 1))  # the real layout, narrow and shallow for speed
ONE_LEVEL = dict(img_size=SMALL, embed_dims=(32,))  # the one-level models narrow: 4 x 4 tokens at stride 16


def _model(name: str = "raft_mlp_s", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return visionmlp.create_model(name, img_size=SMALL, **TINY, **kwargs).double().eval()


def _randomize(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.normal_(p, std=0.2)  # non-trivial norm affines and biases
    return module


def _direct_raft_block(block: RaftBlock, x: torch.Tensor) -> torch.Tensor:
    """The raft block written the official way: tokens to rafts, norm in (group, raft) order, mix, back."""
    B, H, W, C = x.shape
    r, g = block.raft_size, C // block.raft_size

    def token_norm(norm: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
        # the official norm sees channels ordered (group, raft); ours are (raft, group)
        weight = norm.weight.reshape(r, g).t().reshape(-1)
        bias = norm.bias.reshape(r, g).t().reshape(-1)
        t = t.reshape(B, H, W, r, g).transpose(-1, -2).reshape(B, H, W, C)
        t = F.layer_norm(t, (C,), weight, bias, norm.eps)
        return t.reshape(B, H, W, g, r).transpose(-1, -2).reshape(B, H, W, C)

    # vertical: for each column and group, the (raft, row) values
    y = token_norm(block.norm_vertical, x).reshape(B, H, W, r, g)
    y = torch.einsum("bhwrg->bwgrh", y).reshape(B, W, g, r * H)
    x = x + torch.einsum("bwgrh->bhwrg", block.mlp_vertical(y).reshape(B, W, g, r, H)).reshape(B, H, W, C)
    # horizontal: for each row and group, the (raft, column) values
    y = token_norm(block.norm_horizontal, x).reshape(B, H, W, r, g)
    y = torch.einsum("bhwrg->bhgrw", y).reshape(B, H, g, r * W)
    x = x + torch.einsum("bhgrw->bhwrg", block.mlp_horizontal(y).reshape(B, H, g, r, W)).reshape(B, H, W, C)
    return x + block.mlp_channels(block.norm_channels(x))


@pytest.mark.parametrize("fast_kernels", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("grid", [(6, 6), (4, 10)])
def test_raft_block_matches_direct_formulation(grid, fast_kernels):
    torch.manual_seed(0)
    block = _randomize(RaftBlock(12, grid, raft_size=3, fast_kernels=fast_kernels)).double().eval()
    x = torch.randn(2, *grid, 12, dtype=torch.float64)
    expected = _direct_raft_block(block, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(block.parameters()))
    got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for got_grad, expected_grad in zip(torch.autograd.grad(got.square().sum(), list(block.parameters())),
                                       expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-12)


def _direct_mixer_block(block: MixerBlock, x: torch.Tensor) -> torch.Tensor:
    """MLP-Mixer's block written on its weights: tokens (B, N, C), the token MLP contracting N, the channel MLP C."""
    B, H, W, C = x.shape
    tokens, mlp = x.reshape(B, H * W, C), block.mlp_tokens
    y = block.norm_tokens(tokens)
    hidden = F.gelu(torch.einsum("bnc,kn->bkc", y, mlp.fc1.weight) + mlp.fc1.bias[:, None])
    tokens = tokens + torch.einsum("bkc,nk->bnc", hidden, mlp.fc2.weight) + mlp.fc2.bias[:, None]
    tokens = tokens + block.mlp_channels(block.norm_channels(tokens))
    return tokens.reshape(B, H, W, C)


@pytest.mark.parametrize("fast_kernels", [False, True], ids=["reference", "fast"])
def test_mixer_block_matches_direct_formulation(fast_kernels):
    torch.manual_seed(0)
    block = _randomize(MixerBlock(12, (3, 5), fast_kernels=fast_kernels)).double().eval()
    assert block.mlp_tokens.fc1.weight.shape == (30, 15)  # all 15 tokens, expansion 2
    x = torch.randn(2, 3, 5, 12, dtype=torch.float64)
    expected = _direct_mixer_block(block, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(block.parameters()))
    got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for got_grad, expected_grad in zip(torch.autograd.grad(got.square().sum(), list(block.parameters())),
                                       expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("along", [1, 2], ids=["vertical", "horizontal"])
def test_raft_major_branch_equals_the_token_last_branch(along):
    # the fast block's two forms of a token-mixing branch, in float64 (the block takes raft-major in bf16 only)
    torch.manual_seed(0)
    block = _randomize(RaftBlock(12, (4, 10), raft_size=3)).double()
    norm, mlp = (block.norm_vertical, block.mlp_vertical) if along == 1 else (block.norm_horizontal,
                                                                              block.mlp_horizontal)
    x = torch.randn(2, 4, 10, 3, 4, dtype=torch.float64)
    token_last = raft_kernels._token_last_branch(x, norm, mlp, along)
    raft_major = raft_kernels._raft_major_branch(x, norm, mlp, along)
    torch.testing.assert_close(raft_major, token_last, rtol=1e-10, atol=1e-12)
    params = list(norm.parameters()) + list(mlp.parameters())
    for got, expected in zip(torch.autograd.grad(raft_major.square().sum(), params),
                             torch.autograd.grad(token_last.square().sum(), params)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # without autograd the raft-major GELU works in place
        torch.testing.assert_close(raft_kernels._raft_major_branch(x, norm, mlp, along), token_last,
                                   rtol=1e-10, atol=1e-12)


def test_fast_block_in_bf16_matches_the_reference_in_fp32():
    torch.manual_seed(0)
    reference = _randomize(RaftBlock(32, (8, 8), raft_size=2, fast_kernels=False)).eval()
    fast = RaftBlock(32, (8, 8), raft_size=2, fast_kernels=True).eval()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        expected = reference(x)
        got = fast.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert relative_l2(got, expected) <= 2e-2


@pytest.mark.parametrize("kernels", [(4, 8), (2, 4), (2,), (2, 4, 6)])
def test_merged_embedding_matches_unfold_and_linear(kernels):
    torch.manual_seed(0)
    embed = _randomize(CrossScaleEmbed(3, 10, kernels)).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    stride = min(kernels)
    patches = torch.cat([F.unfold(x, k, stride=stride, padding=(k - stride) // 2) for k in kernels], dim=1)
    weight = torch.cat([conv.weight.flatten(1) for conv in embed.proj], dim=1)
    expected = (patches.transpose(1, 2) @ weight.t() + embed.proj[0].bias).reshape(2, 16 // stride, 16 // stride, 10)
    torch.testing.assert_close(embed(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("img_size", [100, 48, (224, 100), 0])
def test_impossible_img_size_raises(img_size):
    with pytest.raises(ValueError, match="multiple of 32"):
        visionmlp.create_model("raft_mlp_s", img_size=img_size)


def test_img_size_sets_mixing_widths():
    model = visionmlp.create_model("raft_mlp_s", img_size=(64, 96), num_classes=3).eval()
    first = model.stages[0].blocks[0]  # grid 16 x 24, raft size 2, token expansion 2
    assert first.mlp_vertical.fc1.weight.shape == (2 * 2 * 16, 2 * 16)
    assert first.mlp_horizontal.fc1.weight.shape == (2 * 2 * 24, 2 * 24)
    last = model.stages[3].blocks[0]  # grid 2 x 3
    assert last.mlp_vertical.fc2.weight.shape == (2 * 2, 2 * 2 * 2)
    assert last.mlp_horizontal.fc2.weight.shape == (2 * 3, 2 * 2 * 3)
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 3)


def test_input_of_another_size_raises():
    model = visionmlp.create_model("raft_mlp_s", img_size=SMALL).eval()
    with pytest.raises(ValueError, match=r"img_size=\(64, 64\)"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="built for"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32))


def _module_state(model: nn.Module) -> dict:
    """Every module's plain attributes (everything but parameters, buffers and children)."""
    skip = {"_parameters", "_buffers", "_modules"}
    return {
        name: {k: copy.deepcopy(v) for k, v in vars(m).items() if k not in skip and not k.endswith("_hooks")}
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize("train", [False, True])
def test_forward_keeps_no_per_call_state(train):
    model = _model(drop_path_rate=0.1).train(train)
    before = _module_state(model)
    model(torch.randn(2, 3, SMALL, SMALL, dtype=torch.float64))
    model.forward_intermediates(torch.randn(1, 3, SMALL, SMALL, dtype=torch.float64))
    assert _module_state(model) == before


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_traces_with_jit_fx_and_export():
    model = _model()
    x = torch.randn(2, 3, SMALL, SMALL, dtype=torch.float64)
    expected = model(x)
    with torch.no_grad():
        traced = torch.jit.trace(model, x[:1], check_trace=False)
    torch.testing.assert_close(traced(x), expected)
    graph_module = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(graph_module(x), expected)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


def test_features_only_maps():
    model = visionmlp.create_model("raft_mlp_m", img_size=SMALL, features_only=True, out_indices=(1, 3))
    feats = model(torch.randn(1, 3, SMALL, SMALL))
    assert [f.shape for f in feats] == [(1, 192, 8, 8), (1, 768, 2, 2)]
    assert model.feature_info.reduction() == [8, 32]


def test_one_level_features_are_the_embedding_and_every_block():
    torch.manual_seed(0)
    model = visionmlp.create_model("raft_mlp_org_mixer", **ONE_LEVEL).double().eval()
    stage, x = model.stages[0], torch.randn(1, 3, SMALL, SMALL, dtype=torch.float64)
    with torch.no_grad():
        taps = [stage.embed_tokens(x)]
        for block in stage.blocks:
            taps.append(block(taps[-1]))
        taps = [t.permute(0, 3, 1, 2) for t in taps]
        assert len(model.feature_info) == 13 and {f["reduction"] for f in model.feature_info} == {16}
        final, maps = model.forward_intermediates(x, indices=[0, 4, 12], norm=True)
        torch.testing.assert_close(maps[:2], [taps[0], taps[4]])
        torch.testing.assert_close(maps[2], model.norm(taps[12].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        torch.testing.assert_close(final, model.forward_features(x))

        # by default the taps the seed's detection and segmentation backbones give their FPN: embedding, blocks 4, 10, 12
        backbone = timm.create_model("raft_mlp_org_mixer", features_only=True, **ONE_LEVEL).double().eval()
        backbone.model.load_state_dict(model.state_dict(), strict=False)
        assert backbone.feature_info.out_indices == (0, 4, 10, 12)
        assert backbone.feature_info.reduction() == [16] * 4 and backbone.feature_info.channels() == [32] * 4
        torch.testing.assert_close(backbone(x), [taps[i] for i in (0, 4, 10, 12)])
        picked = timm.create_model("raft_mlp_org_mixer", features_only=True, out_indices=(2, 6), **ONE_LEVEL)
        assert len(picked.model.stages[0].blocks) == 6  # blocks past the last tap pruned
        assert [m.shape for m in picked(x.float())] == [(1, 32, 4, 4)] * 2
    deep = timm.create_model("raft_mlp_deep", features_only=True, img_size=SMALL, embed_dims=(8,))
    assert deep.feature_info.out_indices == (0, 12, 30, 36)  # the same fractions of 36 blocks


@pytest.mark.parametrize("name", ["raft_mlp_org_mixer", "raft_mlp_r2_cross_emb", "raft_mlp_hierarchy_m"])
def test_ablation_models_take_other_sizes_with_dynamic_img_size(name):
    # the fine-tuning recipes' 256 x 224 (height x width) on the 224 x 224 grid, as the official code runs them
    narrow = {"embed_dims": (32,)} if name != "raft_mlp_hierarchy_m" else {"embed_dims": (8, 16, 16, 32)}
    model = visionmlp.create_model(name, dynamic_img_size=True, num_classes=5, **narrow).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 224)).shape == (1, 5)
        maps = model.forward_intermediates(torch.randn(1, 3, 256, 224), indices=1, intermediates_only=True)
    assert maps[-1].shape[-2:] == ((16, 14) if name != "raft_mlp_hierarchy_m" else (8, 7))
    with pytest.raises(ValueError, match="img_size"):
        visionmlp.create_model(name, **narrow)(torch.randn(1, 3, 256, 224))


@pytest.mark.parametrize("saved_as", ["state_dict", "trainer_checkpoint"])
def test_official_mlp_mixer_checkpoint_converts_and_loads(tmp_path, saved_as):
    layout, _, meta = load_reference("raft_mlp_org_mixer_dynamic_72x56")  # an official layout of width 32, grid 4 x 4
    kwargs = meta["model_kwargs"]
    official = synthetic_state_dict(layout)
    # the official trainer (ignite) saves the bare state dict as {last,best}_model_*.pt, and the model with the
    # trainer, optimizer and schedule every checkpoint_every iterations
    saved = official if saved_as == "state_dict" else {
        "trainer": {"epoch": 3}, "model": official, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}}
    path = tmp_path / "last_model_0.pt"
    torch.save(saved, path)
    model = visionmlp.create_model("raft_mlp_org_mixer", checkpoint_path=path, **kwargs)
    # the official plain embedding is a linear layer on each patch flattened (row, column, channel)
    embed = official["levels.0.fn.1.weight"].float().reshape(32, 16, 16, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(model.stages[0].embed.proj[0].weight.detach(), embed)
    torch.testing.assert_close(model.stages[0].blocks[3].mlp_tokens.fc1.weight.detach(),
                               official["levels.0.fn.5.1.fn.0.weight"].float())
    with pytest.raises(ValueError, match="does not fit"):
        visionmlp.convert_official_state_dict("raft_mlp_r2", path, **kwargs)
    with pytest.raises(ValueError, match="img_size"):  # a model for another grid: the fix is named
        visionmlp.convert_official_state_dict("raft_mlp_org_mixer", path, embed_dims=(32,), img_size=96)


def test_drop_path_rate_is_uniform():
    model = visionmlp.create_model("raft_mlp_s", img_size=SMALL, drop_path_rate=0.1)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates == [0.1] * 12  # one per block, the same in every stage (no linear ramp)
    assert not any(type(m).__name__ == "DropPath" for m in visionmlp.create_model("raft_mlp_s").modules())


def test_grad_checkpointing_gives_same_gradients(monkeypatch):
    calls = []
    block_forward = RaftBlock.forward
    monkeypatch.setattr(RaftBlock, "forward", lambda self, x: calls.append(1) or block_forward(self, x))
    x = torch.randn(2, 3, SMALL, SMALL, dtype=torch.float64)
    grads = []
    for enable in (False, True):
        model = _model(drop_path_rate=0.0).train()
        model.set_grad_checkpointing(enable)
        calls.clear()
        model(x).square().mean().backward()
        assert len(calls) == (10 if enable else 5)  # checkpointed blocks run again in the backward pass
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


def test_official_checkpoint_converts_and_loads(tmp_path):
    layout, _, _ = load_reference("raft_mlp_s")
    official = synthetic_state_dict(layout)
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official.items()}, "epoch": 300}, path)
    model = visionmlp.create_model("raft_mlp_s", checkpoint_path=path)

    # the official token norms order channels (group, raft); ours (raft, group)
    theirs = official["levels.1.fn.3.3.norm.1.weight"].float()
    ours = model.stages[1].blocks[1].norm_horizontal.weight.detach()
    torch.testing.assert_close(ours, theirs.reshape(64, 2).t().reshape(-1))
    torch.testing.assert_close(model.stages[0].embed.proj[1].weight.detach().flatten(1),
                               official["levels.0.fn.0.fc.weight"][:, 3 * 16:].float())
    assert not torch.equal(ours, theirs)

    ours_sd = model.state_dict()
    assert checkpoint_filter_fn(ours_sd, model) is ours_sd  # our own keys pass unchanged
    other = visionmlp.create_model("raft_mlp_s", num_classes=10, checkpoint_path=path)
    assert other.head.weight.shape == (10, 512)  # fresh head for another number of classes
    torch.testing.assert_close(other.norm.weight, model.norm.weight)


def test_checkpoint_for_another_img_size_is_refused(tmp_path):
    path = tmp_path / "ours.pth"
    torch.save(visionmlp.create_model("raft_mlp_s", img_size=SMALL).state_dict(), path)
    with pytest.raises(ValueError, match="img_size"):
        visionmlp.create_model("raft_mlp_s", img_size=96).load_pretrained(path)
    with pytest.raises(ValueError, match="img_size"):
        timm.create_model("raft_mlp_s", img_size=96, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path), custom_load=True))
