"""Properties every variant must have: registration, exact size, timm's model interface, features."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

import visionmlp
from visionmlp import MODEL_NAMES, create_model

# every test here runs with the fast kernels and with the reference maths
pytestmark = pytest.mark.usefixtures("both_forms")

REFERENCE_TABLE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "models.md"

# Exact parameter counts of the official implementations at the default resolution (training form).
OFFICIAL_PARAMS = {
    "ms_mlp_tiny": 28_656_232, "ms_mlp_small": 50_303_752, "ms_mlp_base": 88_696_792,
    "vip_s7": 25_114_984, "vip_m7": 55_272_488, "vip_l7": 87_784_936,
    "strip_mlp_tiny_light": 18_243_920, "strip_mlp_tiny": 24_903_920,
    "strip_mlp_small": 42_568_600, "strip_mlp_base": 57_216_480,
    "raft_mlp_s": 9_868_768, "raft_mlp_m": 21_413_632, "raft_mlp_l": 36_184_672,
    # measured on the official code (libs/models.py with configs/settings/imagenet-*.yaml)
    "raft_mlp_org_mixer": 59_918_200, "raft_mlp_r1": 58_105_432, "raft_mlp_r2": 58_162_888, "raft_mlp_r4": 58_390_696,
    "raft_mlp_hierarchy_m": 19_920_640, "raft_mlp_r2_cross_emb": 60_522_184, "raft_mlp_deep": 43_532_296,
    "repmlpnet_t224": 38_293_608, "repmlpnet_b224": 68_242_712, "repmlpnet_t256": 58_687_848,
    "repmlpnet_b256": 96_447_512, "repmlpnet_d256": 86_887_648, "repmlpnet_l256": 117_641_560,
}

# The smallest convenient resolution for tests whose property does not depend on size.
SMALL_IMG = {name: 64 for name in MODEL_NAMES}
SMALL_IMG.update({n: 112 for n in MODEL_NAMES if n.startswith("vip")})  # ViP's 7x7 patches need 16-pixel steps
SMALL_IMG.update({n: 64 for n in MODEL_NAMES if n.startswith("repmlpnet")})


# RaftMLP's one-level models and their depths: their features are the patch embedding and every block's output.
ONE_LEVEL_DEPTH = {"raft_mlp_org_mixer": 12, "raft_mlp_r1": 12, "raft_mlp_r2": 12, "raft_mlp_r4": 12,
                   "raft_mlp_r2_cross_emb": 12, "raft_mlp_deep": 36}
# They are 43-61 M parameters wide: the interface tests build them as they are but narrow (their size is checked on
# the meta device above, their maths against the official code in test_equivalence).
NARROW = {name: {"embed_dims": (32,)} for name in ONE_LEVEL_DEPTH}

# The smallest variant of each family.
SMALLEST_OF_EACH_FAMILY = ["ms_mlp_tiny", "vip_s7", "strip_mlp_tiny_light", "raft_mlp_s", "repmlpnet_t224"]


def small_model(name: str, **kwargs) -> torch.nn.Module:
    """Variant ``name`` built for its small test resolution."""
    if visionmlp.models.family_module(name).__name__.endswith("ms_mlp"):
        return create_model(name, **kwargs)
    return create_model(name, img_size=SMALL_IMG[name], **NARROW.get(name, {}), **kwargs)


def test_every_name_is_listed_and_registered_with_timm():
    assert visionmlp.list_models() == list(MODEL_NAMES)
    registered = set(timm.list_models())
    assert set(MODEL_NAMES) <= registered


def test_reference_table_names_match(tmp_path):
    if not REFERENCE_TABLE.exists():
        pytest.skip("shared/reference/models.md is not beside this checkout")
    names = re.findall(r"^\| (\w+)(?: \(T\*\))? \|", REFERENCE_TABLE.read_text(), flags=re.M)
    assert [n for n in names if n in OFFICIAL_PARAMS] == [n for n in MODEL_NAMES if n in names]
    assert {"raft_mlp_s", "vip_s7", "repmlpnet_l256"} <= set(names)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_equals_official(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pretrained_cfg_is_complete(name):
    cfg = timm.get_pretrained_cfg(name).to_dict()
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "first_conv", "classifier"):
        assert cfg.get(key) is not None, key
    with torch.device("meta"):
        model = timm.create_model(name)
    state_dict = model.state_dict()
    assert cfg["classifier"] + ".weight" in state_dict
    assert cfg["first_conv"] + ".weight" in state_dict
    assert model.pretrained_cfg["input_size"] == cfg["input_size"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_and_head_interface(name):
    torch.manual_seed(0)
    model = small_model(name, num_classes=7, drop_path_rate=0.1)
    img = SMALL_IMG[name]
    x = torch.randn(2, 3, img, img)

    model.train()
    out = model(x)
    assert out.shape == (2, 7)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.isfinite(features).all()
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, model.num_features)
        logits = model.forward_head(features)
        torch.testing.assert_close(logits, model(x))

        assert model.get_classifier().out_features == 7
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradient_checkpointing_gives_same_gradients(name):
    torch.manual_seed(0)
    model = small_model(name, num_classes=5, drop_path_rate=0.0).train()
    img = SMALL_IMG[name]
    x = torch.randn(1, 3, img, img)
    model(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", SMALLEST_OF_EACH_FAMILY)
def test_channels_last_weights_and_images_give_the_same_outputs_and_gradients(name):
    # visionmlp train --channels-last: every 4-D weight and the batch in NHWC memory, the maths unchanged
    torch.manual_seed(0)
    model = small_model(name, num_classes=5, drop_path_rate=0.0).train()
    img = SMALL_IMG[name] if name != "ms_mlp_tiny" else 64
    x = torch.randn(2, 3, img, img)
    out = model(x)
    out.square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.parameters())
    out_cl = model(x.contiguous(memory_format=torch.channels_last))
    out_cl.square().sum().backward()
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    # fp32 sums in another order, through BatchNorms over a few values: within 1e-3 of each gradient's scale (a
    # layout mix-up is off by the gradient itself; in float64 the two agree to 1e-13)
    for n, p in model.named_parameters():
        atol = 1e-3 * plain[n].abs().max().item() + 1e-6
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=atol, msg=n)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_features_only_gives_four_maps_at_their_strides(name):
    img = SMALL_IMG[name]
    kwargs = {} if name.startswith("ms_mlp") else {"img_size": img, **NARROW.get(name, {})}
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    reductions = model.feature_info.reduction()
    channels = model.feature_info.channels()
    assert len(reductions) == 4 and reductions == sorted(reductions)
    with torch.no_grad():
        maps = model(torch.randn(1, 3, img, img))
    assert len(maps) == 4
    for fmap, reduction, chans in zip(maps, reductions, channels):
        assert fmap.shape == (1, chans, img // reduction, img // reduction)

    picked = timm.create_model(name, features_only=True, out_indices=(1, 3), **kwargs).eval()
    with torch.no_grad():
        maps = picked(torch.randn(1, 3, img, img))
    assert [m.shape[1] for m in maps] == [channels[1], channels[3]]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_intermediates_match_forward_features(name):
    model = small_model(name).eval()
    img = SMALL_IMG[name]
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        maps = ONE_LEVEL_DEPTH[name] + 1 if name in ONE_LEVEL_DEPTH else 4  # a one-level model: embedding, blocks
        assert len(intermediates) == len(model.feature_info) == maps
        for fmap, info in zip(intermediates, model.feature_info):
            assert fmap.shape == (1, info["num_chs"], img // info["reduction"], img // info["reduction"])
        only_last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        torch.testing.assert_close(only_last[0], intermediates[-1])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_group_matcher_covers_every_parameter(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher())
    grouped = {p for names in groups.values() for p in names}
    assert grouped == {n for n, _ in model.named_parameters()}
    if hasattr(model, "no_weight_decay"):
        assert set(model.no_weight_decay()) <= {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if not n.startswith("ms_mlp")])
def test_grid_bound_families_reject_impossible_sizes(name):
    with pytest.raises(ValueError, match="img_size"):
        create_model(name, img_size=SMALL_IMG[name] + 3)


@pytest.mark.parametrize("name", ["vip_s7", "strip_mlp_tiny_light", "raft_mlp_s", "repmlpnet_t224"])
def test_input_of_another_size_is_refused_with_the_fix(name):
    model = small_model(name).eval()
    other = SMALL_IMG[name] - 16  # a valid size for a model built for it, but not this one's
    with pytest.raises(ValueError, match=r"(img_size=\(\d+, \d+\)|img_size set to the input's size)"):
        model(torch.randn(1, 3, other, other))


@pytest.mark.parametrize("name", SMALLEST_OF_EACH_FAMILY)
def test_plain_fx_and_jit_traces_match_eager(name):
    # torch.fx.symbolic_trace with no tracer arguments, as torchvision's feature extractor uses it by default;
    # the size checks stay in the graph.
    torch.manual_seed(0)
    img = SMALL_IMG[name]
    x = torch.randn(2, 3, img, img)
    model = small_model(name, drop_path_rate=0.1).eval()
    graph_module = torch.fx.symbolic_trace(model)
    # a trace takes the reference ops where eager code takes the fast kernels: the same sums in another order, held
    # to the fast paths' fp32 tolerance
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(graph_module(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.jit.trace(model, x)(x), expected, rtol=1e-5, atol=1e-5)
    if not name.startswith("ms_mlp"):
        with pytest.raises(ValueError, match="img_size"):
            graph_module(torch.randn(1, 3, img - 16, img - 16))
    # in training the drop-path residuals are leaves too; a graph traced in train mode trains
    model.train()
    trained_graph = torch.fx.symbolic_trace(model)
    trained_graph(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", SMALLEST_OF_EACH_FAMILY)
def test_checkpoint_files_load_through_converter(name, tmp_path):
    kwargs = {} if name.startswith("ms_mlp") else {"img_size": SMALL_IMG[name]}
    x = torch.randn(1, 3, SMALL_IMG[name], SMALL_IMG[name])
    source = small_model(name).eval()
    path = tmp_path / "weights.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    via_timm = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    via_ours = create_model(name, checkpoint_path=path, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(via_timm.eval()(x), source(x))
        torch.testing.assert_close(via_ours.eval()(x), source(x))

    # a fine-tuned checkpoint with its own number of classes keeps its head
    tuned = small_model(name, num_classes=4).eval()
    torch.save({"state_dict": tuned.state_dict(), "args": {"lr": 0.1}}, path)
    reloaded = create_model(name, num_classes=4, checkpoint_path=path, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), tuned(x))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_resolution_matches_pretrained_cfg(name):
    """timm's conventions at the default size: pool_size, head_hidden_size, head removal and pass-through pooling."""
    # shapes only: on the meta device, where every variant runs at full size without computing anything
    with torch.device("meta"):
        model = create_model(name, **NARROW.get(name, {})).eval()
        cfg = model.pretrained_cfg
        x = torch.randn(1, *cfg["input_size"])
        assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size > 0
        assert bool(cfg.get("fixed_input_size")) == (not name.startswith("ms_mlp"))
        channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        unpooled_shape = (1, *cfg["pool_size"], model.num_features) if channels_last else (
            1, model.num_features, *cfg["pool_size"])
        with torch.no_grad():
            features = model.forward_features(x)
            assert features.shape == unpooled_shape
            assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
            model.reset_classifier(0, "")
            assert model.num_classes == 0
            assert model(x).shape == unpooled_shape
        unpooled = create_model(name, num_classes=0, global_pool="", **NARROW.get(name, {})).eval()
        with torch.no_grad():
            assert unpooled(x).shape == unpooled_shape


# RepMLPNet's deploy form has no conv branches in its blocks, so it is scripted as well.
@pytest.mark.parametrize(("name", "deploy"), [(n, False) for n in SMALLEST_OF_EACH_FAMILY] + [("repmlpnet_t224", True)])
def test_torchscript_and_fx_torchscript_match_eager(name, deploy):
    # As timm's test-suite does: built under set_scriptable, scripted directly and after FX tracing.
    from timm.layers import set_scriptable
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    kwargs = {"deploy": True} if deploy else {}
    with set_scriptable(True):
        model = small_model(name, **kwargs).eval()
    img = SMALL_IMG[name]
    x = torch.randn(2, 3, img, img)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-6, atol=1e-6)
        (fx_scripted,) = torch.jit.script(fx_model)(x).values()
        torch.testing.assert_close(fx_scripted, expected, rtol=1e-6, atol=1e-6)
