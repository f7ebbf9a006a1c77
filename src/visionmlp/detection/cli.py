"""``visionmlp detect train | eval | predict | export``: RetinaNet, Faster R-CNN and Mask R-CNN on any variant."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import read_checkpoint, writable_folder
from ..config import Config, add_tracker_argument, parse_opts
from ..data import DataError
from ..engine.distributed import resolve_device, setup
from ..models import reparameterize
from .config import build_config, flags_from_args
from .data import SyntheticScenes, build_dataset, build_loader
from .model import backbone_body, build_detector


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train``, ``eval`` and ``predict`` sub-commands."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a detector (default: the built-in shapes, minutes on a CPU)",
                           description="Train RetinaNet, Faster R-CNN or Mask R-CNN on a visionmlp backbone.")
    train.add_argument("--detector", choices=("retinanet", "mask_rcnn", "faster_rcnn"))
    train.add_argument("--model", help="backbone variant, e.g. raft_mlp_s")
    train.add_argument("--pretrained", metavar="FILE", help="classification checkpoint for the backbone")
    train.add_argument("--data-path", metavar="DIR", help="COCO root: annotations/instances_{train,val}2017.json, "
                       "train2017/, val2017/ (default: the built-in synthetic scenes)")
    train.add_argument("--batch-size", type=int, help="images per process and step")
    train.add_argument("--epochs", type=int)
    train.add_argument("--lr", type=float, help="base learning rate before batch scaling (train.base_lr)")
    train.add_argument("--img-size", type=int, nargs="+", metavar="SIZE",
                       help="S: letterbox (longer side S, a multiple of 32), any backbone; LONG SHORT: keep-ratio "
                            "resize (MS-MLP, RepMLPNet, RaftMLP with model.dynamic_img_size)")
    train.add_argument("--amp", choices=("none", "fp16", "bf16"), help="mixed precision")
    train.add_argument("--workers", type=int, help="data-loading processes per training process")
    train.add_argument("--output", metavar="DIR", help="run folder (default runs/detect-<detector>-<model>-<data>)")
    train.add_argument("--resume", metavar="FILE|auto", help="continue from a checkpoint; auto: <output>/last.pt")
    train.add_argument("--overwrite", action="store_true", default=None,
                       help="start afresh in an output folder that holds a run (without it, an error keeps that run)")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    add_tracker_argument(train)
    _config_arguments(train)

    evaluate = sub.add_parser("eval", help="COCO box (and mask) AP of a detect train checkpoint")
    evaluate.add_argument("--checkpoint", required=True, metavar="FILE", help="last.pt / best.pt of detect train")
    evaluate.add_argument("--data-path", metavar="DIR", help="COCO root (default: the checkpoint's data)")
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--workers", type=int)
    evaluate.add_argument("--amp", choices=("none", "fp16", "bf16"))
    evaluate.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    evaluate.add_argument("--deploy", action="store_true", help="fold the backbone first (RepMLPNet)")
    evaluate.add_argument("--json", action="store_true",
                          help='print {"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}}')
    _config_arguments(evaluate)

    predict = sub.add_parser("predict", help="detections drawn on images (PNG), or listed as JSON")
    predict.add_argument("images", nargs="*", metavar="IMAGE",
                         help="image files (default: four validation scenes, for a run on the built-in scenes)")
    predict.add_argument("--checkpoint", required=True, metavar="FILE", help="last.pt / best.pt of detect train")
    predict.add_argument("--output", metavar="DIR", default="detections", help="folder for the drawn PNGs")
    predict.add_argument("--score-thresh", type=float, default=0.5, help="lowest score shown (default 0.5)")
    predict.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    predict.add_argument("--deploy", action="store_true", help="fold the backbone first (RepMLPNet)")
    predict.add_argument("--json", action="store_true", help="print each image's detections as JSON")

    export = sub.add_parser("export", help="the detector as one ONNX graph (an image in, boxes, labels, scores and "
                            "masks out), checked with onnxruntime")
    export.add_argument("--checkpoint", required=True, metavar="FILE", help="last.pt / best.pt of detect train")
    export.add_argument("--output", required=True, metavar="FILE.onnx", help="file to write")
    export.add_argument("--img-size", type=int, nargs="+", metavar="SIDE",
                        help="the graph's fixed input: SIDE or HEIGHT WIDTH (default: the training input size)")
    export.add_argument("--deploy", action="store_true", help="fold the backbone first (RepMLPNet)")
    export.add_argument("--json", action="store_true", help="print the result as one JSON object")
    export.add_argument("--opts", nargs="+", metavar="KEY VALUE", help="the graph's post-processing, e.g. --opts "
                        "model.score_thresh 0.3 model.detections_per_img 50")


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", metavar="FILE", help="YAML recipe, a file or a shipped one by name (detect_demo, "
                        "detect_retinanet_coco, detect_mask_rcnn_coco, detect_faster_rcnn_coco)")
    parser.add_argument("--opts", nargs="+", metavar="KEY VALUE", help="override config keys, e.g. --opts "
                        "train.warmup_iters 100 model.fpn_channels 128")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action; returns the exit status."""
    actions = {"train": _train, "eval": _eval, "predict": _predict, "export": _export}
    if importlib.util.find_spec("pycocotools") is None:  # COCO reading and the COCO evaluation both need it
        print(f"visionmlp detect {args.action}: error: pycocotools is not installed: pip install 'visionmlp[dense]'",
              file=sys.stderr)
        return 2
    return actions[args.action](args)


