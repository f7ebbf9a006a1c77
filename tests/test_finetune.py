"""Fine-tuning: `visionmlp train --pretrained FILE` at another resolution and number of classes."""

from __future__ import annotations

import json

import pytest
import torch

from test_train import TINY, read_metrics
from visionmlp.cli import main
from visionmlp.engine.train import FROZEN_RANDOM_BACKBONE_WARNING


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> str:
    """A run of the tiny ViP on the digits, one epoch."""
    output = tmp_path_factory.mktemp("pretrain") / "run"
    assert main(["train", "--epochs", "1", "--output", str(output), *TINY]) == 0
    return str(output / "last.pt")


def test_fine_tuning_at_another_resolution_with_another_head(digits_checkpoint, tmp_path, capsys):
    output = tmp_path / "tuned"
    capsys.readouterr()
    # 14 px -> 28 x 42, 10 -> 12 classes: the Permute-MLPs are resampled and the classifier replaced, both said
    args = ["train", "--epochs", "1", "--output", str(output), "--pretrained", digits_checkpoint, *TINY,
            "model.num_classes", "12"]
    args[args.index("--img-size") + 1:args.index("--img-size") + 2] = ["28", "42"]
    assert main(args) == 0
    log = capsys.readouterr().out
    assert f"initialised from {digits_checkpoint}" in log
    assert "classifier replaced: the checkpoint's has 10 classes, the model 12" in log
    assert ("resampled the Permute-MLPs' height and width mixing of the checkpoint to the token grids of img_size "
            "28x42") in log
    assert "input (3, 28, 42)" in log
    record = read_metrics(output)[-1]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(output / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(record["val_loss"], rel=1e-5)
    stem = torch.load(output / "last.pt", weights_only=True)["model"]["patch_embed.proj.weight"]
    assert not torch.equal(stem, torch.load(digits_checkpoint, weights_only=True)["model"]["patch_embed.proj.weight"])


def test_a_folded_checkpoint_is_refused_with_the_reason(digits_checkpoint, tmp_path, capsys):
    folded = tmp_path / "deploy.pt"
    assert main(["convert", "--checkpoint", digits_checkpoint, "--deploy", "--output", str(folded)]) == 0
    capsys.readouterr()
    assert main(["train", "--epochs", "1", "--output", str(tmp_path / "run"), "--pretrained", str(folded), *TINY]) == 2
    assert "folded (deploy) form of the model, which cannot be trained" in capsys.readouterr().err


def test_an_official_repmlpnet_deploy_checkpoint_is_refused(tmp_path, capsys):
    from synthetic_weights import load_reference, synthetic_state_dict

    layout, _, _ = load_reference("repmlpnet_t224_deploy")
    path = tmp_path / "RepMLPNet-T224-deploy.pth"
    torch.save(synthetic_state_dict(layout), path)
    assert main(["train", "--model", "repmlpnet_t224", "--epochs", "1", "--output", str(tmp_path / "run"),
                 "--pretrained", str(path), "--workers", "0"]) == 2
    assert "cannot be undone" in capsys.readouterr().err


def test_linear_probing_trains_the_classifier_alone(digits_checkpoint, tmp_path, capsys):
    output = tmp_path / "probe"
    assert main(["train", "--epochs", "1", "--output", str(output), "--pretrained", digits_checkpoint,
                 "--freeze-backbone", *TINY]) == 0
    before = torch.load(digits_checkpoint, weights_only=True)["model"]
    after = torch.load(output / "last.pt", weights_only=True)["model"]
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"head.weight", "head.bias"}
    assert FROZEN_RANDOM_BACKBONE_WARNING not in capsys.readouterr().out
    # without a checkpoint to start from, the frozen backbone is a random one: said, not refused
    assert main(["train", "--epochs", "1", "--output", str(tmp_path / "random"), "--freeze-backbone", *TINY]) == 0
    assert FROZEN_RANDOM_BACKBONE_WARNING in capsys.readouterr().out


def test_parameter_groups_scale_the_backbone_and_decay_per_layer():
    import visionmlp
    from visionmlp.engine.optim import parameter_groups

    model = visionmlp.create_model("vip_s7", img_size=28, num_classes=10)
    head = {id(p) for p in model.head.parameters()}
    plain = parameter_groups(model, 0.05)
    assert {g["lr_scale"] for g in plain} == {1.0} and sum(len(g["params"]) for g in plain) == len(list(
        model.parameters()))
    assert {g["weight_decay"] for g in plain if any(p.ndim == 1 for p in g["params"])} == {0.0}
    scaled = parameter_groups(model, 0.05, backbone_lr_scale=0.01)
    for group in scaled:
        assert group["lr_scale"] == (1.0 if all(id(p) in head for p in group["params"]) else 0.01)
    layered = parameter_groups(model, 0.05, layer_decay=0.5)
    scales = {g["lr_scale"] for g in layered}
    assert max(scales) == 1.0 and min(scales) < 0.5 ** 10  # the stem, 20+ layers below the head
    assert next(g for g in layered if id(model.head.weight) in map(id, g["params"]))["lr_scale"] == 1.0


