"""Checkpoints trained at one resolution in models built for another: resampled grid-sized weights (ViP, Strip-MLP,
RepMLPNet) and RaftMLP's dynamic input size."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import visionmlp
from visionmlp.models.resample import resample_mixing, resample_positions, resample_relative_table

# (variant, size trained at, size built for): square and non-square where the family allows it
CASES = [
    ("vip_s7", 112, (140, 126)),
    ("strip_mlp_tiny_light", 64, 96),
    ("repmlpnet_t224", 64, (96, 64)),
]


def _smooth_mixing(length: int) -> torch.Tensor:
    """A token-mixing matrix that is a smooth function of the tokens' relative positions (a Gaussian blur)."""
    positions = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    return torch.exp(-((positions[:, None] - positions[None, :]) / 0.15) ** 2) / length


def test_resampled_mixing_keeps_a_smooth_function_and_the_response_to_a_constant():
    weight = _smooth_mixing(16)
    up = resample_mixing(weight, (0,), (1,), (16,), (32,))
    assert up.shape == (32, 32)
    target = _smooth_mixing(32)  # the same blur sampled on the finer grid; bicubic differs most at the borders
    assert torch.linalg.norm(up - target) / torch.linalg.norm(target) <= 5e-2
    # a constant input gives (nearly) the same output at either resolution
    assert (up.sum(1).mean() - weight.sum(1).mean()).abs() <= 1e-3
    back = resample_mixing(up, (0,), (1,), (32,), (16,))
    assert torch.linalg.norm(back - weight) / torch.linalg.norm(weight) <= 2e-2
    # positions along one axis of a larger tensor; the other axes are left alone
    bias = torch.linspace(0, 1, 16, dtype=torch.float64)[:, None].expand(16, 3)
    torch.testing.assert_close(resample_positions(bias, (0,), (16,), (16,)), bias)
    assert resample_positions(bias, (0,), (16,), (8,)).shape == (8, 3)


def test_relative_tables_keep_their_extreme_and_zero_offsets():
    table = torch.randn(2 * 8 + 1, 5)
    stretched = resample_relative_table(table, 12)
    assert stretched.shape == (25, 5)
    for old_row, new_row in ((0, 0), (8, 12), (16, 24)):
        torch.testing.assert_close(stretched[new_row], table[old_row])


@pytest.mark.parametrize("name, trained, built", CASES)
def test_a_checkpoint_loads_into_a_model_built_for_another_resolution(name, trained, built, tmp_path, caplog):
    torch.manual_seed(0)
    source = visionmlp.create_model(name, img_size=trained, num_classes=7)
    path = tmp_path / "trained.pth"
    torch.save({"model": source.state_dict()}, path)
    with caplog.at_level("INFO", logger="visionmlp.models"):
        model = timm.create_model(name, img_size=built, num_classes=7, pretrained=True,
                                  pretrained_cfg_overlay={"file": str(path)})
    assert "resampled" in caplog.text
    height, width = (built, built) if isinstance(built, int) else built
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, height, width))).all()
    # what does not depend on the grid is loaded as it was (timm keeps a fresh classifier: its cfg has 1000 classes)
    stem = model.pretrained_cfg["first_conv"]
    torch.testing.assert_close(model.get_submodule(stem).weight, source.get_submodule(stem).weight)
    # at the trained size nothing is resampled
    same = visionmlp.create_model(name, img_size=trained, num_classes=7, checkpoint_path=path)
    for (key, got), expected in zip(same.state_dict().items(), source.state_dict().values()):
        torch.testing.assert_close(got, expected, msg=key)


def test_resampling_up_and_back_keeps_a_smooth_repmlpnet_partition_fc():
    from visionmlp.models.repmlpnet import resample_partition_fcs

    model = visionmlp.create_model("repmlpnet_t224", img_size=64, deploy=True)
    state = model.state_dict()
    key = "stages.0.0.repmlp_block.fc3.weight"  # stage 1 at 64 px: one 16 x 16 partition, one share-set
    side = 16
    positions = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    blur = torch.exp(-((positions[:, None] - positions[None, :]) / 0.2) ** 2)
    smooth = torch.einsum("ac,bd->abcd", blur, blur).reshape(side * side, side * side, 1, 1)
    state[key] = smooth.clone()
    bigger = visionmlp.create_model("repmlpnet_t224", img_size=128, deploy=True)
    up = resample_partition_fcs(dict(state), bigger)
    assert up[key].shape == (32 * 32, 32 * 32, 1, 1)
    back = resample_partition_fcs(dict(up), model)
    assert torch.linalg.norm(back[key] - smooth) / torch.linalg.norm(smooth) <= 2e-2


