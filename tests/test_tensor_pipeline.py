"""The uint8-tensor input pipeline against timm's PIL one: the same augmentation in distribution, and the benchmark."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from visionmlp.cli import main
from visionmlp.config import build_config
from visionmlp.data import build_transform
from visionmlp.data.imagenet_like import write_imagenet_like
from visionmlp.data.tensor_pipeline import OnPIL, TensorRandomResizedCrop

DATA_CONFIG = {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 0.875,
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def transforms(training: bool, **aug) -> dict[str, object]:
    config = build_config(None, None, {"data.dataset": "imagenet", "data.path": "unused", "model.name": "raft_mlp_s"})
    config["aug"].update(aug)
    built = {}
    for pipeline in ("pil", "tensor"):
        config["data"]["pipeline"] = pipeline
        built[pipeline] = build_transform(config, DATA_CONFIG, training)
    return built


def coordinate_image(width: int = 300, height: int = 200) -> Image.Image:
    """Red = column, green = row, each scaled to 0-255: a crop's extent can be read back from its pixels."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def seeded(transform, image, seed: int) -> torch.Tensor:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


def test_the_tensor_pipeline_is_timms_with_tensor_steps():
    built = transforms(True, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    steps = built["tensor"].transforms
    assert isinstance(steps[0], TensorRandomResizedCrop) and isinstance(steps[2], OnPIL)
    timm_crop = built["pil"].transforms[0]  # timm's own sampler, with its scale and ratio
    assert type(steps[0].crop) is type(timm_crop) and (steps[0].crop.scale, steps[0].crop.ratio) == (
        timm_crop.scale, timm_crop.ratio)
    assert built["tensor"](coordinate_image()).shape == built["pil"](coordinate_image()).shape == (3, 64, 64)


def test_same_seed_same_crop_and_policy_pixels_within_resampling_rounding():
    # the tensor pipeline draws the same random numbers in the same order as timm's: equal seeds, nearly equal output
    built = transforms(True, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, color_jitter=0.4)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)).resize(
        (480, 360), Image.BICUBIC)
    differences = [(seeded(built["pil"], image, s) - seeded(built["tensor"], image, s)).abs().mean().item()
                   for s in range(40)]
    assert np.median(differences) < 0.01  # normalised units: about half a grey level
    built = transforms(False)
    torch.testing.assert_close(built["tensor"](image), built["pil"](image), atol=0.05, rtol=0)


def test_crop_scale_aspect_and_colour_statistics_match_timms():
    from scipy.stats import ks_2samp

    # the crop alone, over timm's default range: its extent is read back from the pixels
    built = transforms(True, hflip=0.0, color_jitter=0.0, scale=[0.08, 1.0])
    image = coordinate_image()
    mean, std = torch.tensor(DATA_CONFIG["mean"])[:, None, None], torch.tensor(DATA_CONFIG["std"])[:, None, None]
    stats = {}
    for pipeline, transform in built.items():
        torch.manual_seed(1)
        random.seed(1)  # another stream than the other pipeline's: the distributions, not the draws, are compared
        scales, aspects = [], []
        for _ in range(300):
            pixels = transform(image) * std + mean
            width = (pixels[0].amax() - pixels[0].amin()).item() * 300
            height = (pixels[1].amax() - pixels[1].amin()).item() * 200
            scales.append(width * height / (300 * 200))
            aspects.append(np.log(width / height))
        stats[pipeline] = np.array(scales), np.array(aspects)
    for i in range(2):
        assert ks_2samp(stats["pil"][i], stats["tensor"][i] * 1.0).pvalue > 0.01

    built = transforms(True, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, color_jitter=0.4)
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize(
        (320, 240), Image.BICUBIC)
    colour = {}
    for seed, (pipeline, transform) in enumerate(built.items()):
        torch.manual_seed(seed)
        random.seed(seed)
        outputs = torch.stack([transform(photo) for _ in range(300)])
        colour[pipeline] = outputs.mean((2, 3)), outputs.std((2, 3))
    for i in range(2):
        for channel in range(3):
            assert ks_2samp(colour["pil"][i][:, channel], colour["tensor"][i][:, channel]).pvalue > 0.01


@pytest.mark.parametrize("zipped", [False, True])
def test_benchmark_data_reports_per_worker_images_per_second(tmp_path, capsys, zipped):
    root = tmp_path / "imagenet"
    args = ["benchmark", "--data", str(root), "--generate", "10", "--images", "4", "--rounds", "1",
            "--model", "raft_mlp_s", "--json"]
    assert main(args + (["--zip"] if zipped else [])) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("train_images_per_s_per_worker", "val_images_per_s_per_worker",
                "baseline_train_images_per_s_per_worker", "baseline_val_images_per_s_per_worker"):
        assert result[key] > 0, key
    assert result["pipeline"] == "tensor" and result["images"] == 4
    assert len(list((root / "train").rglob("*.JPEG"))) == 10 and len(list((root / "val").rglob("*.JPEG"))) == 2
    assert (root / "train.zip").is_file() == zipped
    assert main(["benchmark", "--data", str(tmp_path / "missing"), "--model", "raft_mlp_s"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_imagenet_like_images_have_imagenet_sizes(tmp_path):
    write_imagenet_like(tmp_path, 30, 0, seed=3)
    sizes = [Image.open(path).size for path in (tmp_path / "train").rglob("*.JPEG")]
    assert np.median([max(s) for s in sizes]) == 500
    assert 60_000 < np.mean([p.stat().st_size for p in (tmp_path / "train").rglob("*.JPEG")]) < 160_000
