"""Configuration: defaults -> recipe -> --opts -> flags, type coercion and clear errors."""

from __future__ import annotations

import pytest

from visionmlp.config import ConfigError, build_config, family_recipe, load_recipe, parse_opts, shipped_recipes


def test_no_arguments_resolve_to_the_digits_recipe():
    config = build_config()
    assert config["data"]["dataset"] == "digits"
    assert config["model"]["name"] == "vip_s7"
    assert config["data"]["img_size"] == 28
    assert config["aug"]["hflip"] == 0.0


def test_opts_are_coerced_to_the_type_of_the_default():
    config = build_config(opts=parse_opts([
        "train.epochs", "3", "train.base_lr", "1e-3", "aug.scale", "[0.5, 1.0]", "train.ema", "true",
        "model.kwargs", "{depths: [1, 1, 1, 1]}", "data.dataset", "folder", "data.path", "123",
        "train.clip_grad", "null",
    ]))
    assert config["train"]["epochs"] == 3
    assert config["train"]["base_lr"] == pytest.approx(1e-3) and isinstance(config["train"]["base_lr"], float)
    assert config["aug"]["scale"] == [0.5, 1.0]
    assert config["train"]["ema"] is True
    assert config["model"]["kwargs"] == {"depths": [1, 1, 1, 1]}
    assert config["data"]["path"] == "123"  # paths stay text
    assert config["train"]["clip_grad"] is None


def test_flags_win_over_opts_and_recipe():
    config = build_config(opts={"train.epochs": "7"}, flags={"train.epochs": 2, "data.batch_size": 8})
    assert config["train"]["epochs"] == 2
    assert config["data"]["batch_size"] == 8


def test_a_data_path_with_the_built_in_digits_is_an_error(tmp_path, capsys):
    from visionmlp.cli import main

    assert main(["train", "--data-path", str(tmp_path), "--output", str(tmp_path / "run")]) == 2
    assert (f"--dataset digits is built in and reads no files, so --data-path (data.path) {str(tmp_path)!r} would be "
            "ignored: pass --dataset folder to read a train/ and val/ tree of class folders there") in \
        capsys.readouterr().err
    # a recorded run's path, of the data set it was trained on, is not the user's: evaluating it on the digits is not
    # refused for it
    recorded = build_config(flags={"data.dataset": "folder", "data.path": str(tmp_path)})
    assert build_config(flags={"data.dataset": "digits"}, base=recorded)["data"]["dataset"] == "digits"


def test_family_recipe_is_picked_from_the_model_with_drop_path_per_variant():
    config = build_config(flags={"model.name": "ms_mlp_small", "data.dataset": "imagenet", "data.path": "/x"})
    assert config["train"]["lr_base_batch"] == 512
    assert config["aug"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert config["model"]["drop_path_rate"] == 0.4
    config = build_config(flags={"model.name": "ms_mlp_small", "data.dataset": "imagenet", "data.path": "/x",
                                 "model.drop_path_rate": 0.2})
    assert config["model"]["drop_path_rate"] == 0.2


def test_raft_mlp_ablations_train_with_the_official_settings_of_each():
    imagenet = {"data.dataset": "imagenet", "data.path": "/x"}
    config = build_config(flags={"model.name": "raft_mlp_org_mixer", **imagenet})
    assert family_recipe("raft_mlp_org_mixer") == "raft_mlp"
    assert (config["data"]["batch_size"], config["train"]["base_lr"], config["train"]["lr_base_batch"]) == (
        256, 2e-3, 2048)  # imagenet-org-mixer.yaml: global batch 2048, lr 2e-3 (8 processes)
    assert config["model"]["drop_path_rate"] == 0.1 and config["train"]["epochs"] == 305
    # imagenet-raft-mlp-deep.yaml: global batch 1536, lr 1.5e-3; its own recipe is picked for it
    assert family_recipe("raft_mlp_deep") == "raft_mlp_deep"
    config = build_config(flags={"model.name": "raft_mlp_deep", **imagenet})
    assert (config["data"]["batch_size"], config["train"]["base_lr"], config["train"]["lr_base_batch"]) == (
        192, 1.5e-3, 1536)
    assert config["model"]["drop_path_rate"] == 0.1 and config["train"]["epochs"] == 305
    deep, family = load_recipe("raft_mlp_deep"), load_recipe("raft_mlp")
    for section in ("aug", "train", "data"):  # otherwise the family's recipe
        differs = {k for k in family[section] if deep[section].get(k) != family[section][k]}
        assert differs <= {"batch_size", "base_lr", "lr_base_batch"}, section


@pytest.mark.parametrize("recipe", ["ms_mlp", "vip", "strip_mlp", "raft_mlp", "raft_mlp_deep", "repmlpnet"])
def test_shipped_imagenet_recipes_validate(recipe):
    assert recipe in shipped_recipes()
    config = build_config(recipe, flags={"data.path": "/data/imagenet"})
    assert config["data"]["dataset"] == "imagenet"
    assert config["train"]["optimizer"] == "adamw"
    assert config["train"]["epochs"] >= 100
    assert set(load_recipe(recipe)["model"]["drop_path_by_variant"]) <= {
        n for n in __import__("visionmlp").list_models()}


@pytest.mark.parametrize("opts, message", [
    (["train.epoch", "3"], "did you mean train.epochs"),
    (["train.epochs", "many"], "train.epochs must be of type int"),
    (["train.amp", "O1"], "train.amp must be one of auto, none, fp16, bf16"),
    (["data.batch_size", "0"], "data.batch_size must be positive"),
    (["data.dataset", "imagenet"], "needs --data-path"),
    (["train.epochs"], "KEY VALUE pairs"),
    (["train.clip_grad", "-1"], "train.clip_grad must be positive, or null"),  # a negative norm ascends
    (["model.drop_path_rate", "1.5"], r"model.drop_path_rate must be in \[0, 1\)"),
    (["data.max_train_images", "0"], "data.max_train_images must be positive"),
])
def test_bad_overrides_fail_with_a_clear_message(opts, message):
    with pytest.raises(ConfigError, match=message):
        build_config(opts=parse_opts(opts))


def test_a_recipe_that_is_not_yaml_names_its_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"(?s)broken.yaml' is not valid YAML.*line 2, column 11"):
        build_config(recipe)