def test_a_run_recorded_before_newer_config_keys_still_evaluates(digits_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    del checkpoint["config"]["data"]["flowers102_split"], checkpoint["config"]["train"]["layer_decay"]
    old = tmp_path / "old.pt"
    torch.save(checkpoint, old)
    assert main(["eval", "--checkpoint", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 96


def test_the_flowers_recipe_fine_tunes_a_dynamic_raft_mlp_at_256x224(tmp_path, capsys):
    # the recipe as shipped (RaftMLP's official fine-tuning), a narrow RaftMLP and a few images of three classes
    from test_finetune_data import make_flowers_raftmlp

    import visionmlp

    root = make_flowers_raftmlp(tmp_path / "data")
    narrow = "{embed_dims: [8, 16, 16, 32], depths: [1, 1, 1, 1]}"
    source = visionmlp.create_model("raft_mlp_s", embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1))
    torch.save(source.state_dict(), tmp_path / "imagenet.pth")
    output = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--cfg", "raft_mlp_flowers102", "--data-path", str(root), "--pretrained",
                 str(tmp_path / "imagenet.pth"), "--epochs", "1", "--batch-size", "4", "--workers", "0",
                 "--output", str(output), "--opts", "model.kwargs", narrow, "train.warmup_epochs", "0",
                 "aug.mixup", "0", "aug.cutmix", "0"]) == 0
    log = capsys.readouterr().out
    assert "input (3, 256, 224)" in log and "classifier replaced: the checkpoint's has 1000 classes" in log
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(output / "last.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(read_metrics(output)[-1]["val_loss"],
                                                                          rel=1e-5)


@pytest.mark.parametrize("data_set", ["cifar10", "flowers102"])  # at 224, and at 256 x 224 on the 224 x 224 grid
def test_raft_mlp_recipes_fine_tune_the_mlp_mixer_baseline(data_set):
    # the seed fine-tunes its MLP-Mixer baseline with the settings of RaftMLP-S/M/L (finetune/*-org-mixer.yaml);
    # here narrow, at the recipe's input size
    from visionmlp.config import build_config, image_size, load_recipe
    from visionmlp.engine.evaluate import build_model

    for recipe in ("cifar10", "cifar100", "flowers102", "stanford_cars", "inat2018", "inat2019"):
        assert load_recipe(f"raft_mlp_{recipe}")["model"]["drop_path_by_variant"]["raft_mlp_org_mixer"] == 0.0
    config = build_config(f"raft_mlp_{data_set}", opts={"model.kwargs": "{embed_dims: [32]}"},
                          flags={"model.name": "raft_mlp_org_mixer", "data.path": "/data"})
    assert config["model"]["drop_path_rate"] == 0.0
    model = build_model(config, num_classes=10).eval()
    assert model.stages[0].blocks[0].mlp_tokens.fc1.weight.shape == (392, 196)  # the ImageNet weights' grid
    with torch.no_grad():
        assert model(torch.randn(1, 3, *image_size(config))).shape == (1, 10)


def test_class_selection_relabels_in_the_order_given():
    from visionmlp.data import DataError, build_dataset

    selected = build_dataset("digits", "train", None, classes=[7, "3"])
    assert selected.classes == ["7", "3"] and set(selected.targets) == {0, 1}
    full = build_dataset("digits", "train", None)
    assert len(selected) == sum(t in (3, 7) for t in full.targets)
    image, target = selected[selected.targets.index(1)]
    assert target == 1
    with pytest.raises(DataError, match="unknown"):
        build_dataset("digits", "train", None, classes=["12"])


def test_transfer_demo_prints_the_three_curves(tmp_path, capsys):
    assert main(["transfer-demo", "--output", str(tmp_path), "--pretrain-epochs", "1", "--epochs", "1",
                 "--img-size", "42"]) == 0
    out = capsys.readouterr().out
    assert "| epoch | fine-tuned from the digits 0-4 | linear probe (classifier only) | from scratch |" in out
    assert "classifier replaced: the checkpoint's has 5 classes, the model 5 other ones" in out
    assert {p.name for p in tmp_path.iterdir()} == {"pretrain", "fine-tuned", "linear-probe", "from-scratch"}
    # a value no run takes fails before the first run; the demonstration runs again over its own folders
    assert main(["transfer-demo", "--output", str(tmp_path / "bad"), "--epochs", "0"]) == 2
    assert "train.epochs must be positive" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["transfer-demo", "--output", str(tmp_path), "--pretrain-epochs", "1", "--epochs", "1",
                 "--img-size", "42"]) == 0
