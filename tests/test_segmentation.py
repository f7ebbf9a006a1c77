"""visionmlp segment: data layouts, networks on every family, the metrics, train / eval / predict end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from visionmlp.cli import error_message, main
from visionmlp.config import ConfigError
from visionmlp.detection.config import build_config as build_detection_config
from visionmlp.segmentation.config import build_config
from visionmlp.segmentation.data import ADE20K, IGNORE_INDEX, SegmentationFolder, Shapes, TrainTransform
from visionmlp.segmentation.engine import predict_logits, sliding_windows
from visionmlp.segmentation.metrics import ConfusionMatrix
from visionmlp.segmentation.model import build_segmenter

# one reduced variant per family, small enough for a CPU test at 64 px
TINY = {
    "ms_mlp_tiny": {"embed_dim": 20, "depths": [1, 1, 1, 1]},
    "vip_s7": {"depths": [1, 1, 1, 1], "embed_dims": [32, 64, 64, 64], "num_segments": [4, 4, 4, 4]},
    "strip_mlp_tiny_light": {"embed_dim": 16, "depths": [1, 1, 1, 1]},
    "raft_mlp_s": {"embed_dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1]},
    "repmlpnet_t224": {"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]},
    "raft_mlp_org_mixer": {"embed_dims": [32], "depths": [6]},  # one level at stride 16: four taps resampled
}
DEMO = ["--opts", "model.kwargs", "{embed_dims: [16, 32, 48, 64], depths: [1, 1, 1, 1]}",
        "data.max_train_images", "16", "data.max_val_images", "6", "data.workers", "0", "train.iterations", "4",
        "train.eval_interval", "2", "print_freq", "2", "data.batch_size", "4"]


def model_cfg(name: str, decoder: str, **extra) -> dict:
    return dict(name=name, decoder=decoder, kwargs=TINY[name], drop_path_rate=0.0, dynamic_img_size=False,
                simple_pyramid_channels=32, decoder_channels=32, dropout=0.1, **extra)


def write_pair(image_path, mask_path, labels: np.ndarray) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(labels.size)
    Image.fromarray(rng.integers(0, 255, (*labels.shape, 3), dtype=np.uint8)).save(image_path)
    Image.fromarray(labels.astype(np.uint8)).save(mask_path)


def test_ade20k_layout_ignores_label_zero_and_shifts_the_rest(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    labels = np.array([[0, 1], [150, 2]])
    for part in ("training", "validation"):
        write_pair(root / "images" / part / "ADE_1.jpg", root / "annotations" / part / "ADE_1.png", labels)
    dataset = ADE20K(tmp_path, "val")
    assert len(dataset.classes) == 150
    _, mask = dataset[0]
    assert np.array(mask).tolist() == [[IGNORE_INDEX, 0], [149, 1]]
    with pytest.raises(ValueError, match="--num-classes"):
        ADE20K(tmp_path, "train", num_classes=10)[0]


def test_folder_layout_and_its_errors(tmp_path):
    write_pair(tmp_path / "images" / "train" / "a.png", tmp_path / "masks" / "train" / "a.png", np.array([[0, 2]]))
    assert np.array(SegmentationFolder(tmp_path, "train", 3)[0][1]).tolist() == [[0, 2]]
    with pytest.raises(ValueError, match=f"{tmp_path / 'masks' / 'train' / 'a.png'}: the mask holds class 2 but "
                                         "--num-classes is 2"):
        SegmentationFolder(tmp_path, "train", 2)[0]
    (tmp_path / "images" / "train" / "b.jpg").write_bytes((tmp_path / "images" / "train" / "a.png").read_bytes())
    with pytest.raises(FileNotFoundError, match="no mask"):
        SegmentationFolder(tmp_path, "train", 3)
    with pytest.raises(FileNotFoundError, match="expected the folder"):
        SegmentationFolder(tmp_path, "val", 3)
    with pytest.raises(ConfigError, match="--num-classes"):
        build_config(opts={"data.dataset": "folder", "data.path": str(tmp_path)})


def folder_of_pairs(root, count: int = 2, size: int = 32) -> None:
    """``count`` image and mask pairs, ``size`` px a side (classes 0..2), in both splits of a folder set at ``root``."""
    labels = np.indices((size, size)).sum(0) % 3
    for split in ("train", "val"):
        for i in range(count):
            write_pair(root / "images" / split / f"{i}.png", root / "masks" / split / f"{i}.png", labels)


FOLDER_RUN = ["--dataset", "folder", "--num-classes", "3", "--workers", "0", "--opts", "model.kwargs",
              "{embed_dims: [16, 32, 48, 64], depths: [1, 1, 1, 1]}", "data.crop_size", "[32, 32]", "data.scale",
              "[32, 32]", "data.batch_size", "2", "train.iterations", "2", "train.eval_interval", "2"]


def test_a_mask_of_another_size_than_its_image_is_named_with_both(tmp_path, capsys):
    folder_of_pairs(tmp_path / "data")
    image, mask = tmp_path / "data" / "images" / "train" / "1.png", tmp_path / "data" / "masks" / "train" / "1.png"
    Image.fromarray(np.zeros((48, 32), np.uint8)).save(mask)  # 32 wide, 48 high; its image is 32 x 32
    expected = f"the mask {mask} is 32x48 but its image {image} is 32x32 (width x height)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        SegmentationFolder(tmp_path / "data", "train", 3)[1]
    assert main(["segment", "train", "--data-path", str(tmp_path / "data"), "--output", str(tmp_path / "run"),
                 *FOLDER_RUN]) == 2
    err = capsys.readouterr().err
    assert f"error: {expected}" in err and "Traceback" not in err


def test_an_unreadable_image_is_named_even_from_a_loader_worker(tmp_path, capsys):
    folder_of_pairs(tmp_path / "data")
    broken = tmp_path / "data" / "images" / "train" / "0.png"
    broken.write_bytes(b"not a png")
    dataset = SegmentationFolder(tmp_path / "data", "train", 3)
    with pytest.raises(ValueError, match=f"could not read {broken}: cannot identify image file"):
        dataset[0]
    # a worker's error reaches the main process with the worker's traceback as its text: the command prints the message
    with pytest.raises(ValueError) as raised:
        next(iter(torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=lambda b: b)))
    message = error_message(raised.value)
    assert message.startswith(f"could not read {broken}: ") and "\n" not in message
    assert main(["segment", "train", "--data-path", str(tmp_path / "data"), "--output", str(tmp_path / "run"),
                 *FOLDER_RUN]) == 2
    err = capsys.readouterr().err
    assert f"error: could not read {broken}" in err and "Traceback" not in err


@pytest.mark.parametrize("count", ["-3", "1"])
def test_num_classes_below_two_is_refused(tmp_path, capsys, count):
    assert main(["segment", "train", "--num-classes", count, "--output", str(tmp_path / "run")]) == 2
    assert (f"error: data.num_classes (--num-classes) must be a whole number of at least 2, or null for the data "
            f"set's own count; got {count}") in capsys.readouterr().err
    for value in (0, 2.5):
        with pytest.raises(ConfigError, match=f"got {value}"):
            build_config(opts={"data.num_classes": value})


@pytest.mark.parametrize("build", [build_config, build_detection_config], ids=["segment", "detect"])
def test_another_model_than_the_recipes_drops_the_recipes_backbone_settings(build):
    demo = build(None, {}, {})
    assert demo["model"]["name"] == "raft_mlp_s"
    for name in ("ms_mlp_tiny", "vip_s7", "strip_mlp_tiny"):  # the demo's kwargs are a reduced RaftMLP's
        assert build(None, {}, {"model.name": name})["model"]["kwargs"] == {}
    kept = {"model.kwargs": {"embed_dim": 48}}
    assert build(None, kept, {"model.name": "ms_mlp_tiny"})["model"]["kwargs"] == {"embed_dim": 48}
    recipe = "segment_ade20k_upernet" if build is build_config else "detect_retinanet_coco"
    data = {"data.path": "/data"}
    assert build(recipe, {}, data)["model"]["dynamic_img_size"]  # RaftMLP at every size, as its authors' code
    assert build(recipe, {}, {**data, "model.name": "raft_mlp_m"})["model"]["dynamic_img_size"]
    for name in ("strip_mlp_tiny", "vip_s7"):  # grid-bound backbones are built for the crop instead
        assert not build(recipe, {}, {**data, "model.name": name})["model"]["dynamic_img_size"]


def test_shapes_are_deterministic_and_labelled():
    first, again = Shapes("train")[3], Shapes("train")[3]
    assert np.array_equal(np.array(first[0]), np.array(again[0]))
    assert set(np.unique(np.array(first[1]))) <= {0, 1, 2, 3} and np.array(first[1]).max() > 0


def test_train_transform_crops_pads_and_limits_one_class():
    transform = TrainTransform((48, 64), (40, 30), (1.0, 1.0), 0.75, 0.0, True)
    image, mask = transform(*Shapes("train")[0])
    assert image.shape == (3, 48, 64) and mask.shape == (48, 64) and mask.dtype == torch.int64
    assert (mask[40:] == IGNORE_INDEX).all()  # padded below the 40-pixel-high resized image


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("decoder", ["fpn", "upernet"])
def test_each_decoder_on_each_family_runs_forward_and_backward(name, decoder):
    torch.manual_seed(0)
    size = (56, 56) if name.startswith("vip") else (64, 64)
    model = build_segmenter(model_cfg(name, decoder), 5, size)
    images = torch.randn(2, 3, *size)
    logits = model(images)
    assert logits.shape == (2, 5, *size)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 5, (2, *size))).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_grid_bound_backbone_pads_smaller_images_and_refuses_larger():
    model = build_segmenter(model_cfg("strip_mlp_tiny_light", "fpn"), 3, (64, 64)).eval()
    assert model(torch.randn(1, 3, 40, 52)).shape == (1, 3, 40, 52)
    with pytest.raises(ValueError, match="larger img_size"):
        model(torch.randn(1, 3, 96, 64))
    # sliding 64 x 64 windows cover an image larger than the crop, and equal one pass where one window covers it
    assert predict_logits(model, torch.randn(3, 100, 70), "auto", (64, 64), (40, 40)).shape == (3, 100, 70)
    image = torch.randn(3, 60, 64)
    torch.testing.assert_close(predict_logits(model, image, "slide", (64, 64), (40, 40)),
                               predict_logits(model, image, "whole", (64, 64), (40, 40)))


def test_raftmlp_with_dynamic_img_size_segments_any_size_whole():
    model = build_segmenter(model_cfg("raft_mlp_s", "fpn") | {"dynamic_img_size": True}, 3, (64, 64)).eval()
    assert not model.backbone.fixed_size
    assert predict_logits(model, torch.randn(3, 100, 70), "auto", (64, 64), (40, 40)).shape == (3, 100, 70)


def test_backbone_from_a_classification_checkpoint_trained_at_another_size(tmp_path):
    import visionmlp

    classifier = visionmlp.create_model("strip_mlp_tiny_light", img_size=32, num_classes=7,
                                        **TINY["strip_mlp_tiny_light"])
    torch.save({"model": classifier.state_dict()}, tmp_path / "classifier.pt")
    model = build_segmenter(model_cfg("strip_mlp_tiny_light", "fpn"), 3, (64, 64), tmp_path / "classifier.pt")
    assert any("resampled" in note for note in model.backbone.loaded)
    stem = "stem.proj.weight" if "stem.proj.weight" in classifier.state_dict() else next(iter(classifier.state_dict()))
    torch.testing.assert_close(model.backbone.body.state_dict()[stem], classifier.state_dict()[stem])


def test_dynamic_raftmlp_keeps_the_grid_of_its_imagenet_checkpoint(tmp_path):
    import visionmlp

    torch.save({"model": visionmlp.create_model("raft_mlp_s", **TINY["raft_mlp_s"]).state_dict()}, tmp_path / "in.pt")
    dynamic = model_cfg("raft_mlp_s", "fpn") | {"dynamic_img_size": True}
    model = build_segmenter(dynamic, 3, (64, 64), tmp_path / "in.pt")
    assert model.backbone.body.img_size == (224, 224)  # the checkpoint's grid, not the crop's
    assert model.eval()(torch.randn(1, 3, 64, 80)).shape == (1, 3, 64, 80)


def test_sliding_windows_cover_the_image_flush_with_its_edges():
    windows = sliding_windows(100, 70, (64, 64), (40, 40))
    covered = torch.zeros(100, 70)
    for top, left, bottom, right in windows:
        assert bottom - top == 64 and right - left == 64
        covered[top:bottom, left:right] = 1
    assert covered.all() and len(windows) == 4


def test_metrics_on_a_known_confusion_match_torchmetrics():
    label = torch.tensor([0, 0, 0, 1, 1, 2, IGNORE_INDEX, 3])
    prediction = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
    confusion = ConfusionMatrix(5)
    confusion.update(prediction, label)
    # IoU: class 0 2/(3+1) = 0.5, class 1 1/(2+1+... ) = 1/3, class 2 1/2, class 3 0; class 4 absent (left out)
    expected_iou = (0.5 + 1 / 3 + 0.5 + 0.0) / 4
    metrics = confusion.compute()
    assert metrics["mIoU"] == pytest.approx(expected_iou * 100)
    assert metrics["mAcc"] == pytest.approx((2 / 3 + 1 / 2 + 1 + 0) / 4 * 100)
    assert metrics["aAcc"] == pytest.approx(4 / 7 * 100)
    jaccard = MulticlassJaccardIndex(num_classes=4, ignore_index=IGNORE_INDEX, average="macro")
    assert float(jaccard(prediction, label)) * 100 == pytest.approx(metrics["mIoU"])


def test_train_eval_predict_end_to_end(tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["segment", "train", "--output", str(output), *DEMO]) == 0
    logged = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [2, 4]
    capsys.readouterr()
    assert main(["segment", "eval", "--checkpoint", str(output / "last.pt"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured == {k: logged[-1][f"val_{k}"] for k in ("mIoU", "mAcc", "aAcc")}

    # resume continues from the last evaluation to the new end
    assert main(["segment", "train", "--output", str(output), "--resume", "auto", *DEMO[:-6],
                 "train.iterations", "6", "train.eval_interval", "2", "data.batch_size", "4"]) == 0
    assert [json.loads(line)["iteration"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]

    image = tmp_path / "scene.png"
    Shapes("val")[0][0].resize((80, 72)).save(image)
    capsys.readouterr()
    assert main(["segment", "predict", "--checkpoint", str(output / "last.pt"), str(image), "--output",
                 str(tmp_path / "drawn"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    drawn = Image.open(result["output"])
    assert drawn.size == (80, 72) and sum(result["classes"].values()) == pytest.approx(100, abs=0.1)

    # exported: ONNX and a torch.export program, each checked inside the command on a batch of another size
    for suffix in ("onnx", "pt2"):
        assert main(["segment", "export", "--checkpoint", str(output / "last.pt"), "--output",
                     str(tmp_path / f"segmenter.{suffix}"), "--json"]) == 0
        exported = json.loads(capsys.readouterr().out)
        assert exported["img_size"] == [64, 64] and exported["max_abs_diff"] < 1e-4
    program = torch.export.load(str(tmp_path / "segmenter.pt2")).module()
    assert program(torch.randn(3, 3, 64, 64)).shape == (3, len(exported["classes"]), 64, 64)
    assert main(["segment", "export", "--checkpoint", str(output / "last.pt"), "--output",
                 str(tmp_path / "segmenter.onnx"), "--img-size", "96"]) == 2  # the backbone was built for 64
    assert "does not fit the 64x64 input" in capsys.readouterr().err


def test_two_process_torchrun_logs_what_eval_measures(tmp_path, capsys):
    from test_train import torchrun_train

    output = tmp_path / "ddp"
    result = torchrun_train("--output", str(output), *DEMO, command=("segment", "train"))
    assert result.stdout.count("iteration 4/4: train loss") == 1  # only rank 0 logs
    logged = json.loads((output / "metrics.jsonl").read_text().splitlines()[-1])
    # each rank's last step updates its own BatchNorm statistics: the evaluation must use those rank 0 saves
    assert main(["segment", "eval", "--checkpoint", str(output / "last.pt"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured == {k: logged[f"val_{k}"] for k in ("mIoU", "mAcc", "aAcc")}


def test_predict_names_each_drawing_apart_where_stems_repeat(tmp_path, capsys):
    from visionmlp.segmentation.engine import crop_size

    config = build_config(opts={"model.kwargs": TINY["raft_mlp_s"], "data.crop_size": [32, 32],
                                "data.scale": [32, 32]})
    model = build_segmenter(config["model"], len(Shapes.classes), crop_size(config))
    torch.save({"model": model.state_dict(), "config": config, "classes": Shapes.classes}, tmp_path / "last.pt")
    images = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "a" / "x.png"]
    for image in images:
        image.parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 32), (10, 200, 30)).save(image)
    assert main(["segment", "predict", "--checkpoint", str(tmp_path / "last.pt"), *map(str, images), "--output",
                 str(tmp_path / "a"), "--json"]) == 0
    outputs = [result["output"] for result in json.loads(capsys.readouterr().out)]
    assert [Path(output).name for output in outputs] == ["x_segmentation.png", "x_segmentation-2.png",
                                                         "x_segmentation-3.png"]
    assert all(Image.open(output).size == (40, 32) for output in outputs)


def test_eval_refuses_a_classification_checkpoint(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"model": {}}, path)
    assert main(["segment", "eval", "--checkpoint", str(path)]) == 2
    assert "segment train" in capsys.readouterr().err


def test_deploy_folds_a_repmlpnet_backbone_with_the_same_outputs(tmp_path):
    from visionmlp.segmentation.engine import load_segmenter

    output = tmp_path / "rep"
    kwargs = "{dims: [16, 32, 64, 128], depths: [1, 1, 1, 1]}"
    assert main(["segment", "train", "--model", "repmlpnet_t224", "--output", str(output), *DEMO[:2], kwargs,
                 *DEMO[3:]]) == 0
    trained, _, _ = load_segmenter(output / "last.pt")
    folded, _, _ = load_segmenter(output / "last.pt", deploy=True)
    assert sum(p.numel() for p in folded.parameters()) != sum(p.numel() for p in trained.parameters())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(images), trained(images), rtol=1e-4, atol=1e-4)

    onnx_file = tmp_path / "folded.onnx"
    assert main(["segment", "export", "--checkpoint", str(output / "last.pt"), "--output", str(onnx_file),
                 "--deploy"]) == 0
    from visionmlp.engine.export import onnxruntime_session

    (logits,) = onnxruntime_session(onnx_file).run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), trained(images), rtol=1e-4, atol=1e-4)


def test_vip_is_built_for_the_crop_rounded_up_to_its_grid():
    model = build_segmenter(model_cfg("vip_s7", "fpn"), 3, (64, 64))
    assert model.backbone.img_size == (70, 70)  # a multiple of 14
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import visionmlp.segmentation.engine as engine

    class ExplodingLoss(torch.nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits, labels):
            ExplodingLoss.calls += 1
            loss = super().forward(logits, labels)
            return loss * float("nan") if ExplodingLoss.calls > 2 else loss

    monkeypatch.setattr(engine.nn, "CrossEntropyLoss", ExplodingLoss)
    output = tmp_path / "run"
    assert main(["segment", "train", "--output", str(output), *DEMO]) == 1
    assert "training loss is nan between iterations 3 and 4" in capsys.readouterr().err
    assert torch.load(output / "last.pt", weights_only=False)["iteration"] == 2