def test_a_key_given_twice_in_a_recipe_is_named_with_its_lines(tmp_path, capsys):
    from visionmlp.cli import main

    recipe = tmp_path / "twice.yaml"
    recipe.write_text("train:\n  epochs: 3\n  base_lr: 1.0e-3\n  epochs: 5\n")
    assert main(["train", "--cfg", str(recipe), "--output", str(tmp_path / "run")]) == 2
    assert (f"recipe {str(recipe)!r}: key 'epochs' is given twice, on lines 2 and 4 (only the last would count): "
            "remove one") in capsys.readouterr().err
    # a merge key brings in keys that the mapping may then set again: that is no repeat
    recipe.write_text("base: &base {epochs: 3, base_lr: 1.0e-3}\ntrain:\n  <<: *base\n  epochs: 5\n")
    assert load_recipe(recipe)["train"] == {"epochs": 5, "base_lr": 1e-3}


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="digits"):
        build_config("no_such_recipe")


FINE_TUNING_RECIPES = {
    "raft_mlp_cifar10": ("cifar10", 224), "raft_mlp_cifar100": ("cifar100", 224),
    "raft_mlp_flowers102": ("flowers102", [256, 224]), "raft_mlp_stanford_cars": ("stanford_cars", [256, 224]),
    "raft_mlp_inat2018": ("inat2018", [256, 224]), "raft_mlp_inat2019": ("inat2019", [256, 224]),
    "strip_mlp_cifar10": ("cifar10", 224), "strip_mlp_cifar100": ("cifar100", 224),
    "strip_mlp_caltech101": ("caltech101", 224), "vip_cifar10": ("cifar10", 224), "vip_cifar100": ("cifar100", 224),
}


@pytest.mark.parametrize("recipe", FINE_TUNING_RECIPES)
def test_shipped_fine_tuning_recipes_validate_for_every_variant_of_their_family(recipe):
    import visionmlp

    dataset, img_size = FINE_TUNING_RECIPES[recipe]
    family = recipe.rsplit("_", 1)[0]
    assert recipe in shipped_recipes()
    for variant in visionmlp.list_models(family):
        config = build_config(recipe, flags={"data.path": "/data", "model.name": variant})
        assert config["data"]["dataset"] == dataset and config["data"]["img_size"] == img_size
        assert config["model"]["dynamic_img_size"] == (img_size != 224)  # RaftMLP at 256 x 224 keeps its grid
    if family == "raft_mlp":
        train = build_config(recipe, flags={"data.path": "/data"})["train"]
        assert (train["optimizer"], train["base_lr"], train["min_lr"], train["weight_decay"], train["epochs"],
                train["warmup_epochs"]) == ("adamw", 1e-4, 1e-5, 1e-4, 50, 10)
    if family == "vip":
        assert build_config(recipe, flags={"data.path": "/data"})["train"]["backbone_lr_scale"] == 0.01


def test_dynamic_img_size_is_raft_mlps_alone(tmp_path, capsys):
    from visionmlp.cli import main

    assert main(["train", "--model", "vip_s7", "--epochs", "1", "--output", str(tmp_path), "--opts",
                 "model.dynamic_img_size", "true"]) == 2
    assert "model.dynamic_img_size is RaftMLP's" in capsys.readouterr().err
