"""The uint8-tensor input pipeline against timm's PIL one: the same augmentation in distribution, and the benchmark."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from visionmlp.cli import main
from visionmlp.config import build_config
from visionmlp.data import build_batch_transform, build_transform
from visionmlp.data.imagenet_like import write_imagenet_like
from visionmlp.data import opencv_ops
from visionmlp.data.datasets import decode_pil
from visionmlp.data.tensor_pipeline import NormalizeUint8, OnPIL, TensorRandomResizedCrop, decode_to_tensor
from visionmlp.engine.input_benchmark import report

DATA_CONFIG = {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 0.875,
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def imagenet_config(normalize_on: str = "worker", **aug) -> dict:
    config = build_config(None, None, {"data.dataset": "imagenet", "data.path": "unused", "model.name": "raft_mlp_s"})
    config["data"]["normalize_on"] = normalize_on
    config["aug"].update(aug)
    return config


def transforms(training: bool, normalize_on: str = "worker", **aug) -> dict[str, object]:
    config = imagenet_config(normalize_on, **aug)
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
    assert isinstance(steps[3], NormalizeUint8)  # ToTensor and Normalize in one pass
    functions = {op.name: op.aug_fn for op in steps[2].transform.ops}
    assert functions["Rotate"] is opencv_ops.rotate and functions["SharpnessIncreasing"] is opencv_ops.sharpness
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
    assert main(args + (["--zip", "--opts", "data.normalize_on", "worker"] if zipped else [])) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("train_images_per_s_per_worker", "val_images_per_s_per_worker",
                "baseline_train_images_per_s_per_worker", "baseline_val_images_per_s_per_worker"):
        assert result[key] > 0, key
    # val/ holds 2 of the 10 generated images: the figures say they are over those 2, not the 4 asked for
    assert result["pipeline"] == "tensor" and (result["train_images"], result["val_images"]) == (4, 2)
    table = report(result)
    assert "over 4 train and 2 val images" in table
    assert ("baseline (zip reader + PIL + timm)" if zipped else "baseline (ImageFolder + PIL + timm)") in table
    assert result["normalize_on"] == ("worker" if zipped else "device")
    assert len(list((root / "train").rglob("*.JPEG"))) == 10 and len(list((root / "val").rglob("*.JPEG"))) == 2
    assert (root / "train.zip").is_file() == zipped
    assert main(["benchmark", "--data", str(tmp_path / "missing"), "--model", "raft_mlp_s"]) == 2
    error = capsys.readouterr().err
    # the worker's error as it was raised, not wrapped in the data loader's traceback
    assert "is not a directory" in error and "Traceback" not in error and "worker process" not in error


def test_imagenet_like_images_have_imagenet_sizes(tmp_path):
    write_imagenet_like(tmp_path, 30, 0, seed=3)
    sizes = [Image.open(path).size for path in (tmp_path / "train").rglob("*.JPEG")]
    assert np.median([max(s) for s in sizes]) == 500
    assert 60_000 < np.mean([p.stat().st_size for p in (tmp_path / "train").rglob("*.JPEG")]) < 160_000


def encoded(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_decoding_gives_pils_pixels_and_fails_as_pil_does():
    photo = Image.fromarray(np.random.default_rng(4).integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize(
        (200, 150), Image.BICUBIC)
    for data in (encoded(photo, quality=90), encoded(photo, quality=75, progressive=True),
                 encoded(photo, subsampling=0), encoded(photo.convert("L")), encoded(photo, "PNG")):
        pixels = decode_to_tensor(data)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 150, 200)
        assert torch.equal(pixels, torch.from_numpy(np.array(decode_pil(data))).permute(2, 0, 1))
    # CMYK files (ImageNet holds a few, of Adobe's inverted kind, which PIL writes too): libjpeg-turbo converts them to
    # RGB itself, rounding otherwise than PIL by at most a level
    cmyk = encoded(photo.convert("CMYK"))
    expected = torch.from_numpy(np.array(decode_pil(cmyk))).permute(2, 0, 1)
    assert (decode_to_tensor(cmyk).int() - expected.int()).abs().max() <= 1
    with pytest.raises(OSError, match="truncated"):
        decode_to_tensor(encoded(photo)[:2000])


def photo_224(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).resize((224, 224), Image.BICUBIC)


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
def test_normalising_on_the_device_gives_the_workers_pixels(pipeline):
    # data.normalize_on: device -- workers hand over uint8 images, normalised and erased on the device a batch at a
    # time, as timm's prefetcher does -- against normalising in each worker
    aug = dict(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5, remode="pixel", color_jitter=0.4)
    photos = [photo_224(seed) for seed in range(6)]
    for training in (False, True):
        in_worker = transforms(training, "worker", **aug)[pipeline]
        on_device = transforms(training, "device", **aug)[pipeline]
        batch_transform = build_batch_transform(imagenet_config("device", **aug), DATA_CONFIG, training,
                                                torch.device("cpu"))
        samples = [seeded(on_device, photo, seed) for seed, photo in enumerate(photos)]
        assert all(s.dtype == torch.uint8 and s.shape == (3, 64, 64) for s in samples)
        if not training:
            expected = torch.stack([in_worker(photo) for photo in photos])
            got = batch_transform(torch.stack(samples))
        else:  # one image a batch, so that the erasing draws follow the image's own, as in a worker
            expected = torch.stack([seeded(in_worker, photo, seed) for seed, photo in enumerate(photos)])
            got = []
            for seed, photo in enumerate(photos):
                image = seeded(on_device, photo, seed)
                got.append(batch_transform(image[None])[0])
            got = torch.stack(got)
            normalised = build_batch_transform(imagenet_config("device"), DATA_CONFIG, False, torch.device("cpu"))
            erased = (got != normalised(torch.stack(samples))).flatten(1).any(1)
            assert erased.any() and not erased.all()  # some of the images, as reprob 0.5 draws
        # the same arithmetic as the worker's (tensor pipeline), or timm's ToTensor + Normalize within rounding (pil)
        torch.testing.assert_close(got, expected, rtol=0, atol=0 if pipeline == "tensor" else 1e-5)
    with pytest.raises(TypeError, match="uint8"):
        batch_transform(got)


GEOMETRY = [("rotate", 23.7), ("shear_x", 0.21), ("shear_y", -0.27), ("translate_x_rel", 0.31),
            ("translate_y_rel", -0.13), ("translate_x_abs", 17.0), ("translate_y_abs", -40.5)]


@pytest.mark.parametrize("name,level", GEOMETRY)
def test_opencv_geometry_ops_sample_as_pils(name, level):
    from timm.data import auto_augment

    fill = (124, 116, 104)
    for resample, interior_mean, interior_max in ((Image.NEAREST, 0.0, 0), (Image.BILINEAR, 1.0, 3),
                                                  (Image.BICUBIC, 2.0, 40)):
        for seed in range(3):
            image = photo_224(seed)
            ours = np.asarray(getattr(opencv_ops, name)(image, level, fillcolor=fill, resample=resample)).astype(int)
            pil = np.asarray(getattr(auto_augment, name)(image, level, fillcolor=fill, resample=resample)).astype(int)
            # away from the fill border, where OpenCV blends the edge pixels with the fill and PIL does not
            filled = (pil == fill).all(-1) | (ours == fill).all(-1)
            interior = ~np.asarray(Image.fromarray(filled).filter(ImageFilter.MaxFilter(5)))
            difference = np.abs(ours - pil)[interior]
            assert interior.mean() > 0.5
            if resample == Image.NEAREST and name != "rotate":
                assert difference.max() == 0
            else:  # rotation's nearest neighbour differs where a sample falls on a pixel edge, in floating point
                assert difference.mean() < max(interior_mean, 0.01) and np.percentile(difference, 99) <= interior_max


def test_opencv_sharpness_equals_pils_and_ops_draw_what_timms_draw():
    from timm.data import auto_augment

    image = photo_224(5)
    for factor in (0.1, 0.5, 1.0, 1.9):
        assert np.array_equal(np.asarray(opencv_ops.sharpness(image, factor)),
                              np.asarray(auto_augment.sharpness(image, factor)))
    # a random filter choice is drawn from the same stream as timm's, so the draws after it stay in step
    resample = (Image.BILINEAR, Image.BICUBIC)
    states = []
    for module in (opencv_ops, auto_augment):
        random.seed(7)
        module.rotate(image, 10.0, fillcolor=(0, 0, 0), resample=resample)
        states.append(random.random())
    assert states[0] == states[1]
    with pytest.raises(ValueError, match="data.pipeline: pil"):
        opencv_ops.rotate(image, 10.0, resample=Image.LANCZOS)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w3", "original", "v0"])
def test_every_auto_augment_policy_runs_with_opencv_ops(policy):
    from timm.data import auto_augment

    built = transforms(True, auto_augment=policy)
    (on_pil,) = [step for step in built["tensor"].transforms if isinstance(step, OnPIL)]
    ops = list(opencv_ops.augment_ops(on_pil.transform))
    assert ops and not any(op.aug_fn in opencv_ops.OPENCV_OPS for op in ops)  # each one with a form here switched
    assert any(op.aug_fn in opencv_ops.OPENCV_OPS.values() for op in ops)
    assert not any(op.aug_fn in opencv_ops.OPENCV_OPS.values() for op in opencv_ops.augment_ops(
        next(getattr(step, "transform", step) for step in built["pil"].transforms
             if list(opencv_ops.augment_ops(getattr(step, "transform", step))))))  # timm's pipeline left on PIL
    torch.manual_seed(0)
    random.seed(0)
    for seed in range(8):
        assert built["tensor"](photo_224(seed)).shape == (3, 64, 64)
    assert auto_augment.NAME_TO_OP["Rotate"] is auto_augment.rotate


def test_loader_workers_run_the_pipeline_after_this_process_has(tmp_path):
    # a worker forked after OpenCV's thread pool had run here deadlocked when it tried to resize that pool
    from visionmlp.data import build_dataset, build_loader

    write_imagenet_like(tmp_path, 8, 0, classes=2, seed=1)
    built = transforms(True, auto_augment="rand-m9-mstd0.5-inc1")
    for seed in range(4):  # the OpenCV ops, here
        seeded(built["tensor"], photo_224(seed), seed)
    dataset = build_dataset("imagenet", "train", built["tensor"], data_path=tmp_path)
    loader = build_loader(dataset, training=True, batch_size=4, workers=2)
    loader.timeout = 120  # a hung worker fails the test instead of the suite
    batches = list(loader)
    assert [images.shape for images, _, skipped in batches] == [(4, 3, 64, 64)] * 2