def test_raft_mlp_refuses_a_checkpoint_of_another_grid_and_names_the_fix(tmp_path):
    path = tmp_path / "raft.pth"
    torch.save(visionmlp.create_model("raft_mlp_s", img_size=64).state_dict(), path)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        visionmlp.create_model("raft_mlp_s", img_size=96, checkpoint_path=path)
    model = visionmlp.create_model("raft_mlp_s", img_size=64, dynamic_img_size=True, checkpoint_path=path).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 80)).shape == (1, 1000)
        assert model(torch.randn(1, 3, 70, 50)).shape == (1, 1000)  # sides off the stride: resized up first


def test_raft_mlp_dynamic_size_at_the_trained_size_is_the_fixed_model():
    torch.manual_seed(0)
    fixed = visionmlp.create_model("raft_mlp_s", img_size=64).eval()
    dynamic = visionmlp.create_model("raft_mlp_s", img_size=64, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x))
    assert math.isfinite(float(dynamic(torch.randn(1, 3, 128, 64)).sum()))


def recorded_checkpoint(path, opts: dict) -> str:
    """A checkpoint as visionmlp train writes one (weights, configuration, classes) of a fresh model, 10 digits."""
    from visionmlp.config import build_config
    from visionmlp.engine.evaluate import build_model

    config = build_config(opts=opts)
    torch.save({"model": build_model(config, 10).state_dict(), "config": config,
                "classes": [str(digit) for digit in range(10)]}, path)
    return str(path)


def test_a_run_at_another_size_is_refused_alike_by_eval_predict_and_export(tmp_path, capsys):
    from PIL import Image

    from visionmlp.cli import main

    image = tmp_path / "image.png"
    Image.fromarray(torch.zeros(20, 20, 3, dtype=torch.uint8).numpy()).save(image)
    tiny_vip = {"model.kwargs": "{depths: [1, 1, 1, 1], embed_dims: [16, 32, 32, 32], num_segments: [4, 4, 4, 4]}",
                "data.img_size": "14"}
    vip = recorded_checkpoint(tmp_path / "vip.pt", tiny_vip)
    refusal = (f"{vip} holds a vip_s7 trained at 14x14, whose token-mixing weights are sized for that input: run it at "
               "that size (leave out --img-size), or resample them for another into a new checkpoint (a start for "
               f"fine-tuning) with visionmlp convert --checkpoint {vip} --img-size SIZE --output FILE")
    for command in (["eval", "--workers", "0"], ["predict", str(image)],
                    ["export", "--format", "onnx", "--output", str(tmp_path / "vip.onnx")]):
        assert main([*command, "--checkpoint", vip, "--img-size", "28"]) == 2
        assert refusal in capsys.readouterr().err, command
    # the fix it names: convert resamples on purpose, and the new checkpoint runs at its size
    assert main(["convert", "--checkpoint", vip, "--img-size", "28", "--output", str(tmp_path / "vip28.pt")]) == 0
    assert main(["predict", "--checkpoint", str(tmp_path / "vip28.pt"), str(image), "--img-size", "28"]) == 0

    # a RaftMLP that keeps its grid takes any input size in predict, as in eval (ONNX only at its grid's)
    raft = recorded_checkpoint(tmp_path / "raft.pt", {"model.name": "raft_mlp_s", "model.dynamic_img_size": "true",
                                                      "data.img_size": "64", "model.kwargs": "{embed_dims: [8, 8, 8, 8]}"})
    capsys.readouterr()
    assert main(["predict", "--checkpoint", raft, str(image), "--img-size", "96"]) == 0
    assert main(["export", "--checkpoint", raft, "--img-size", "96", "--format", "onnx", "--output",
                 str(tmp_path / "raft.onnx")]) == 2
    assert "onnxruntime's bicubic Resize cannot shrink a map" in capsys.readouterr().err