def _train(args: argparse.Namespace) -> int:
    from .engine import train

    train(build_config(args.cfg, parse_opts(args.opts), flags_from_args(args)))
    return 0


def load_detector(path: str | Path, opts: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None,
                  recipe: str | None = None, deploy: bool = False) -> tuple[nn.Module, Config, dict[str, Any]]:
    """The detector a ``detect train`` checkpoint holds (folded with ``deploy``), its recorded configuration with
    ``recipe``, ``opts`` and ``flags`` applied, and the checkpoint."""
    checkpoint = read_checkpoint(path)
    recorded = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    if not isinstance(recorded, Mapping) or "detector" not in recorded or "classes" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of visionmlp detect train (it records no detector and classes)")
    # the weights come from the checkpoint: no backbone file to read, nothing to resume or write
    base = {**recorded, "model": {**recorded["model"], "pretrained": None}, "resume": None, "output": None}
    config = build_config(recipe, opts, flags, base=base)
    model = build_detector(config, len(checkpoint["classes"]) + 1)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    if deploy:
        reparameterize(backbone_body(model))
    return model, config, checkpoint


def _eval(args: argparse.Namespace) -> int:
    from .engine import evaluate, iou_types

    flags = flags_from_args(args)
    model, config, checkpoint = load_detector(args.checkpoint, parse_opts(args.opts), flags, args.cfg, args.deploy)
    ctx = setup(config["device"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    kinds = iou_types(config["detector"])
    dataset = build_dataset(config, "val", with_masks=False)  # scored against the annotation file
    if (list(dataset.category_ids), list(dataset.classes)) != (checkpoint["category_ids"], checkpoint["classes"]):
        raise DataError(f"the data set's categories ({', '.join(dataset.classes)}) are not those the checkpoint was "
                        f"trained on ({', '.join(checkpoint['classes'])})")
    data = config["data"]
    loader = build_loader(dataset, training=False, batch_size=data["batch_size"], workers=data["workers"],
                          rank=ctx.rank, world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda")
    metrics = evaluate(model.to(ctx.device), loader, ctx, dataset.coco, checkpoint["category_ids"], kinds,
                       config["train"]["amp"])
    if not ctx.is_main:
        return 0
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{config['detector']} on {config['model']['name']}, {data['dataset']} ({len(dataset)} images):")
    for kind, values in metrics.items():
        print(f"  {kind:5s} " + "  ".join(f"{name} {value:.3f}" for name, value in values.items()))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predict import draw_detections, drawing_paths, load_image, predict_image

    if not 0.0 <= args.score_thresh <= 1.0:
        raise ValueError(f"--score-thresh is the lowest detection score shown, in [0, 1]; got {args.score_thresh:g}")
    flags = {"device": args.device} if args.device else {}
    model, config, checkpoint = load_detector(args.checkpoint, None, flags, deploy=args.deploy)
    device = resolve_device(config["device"])
    model.to(device)
    if args.images:
        inputs = [(Path(path).stem, str(path), load_image(path)) for path in args.images]
    elif config["data"]["dataset"] == "synthetic":
        scenes = SyntheticScenes("val", config["data"]["synthetic_val_images"], config["seed"])
        inputs = [(f"scene-{i}", f"scene {i}", torch.from_numpy(scenes.scene(i)[0]).permute(2, 0, 1))
                  for i in range(4)]
    else:
        raise ValueError("give the image files to predict on")
    output = writable_folder(args.output)
    targets = drawing_paths([stem for stem, _, _ in inputs], output, "detections", args.images)
    results = []
    for (_, source, image), target in zip(inputs, targets):
        detections = predict_image(model, image, checkpoint["classes"], args.score_thresh, device)
        draw_detections(image, detections, checkpoint["classes"]).save(target)
        results.append({"image": source, "output": str(target),
                        "detections": [{k: v for k, v in d.items() if k != "mask"} for d in detections]})
    if args.json:
        print(json.dumps(results))
        return 0
    for result in results:
        print(f"{result['image']}: {len(result['detections'])} detections -> {result['output']}")
        for d in result["detections"]:
            print(f"  {d['score']:.2f}  {d['label']:12s} [{', '.join(f'{v:.1f}' for v in d['box'])}]")
    return 0


def _export(args: argparse.Namespace) -> int:
    from timm.layers import set_layer_config

    from ..engine.export import write_verified
    from .config import resize_policy
    from .export import export_detector_onnx

    output = Path(args.output)
    if output.suffix != ".onnx":
        raise ValueError(f"detect export writes ONNX (.onnx) files; got --output {str(output)!r}")
    # an exported graph runs elsewhere (onnxruntime): the reference maths, public ops only
    with set_layer_config(exportable=True):
        model, config, checkpoint = load_detector(args.checkpoint, parse_opts(args.opts), {"device": "cpu"},
                                                  deploy=args.deploy)
    model.requires_grad_(False)
    if args.img_size and len(args.img_size) > 2:
        raise ValueError(f"--img-size takes SIDE or HEIGHT WIDTH, got {len(args.img_size)} numbers")
    # default: the training input, S x S for a letterbox S, the short side by the long one for a keep-ratio resize
    size = tuple(args.img_size * (2 // len(args.img_size))) if args.img_size else resize_policy(config)
    min_size, max_size = resize_policy(config)
    scale = min(min_size / min(size), max_size / max(size))
    if abs(scale - 1) > 1e-6:
        # onnxruntime's resize places its samples a little differently from PyTorch's: the graph is exported for
        # images that are already at the detector's scale
        fits = (int(size[0] * scale), int(size[1] * scale))
        raise ValueError(f"a {size[0]}x{size[1]} image would be resized inside the graph (by {scale:.4g}), which "
                         f"onnxruntime does slightly differently from PyTorch; export for the size images have at "
                         f"the detector's scale, e.g. --img-size {fits[0]} {fits[1]}, and resize images to it first")
    max_diff, compared = write_verified(
        output, lambda path: export_detector_onnx(model, path, size, checkpoint["classes"]))
    result = {"detector": config["detector"], "model": config["model"]["name"], "output": str(output),
              "img_size": list(size), "classes": checkpoint["classes"], "deploy": args.deploy,
              "max_abs_diff": max_diff, "detections_compared": compared}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {output} (ONNX, one {size[0]}x{size[1]} image in; {len(checkpoint['classes'])} classes); "
              f"largest difference between onnxruntime and PyTorch over {compared} detections on two check images: "
              f"{max_diff:.3e}")
    return 0
