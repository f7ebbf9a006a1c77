"""`visionmlp detect`: COCO data, the three detectors on every family, the COCO evaluation, train / eval / predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from visionmlp import RepMLPBlock
from visionmlp.cli import error_message, main
from visionmlp.config import ConfigError
from visionmlp.data import DataError
from visionmlp.detection.coco_eval import coco_evaluate, coco_ground_truth, detections_to_coco
from visionmlp.detection.config import build_config, resize_policy
from visionmlp.detection.data import CocoInstances, SampleError, SyntheticScenes, build_transforms, collate
from visionmlp.detection.model import backbone_img_size, build_detector
from visionmlp.models import count_batchnorms

pytest.importorskip("pycocotools")

# one small variant per family (a few thousand to a few hundred thousand parameters)
TINY = {
    "ms_mlp_tiny": {"embed_dim": 20, "depths": [1, 1, 1, 1]},
    "vip_s7": {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 32, 32], "num_segments": [4, 4, 4, 4]},
    "strip_mlp_tiny_light": {"embed_dim": 16, "depths": [1, 1, 1, 1]},
    "raft_mlp_s": {"embed_dims": [16, 32, 64, 64], "depths": [1, 1, 1, 1]},
    "repmlpnet_t224": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 64], "sharesets": [1, 4, 8, 16]},
}
SMALL_HEADS = ["model.fpn_channels", "32", "model.box_head_dim", "64", "model.rois_per_image", "64"]
# every detection kept (score threshold 0): an AP above 0 even after a few steps, so that equal figures mean something
RAFT_TINY = ["--model", "raft_mlp_s", "--opts", "model.kwargs", json.dumps(TINY["raft_mlp_s"]), *SMALL_HEADS,
             "model.score_thresh", "0"]


def make_coco_tree(root: Path) -> Path:
    """A COCO instances tree: train2017 with three images (one without annotations), val2017 with two, categories
    with ids 3 and 7 (not contiguous), polygon masks, and a crowd annotation in each annotated image."""
    categories = [{"id": 3, "name": "disc"}, {"id": 7, "name": "block"}]
    (root / "annotations").mkdir(parents=True)
    for split, count in (("train", 3), ("val", 2)):
        (root / f"{split}2017").mkdir()
        images, annotations = [], []
        for i in range(count):
            width, height = 80 + 16 * i, 64
            image = Image.new("RGB", (width, height), (90, 120, 60))
            draw = ImageDraw.Draw(image)
            name = f"{i:012d}.jpg"
            images.append({"id": 100 + i, "file_name": name, "width": width, "height": height})
            if split == "train" and i == 2:  # no annotations: dropped from training, kept for evaluation
                image.save(root / f"{split}2017" / name)
                continue
            for j, (category, (x, y, w, h)) in enumerate([(3, (8, 8, 24, 20)), (7, (44, 30, 28, 26))]):
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(250, 40 + 150 * j, 20))
                annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": 3,
                                "bbox": [0, 50, 10, 10], "area": 100, "iscrowd": 1,
                                "segmentation": {"size": [height, width], "counts": [height * width - 100, 100]}})
            image.save(root / f"{split}2017" / name)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
    return root


def test_coco_tree_reads_as_detection_targets(tmp_path):
    root = make_coco_tree(tmp_path / "coco")
    train = CocoInstances(root, "train", build_transforms(False), with_masks=True)
    assert train.classes == ("disc", "block") and train.category_ids == (3, 7)
    assert train.ids == [100, 101]  # the image without annotations is left out of training
    image, target = train[1]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 96) and 0 <= image.min() <= image.max() <= 1
    assert target["labels"].tolist() == [1, 2]  # categories 3, 7 -> labels 1, 2; the crowd annotation dropped
    assert target["boxes"].tolist() == [[8, 8, 32, 28], [44, 30, 72, 56]]
    assert target["masks"].shape == (2, 64, 96) and target["masks"][0].sum() > 0.9 * 24 * 20
    assert target["image_id"] == 101
    val = CocoInstances(root, "val", build_transforms(False), limit=1)
    assert len(val) == 1 and "masks" not in val[0][1]


def test_synthetic_scenes_are_deterministic_with_masks_inside_boxes():
    scenes = SyntheticScenes("train", 10, seed=3, transforms=build_transforms(False))
    image, target = scenes[4]
    again = SyntheticScenes("train", 10, seed=3, transforms=build_transforms(False))[4][0]
    assert torch.equal(image, again)
    assert not torch.equal(image, SyntheticScenes("val", 10, seed=3, transforms=build_transforms(False))[4][0])
    assert 96 <= image.shape[1] <= 128 and 96 <= image.shape[2] <= 128
    assert 1 <= len(target["labels"]) <= 4 and set(target["labels"].tolist()) <= {1, 2, 3}
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = mask.nonzero(as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    # the ground truth the COCO evaluation uses is the same scenes'
    coco = scenes.coco
    assert sorted(coco.getImgIds()) == list(range(10)) and len(coco.getAnnIds(imgIds=[4])) == len(target["labels"])


@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn", "mask_rcnn"])
@pytest.mark.parametrize("name", list(TINY))
def test_detector_forward_and_backward_on_every_family(name, detector):
    opts = {"model.kwargs": TINY[name], "model.fpn_channels": 32, "model.box_head_dim": 64,
            "model.rois_per_image": 32, "model.rpn_proposals": 100, "model.detections_per_img": 10}
    if name.startswith("repmlpnet"):
        opts["model.img_size"] = 64  # RepMLPNet tiles its input with partitions of this size
    config = build_config(None, opts, {"model.name": name, "detector": detector, "data.img_size": 64})
    torch.manual_seed(0)
    model = build_detector(config, num_classes=4)
    scenes = SyntheticScenes("train", 2, transforms=build_transforms(False))
    images, targets = collate([scenes[0], scenes[1]])
    losses = model(list(images), list(targets))
    expected = {"retinanet": {"classification", "bbox_regression"}, "faster_rcnn": {"loss_box_reg", "loss_objectness"},
                "mask_rcnn": {"loss_box_reg", "loss_objectness", "loss_mask"}}[detector]
    assert expected <= set(losses)
    sum(losses.values()).backward()
    trunk = model.backbone.body.body
    assert all(p.grad is not None for p in trunk.parameters()), "the backbone takes part in the loss"
    model.eval()
    with torch.no_grad():
        outputs = model([images[0][:, :100, :70]])  # another size and aspect: boxes come back in its pixels
    boxes = outputs[0]["boxes"]
    assert boxes.shape[1] == 4 and (boxes[:, 2] <= 70 + 1e-3).all() and (boxes[:, 3] <= 100 + 1e-3).all()
    if detector == "mask_rcnn":
        assert outputs[0]["masks"].shape[-2:] == (100, 70)


def test_input_policy_letterbox_and_keep_ratio():
    vip = build_config(None, {}, {"model.name": "vip_s7", "data.img_size": 128})
    assert resize_policy(vip) == (128, 128) and backbone_img_size(vip) == (140, 140)  # ViP: 14-pixel grid
    coco_vip = build_config("detect_mask_rcnn_coco", {}, {"model.name": "vip_s7", "data.path": "/data/coco"})
    assert resize_policy(coco_vip) == (1344, 1344) and backbone_img_size(coco_vip) == (1344, 1344)  # 96 x 14
    dynamic = build_config("detect_retinanet_coco", {}, {"data.path": "/data/coco"})
    assert dynamic["model"]["dynamic_img_size"] and resize_policy(dynamic) == (800, 1333)
    assert backbone_img_size(dynamic) == (224, 224)  # the grid of RaftMLP's ImageNet weights
    with pytest.raises(ConfigError, match="letterbox"):
        build_config(None, {}, {"model.name": "strip_mlp_tiny", "data.img_size": [1333, 800]})
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_config(None, {}, {"data.img_size": 100})


def _box_result(image_id, box, score, category=1):
    return {"image_id": image_id, "category_id": category, "bbox": box, "score": score}


def test_coco_evaluation_on_hand_made_cases():
    square = np.zeros((2, 60, 80), np.uint8)
    square[0, 10:30, 10:40] = 1
    square[1, 35:55, 50:75] = 1
    coco = coco_ground_truth([(1, 60, 80, [1, 2], square)], ["a", "b"])
    assert coco.loadAnns(coco.getAnnIds())[0]["bbox"] == [10.0, 10.0, 30.0, 20.0]
    perfect = {
        "boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0], [50.0, 35.0, 75.0, 55.0]]),
        "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.8]),
        "masks": torch.from_numpy(square[:, None].astype(np.float32)),
    }
    metrics = coco_evaluate(coco, detections_to_coco(perfect, 1, [1, 2]))
    assert set(metrics) == {"bbox", "segm"}
    assert list(metrics["bbox"]) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    for kind in ("bbox", "segm"):
        assert metrics[kind]["AP"] == pytest.approx(1.0) and metrics[kind]["AP50"] == pytest.approx(1.0)
        assert metrics[kind]["APl"] == -1.0  # no large object: pycocotools' -1
    # two objects of one class, one found: precision 1 up to recall 0.5, so 51 of the 101 recall points
    one_class = coco_ground_truth([(1, 60, 80, [1, 1], square)], ["a"])
    half = coco_evaluate(one_class, {"bbox": [_box_result(1, [10, 10, 30, 20], 0.9)]})
    assert half["bbox"]["AP"] == pytest.approx(51 / 101)
    # a false positive scored above it halves the precision there
    worse = coco_evaluate(one_class, {"bbox": [_box_result(1, [0, 40, 5, 5], 0.95),
                                               _box_result(1, [10, 10, 30, 20], 0.9)]})
    assert worse["bbox"]["AP"] == pytest.approx(0.5 * 51 / 101)
    assert coco_evaluate(one_class, {"bbox": []})["bbox"]["AP"] == 0.0  # nothing found


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_train_eval_predict_end_to_end_on_the_built_in_scenes(tmp_path, capsys):
    output = tmp_path / "run"
    args = ["detect", "train", "--detector", "mask_rcnn", "--epochs", "1", "--output", str(output), "--workers", "0",
            *RAFT_TINY, "data.synthetic_train_images", "16", "data.synthetic_val_images", "8",
            "train.warmup_iters", "2", "print_freq", "1000"]
    assert main(args) == 0
    record = read_metrics(output)[-1]
    assert record["epoch"] == 0 and {"bbox", "segm", "train_loss", "train_loss_mask", "lr"} <= set(record)
    for name in ("last.pt", "best.pt", "config.yaml", "curves.png"):
        assert (output / name).is_file(), name
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(output / "last.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"bbox": record["bbox"], "segm": record["segm"]}

    image = tmp_path / "scene.png"
    Image.fromarray(SyntheticScenes("val", 8).scene(3)[0]).resize((110, 90)).save(image)
    drawn = tmp_path / "drawn"
    assert main(["detect", "predict", str(image), "--checkpoint", str(output / "last.pt"), "--output", str(drawn),
                 "--score-thresh", "0", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["output"] == str(drawn / "scene_detections.png")
    assert Image.open(drawn / "scene_detections.png").size == (110, 90)
    assert result["detections"], "a score threshold of 0 keeps every detection"
    for detection in result["detections"]:
        assert detection["label"] in ("circle", "square", "triangle") and 0 <= detection["score"] <= 1
        x1, y1, x2, y2 = detection["box"]
        assert 0 <= x1 <= x2 <= 110 and 0 <= y1 <= y2 <= 90
    # without images, a run on the built-in scenes draws four validation scenes
    assert main(["detect", "predict", "--checkpoint", str(output / "last.pt"), "--output", str(drawn)]) == 0
    assert (drawn / "scene-3_detections.png").is_file()
    capsys.readouterr()

    # the ONNX graph finds what predict finds, on an image of the size it was exported for
    onnx_file = tmp_path / "detector.onnx"
    assert main(["detect", "export", "--checkpoint", str(output / "last.pt"), "--output", str(onnx_file),
                 "--img-size", "90", "110"]) == 2
    assert "export for the size images have at the detector's scale, e.g. --img-size 104 128" in capsys.readouterr().err
    assert main(["detect", "export", "--checkpoint", str(output / "last.pt"), "--output", str(onnx_file),
                 "--img-size", "104", "128", "--opts", "model.score_thresh", "0.01", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["img_size"] == [104, 128] and exported["max_abs_diff"] < 1e-3
    assert exported["detections_compared"] > 0, "the check images drew detections to compare"
    Image.open(image).resize((128, 104)).save(image)
    assert main(["detect", "predict", str(image), "--checkpoint", str(output / "last.pt"), "--output", str(drawn),
                 "--score-thresh", "0.01", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    import onnx
    from visionmlp.engine.export import onnxruntime_session

    session = onnxruntime_session(onnx_file)
    assert json.loads(onnx.load(str(onnx_file)).metadata_props[0].value) == ["circle", "square", "triangle"]
    pixels = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": pixels})))
    assert set(got) == {"boxes", "labels", "scores", "masks"} and got["masks"].shape[-2:] == (104, 128)
    assert len(got["boxes"]) == len(result["detections"]) > 0
    for detection, box, score in zip(result["detections"], got["boxes"], got["scores"]):
        np.testing.assert_allclose(box, detection["box"], atol=0.05)
        assert score == pytest.approx(detection["score"], abs=1e-3)


def test_two_process_torchrun_logs_what_eval_measures(tmp_path, capsys):
    from test_train import torchrun_train

    output = tmp_path / "ddp"
    result = torchrun_train("--detector", "mask_rcnn", "--epochs", "1", "--output", str(output), "--workers", "0",
                            *RAFT_TINY, "data.synthetic_train_images", "16", "data.synthetic_val_images", "8",
                            "train.warmup_iters", "2", "print_freq", "1000", command=("detect", "train"))
    assert result.stdout.count("epoch 1/1") >= 1
    record = read_metrics(output)[-1]
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(output / "last.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"bbox": record["bbox"], "segm": record["segm"]}


def test_train_on_a_coco_tree_then_eval_with_the_data_path_only(tmp_path, capsys):
    root = make_coco_tree(tmp_path / "coco")
    output = tmp_path / "run"
    train = ["detect", "train", "--detector", "mask_rcnn", "--data-path", str(root), "--output", str(output),
             "--img-size", "96", "--workers", "0", "--epochs", "3"]
    assert main([*train, "--batch-size", "2", "--lr", "1e-3", *RAFT_TINY, "train.warmup_iters", "1",
                 "train.lr_base_batch", "null", "print_freq", "1000"]) == 0
    records = read_metrics(output)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    # the same figures from eval, none of them zero by want of detections (every one is kept)
    assert records[-1]["bbox"]["AP50"] > 0 and records[-1]["segm"]["AP50"] > 0
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(output / "last.pt"), "--data-path", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"bbox": records[-1]["bbox"], "segm": records[-1]["segm"]}
    # another data set's classes are not the checkpoint's
    assert main(["detect", "eval", "--checkpoint", str(output / "last.pt"), "--opts", "data.dataset", "synthetic"]) == 2
    assert "not those the checkpoint was trained on" in capsys.readouterr().err
    # resuming a finished run trains nothing more and keeps its history
    assert main([*train, "--resume", "auto", *RAFT_TINY]) == 0
    assert read_metrics(output) == records


def test_eval_and_export_with_deploy_fold_repmlpnet_and_keep_the_detections(tmp_path):
    from visionmlp.detection.cli import load_detector

    opts = {"model.kwargs": TINY["repmlpnet_t224"], "model.img_size": 64, "model.fpn_channels": 32}
    config = build_config(None, opts, {"model.name": "repmlpnet_t224", "detector": "faster_rcnn",
                                       "data.img_size": 64})
    torch.manual_seed(0)
    model = build_detector(config, num_classes=4).eval()
    for module in model.modules():  # BatchNorm statistics that are not the identity, so that folding shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "config": config, "classes": ["a", "b", "c"],
                "category_ids": [1, 2, 3]}, path)
    image = SyntheticScenes("val", 2, transforms=build_transforms(False))[0][0]
    folded, _, _ = load_detector(path, deploy=True)
    blocks = [m for m in folded.backbone.body.body.modules() if isinstance(m, RepMLPBlock)]
    assert blocks and all(len(block.repconvs) == 0 for block in blocks)  # the conv branches are in the FC now
    assert count_batchnorms(folded) < count_batchnorms(model)
    with torch.no_grad():
        maps, folded_maps = model.backbone(image[None]), folded.backbone(image[None])
    for name in maps:
        torch.testing.assert_close(folded_maps[name], maps[name], rtol=1e-3, atol=1e-4)

    # export --deploy writes the folded graph: RepMLPBlocks' conv branches gone (the threshold keeps an untrained
    # detector's near-equal scores out of the check)
    import onnx

    convs = {}
    for deploy in ([], ["--deploy"]):
        output = tmp_path / f"detector{len(deploy)}.onnx"
        assert main(["detect", "export", "--checkpoint", str(path), "--output", str(output), "--img-size", "64",
                     "--opts", "model.score_thresh", "0.99", *deploy]) == 0
        convs[bool(deploy)] = sum(node.op_type == "Conv" for node in onnx.load(str(output)).graph.node)
    assert convs[True] < convs[False]


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    assert main(["detect", "train", "--data-path", str(tmp_path / "missing"), "--workers", "0"]) == 2
    assert "instances_train2017.json" in capsys.readouterr().err
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["detect", "predict", "--checkpoint", str(tmp_path / "none.pt"), "--score-thresh", "2"]) == 2
    assert "--score-thresh is the lowest detection score shown, in [0, 1]; got 2" in capsys.readouterr().err
    assert main(["detect", "train", "--opts", "model.nms_thresh", "1.5"]) == 2
    assert "model.nms_thresh is an IoU, in [0, 1]; got 1.5" in capsys.readouterr().err


def edit_annotations(root: Path, split: str, edit) -> Path:
    """``edit`` applied to the parsed ``instances_{split}2017.json`` of the tree at ``root``; returns the file."""
    path = root / "annotations" / f"instances_{split}2017.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return path


def set_first_annotation(key, value):
    return lambda content: content["annotations"][0].update({key: value})


@pytest.mark.parametrize("edit, detector, expected", [
    (lambda content: content.pop("categories"), "faster_rcnn", "has no 'categories' key"),
    (lambda content: content.pop("annotations"), "faster_rcnn", "has no 'annotations' key"),
    (set_first_annotation("category_id", 5), "retinanet",
     "annotation 1 (image 100) has category_id 5, which is not among the categories' ids (3, 7)"),
    (lambda content: [a.pop("segmentation") for a in content["annotations"]], "mask_rcnn",
     "annotation 1 (image 100) has no 'segmentation'"),
    (set_first_annotation("bbox", "10,10,5,5"), "faster_rcnn", "annotation 1 (image 100) has bbox '10,10,5,5'"),
    (set_first_annotation("bbox", [10, 10, 5]), "faster_rcnn", "has bbox [10, 10, 5]: a COCO bbox is a list of four"),
], ids=["no-categories", "no-annotations", "unknown-category", "no-segmentation", "bbox-text", "bbox-short"])
def test_coco_annotation_mistakes_are_named_when_the_data_set_is_built(tmp_path, capsys, edit, detector, expected):
    root = make_coco_tree(tmp_path / "coco")
    path = edit_annotations(root, "train", edit)
    assert main(["detect", "train", "--detector", detector, "--data-path", str(root), "--workers", "0",
                 "--output", str(tmp_path / "run"), *RAFT_TINY]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}" in err and expected in err and "Traceback" not in err
    if detector == "mask_rcnn":
        assert "--detector faster_rcnn or --detector retinanet" in err
    assert not (tmp_path / "run" / "last.pt").exists()  # refused before any training


def test_coco_annotation_mistakes_in_eval_and_unparsable_json(tmp_path, capsys):
    root = make_coco_tree(tmp_path / "coco")
    config = build_config(None, {"model.kwargs": TINY["raft_mlp_s"], "model.fpn_channels": 32},
                          {"model.name": "raft_mlp_s", "detector": "mask_rcnn", "data.img_size": 64})
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": build_detector(config, num_classes=3).state_dict(), "config": config,
                "classes": ["disc", "block"], "category_ids": [3, 7]}, checkpoint)
    evaluate = ["detect", "eval", "--checkpoint", str(checkpoint), "--data-path", str(root), "--workers", "0"]
    # Mask R-CNN is scored on masks: the validation annotations need them too
    path = edit_annotations(root, "val", lambda content: [a.pop("segmentation") for a in content["annotations"]])
    assert main(evaluate) == 2
    err = capsys.readouterr().err
    assert f"{path}: annotation 1 (image 100) has no 'segmentation'" in err and "Traceback" not in err
    path.write_text('{"images": [], "annotations": [}')
    assert main(evaluate) == 2
    err = capsys.readouterr().err
    assert f"error: {path} is not valid JSON (Expecting value: line 1" in err and "Traceback" not in err
    path.write_text("[]")
    assert main(evaluate) == 2
    assert f"error: {path} is not a COCO instances file" in capsys.readouterr().err


def test_an_unreadable_coco_image_is_named(tmp_path, capsys):
    root = make_coco_tree(tmp_path / "coco")
    broken = root / "train2017" / "000000000001.jpg"
    broken.write_bytes(b"not an image")
    dataset = CocoInstances(root, "train", build_transforms(False))
    with pytest.raises(SampleError, match=f"could not read image {broken}: cannot identify image file"):
        dataset[1]
    # from a loader's worker process, the same one-line message (not the worker's traceback)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate)
    with pytest.raises(SampleError) as raised:
        next(iter(loader))
    message = error_message(raised.value)
    assert message.startswith(f"could not read image {broken}: ") and "\n" not in message
    assert main(["detect", "train", "--detector", "faster_rcnn", "--data-path", str(root), "--workers", "0",
                 "--batch-size", "2", "--output", str(tmp_path / "run"), *RAFT_TINY]) == 2
    err = capsys.readouterr().err
    assert f"error: could not read image {broken}" in err and "Traceback" not in err


def test_images_missing_from_a_coco_folder_are_named_when_the_set_is_built(tmp_path, capsys):
    root = make_coco_tree(tmp_path / "coco")
    (root / "val2017" / "000000000001.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of the images .*instances_val2017.json lists are not in .*val2017 "
                                        r"\(first: 000000000001.jpg\); put them there"):
        CocoInstances(root, "val", build_transforms(False))
    (root / "train2017" / "000000000002.jpg").unlink()  # an image training leaves out (no annotations) is not needed
    assert len(CocoInstances(root, "train", build_transforms(False))) == 2


def test_drawing_paths_never_name_an_input_nor_each_other(tmp_path):
    from visionmlp.detection.predict import drawing_paths

    inputs = [tmp_path / "p1.png", tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "a" / "x.png",
              tmp_path / "y_detections.png", tmp_path / "y.png"]
    paths = drawing_paths([p.stem for p in inputs], tmp_path, "detections", inputs)
    assert [p.name for p in paths] == ["p1_detections.png", "x_detections.png", "x_detections-2.png",
                                       "x_detections-3.png", "y_detections_detections.png", "y_detections-2.png"]
    # an input spelt another way is still that input
    assert drawing_paths(["y"], tmp_path / "a" / "..", "detections", [tmp_path / "y_detections.png"]) == [
        tmp_path / "a" / ".." / "y_detections-2.png"]


def test_predict_into_the_images_folder_overwrites_no_image(tmp_path, monkeypatch, capsys):
    config = build_config(None, {"model.kwargs": TINY["raft_mlp_s"], "model.fpn_channels": 32},
                          {"model.name": "raft_mlp_s", "detector": "faster_rcnn", "data.img_size": 64})
    torch.save({"model": build_detector(config, num_classes=3).state_dict(), "config": config,
                "classes": ["a", "b"], "category_ids": [1, 2]}, tmp_path / "last.pt")
    images = ["p1.png", "a/x.jpg", "b/x.jpg", "a/x.png", "p1_detections.png"]
    for i, name in enumerate(images):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 32), (10 * i, 200, 30)).save(tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in images}
    monkeypatch.chdir(tmp_path)
    assert main(["detect", "predict", "--checkpoint", "last.pt", *images, "--output", ".", "--json"]) == 0
    outputs = [result["output"] for result in json.loads(capsys.readouterr().out)]
    assert outputs == ["p1_detections-2.png", "x_detections.png", "x_detections-2.png", "x_detections-3.png",
                       "p1_detections_detections.png"]
    assert all(Image.open(name).size == (40, 32) for name in outputs)
    assert {name: (tmp_path / name).read_bytes() for name in images} == before


def test_without_pycocotools_the_error_names_the_extra(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycocotools" else find_spec(
        name, *a))
    assert main(["detect", "train"]) == 2
    assert "pip install 'visionmlp[dense]'" in capsys.readouterr().err


def test_export_check_pairs_detections_of_equal_score_in_either_order():
    from visionmlp.detection.export import largest_difference

    expected = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 2]),
                "scores": torch.tensor([0.5, 0.5])}
    swapped = {name: value.flip(0) for name, value in expected.items()}
    swapped["boxes"] = swapped["boxes"] + 0.01
    assert largest_difference(expected, swapped) == pytest.approx(0.01, abs=1e-6)
    with pytest.raises(ValueError, match="does not reproduce the detector"):
        largest_difference(expected, {**swapped, "labels": torch.tensor([1, 1])})
