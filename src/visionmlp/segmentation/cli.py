"""``visionmlp segment train | eval | predict | export``: semantic segmentation on any variant."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..config import add_tracker_argument, parse_opts
from .config import add_config_arguments, build_config, flags_from_args

PALETTE_SEED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train``, ``eval`` and ``predict`` sub-commands."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a segmentation network (default: the built-in shapes, minutes on a "
                           "CPU)", description="Train semantic FPN or UperNet on a visionmlp backbone.")
    add_config_arguments(train)
    train.add_argument("--model", help="backbone variant, e.g. raft_mlp_s")
    train.add_argument("--decoder", choices=("fpn", "upernet"))
    train.add_argument("--pretrained", metavar="FILE", help="classification checkpoint for the backbone")
    _data_arguments(train)
    train.add_argument("--batch-size", type=int, help="images per process and step")
    train.add_argument("--img-size", type=int, nargs="+", metavar="SIDE", help="training crop: SIDE or HEIGHT WIDTH")
    train.add_argument("--iterations", type=int)
    train.add_argument("--lr", type=float, help="base learning rate")
    train.add_argument("--amp", choices=("none", "fp16", "bf16"))
    train.add_argument("--output", help="run folder (default runs/segment-<model>-<dataset>)")
    train.add_argument("--resume", help="a last.pt to continue, or 'auto' for <output>/last.pt")
    train.add_argument("--overwrite", action="store_true", default=None,
                       help="start afresh in an output folder that holds a run (without it, an error keeps that run)")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    add_tracker_argument(train)

    evaluate = sub.add_parser("eval", help="mIoU, mAcc and aAcc of a segment train checkpoint")
    evaluate.add_argument("--checkpoint", required=True, metavar="FILE", help="last.pt of visionmlp segment train")
    _data_arguments(evaluate)
    evaluate.add_argument("--deploy", action="store_true", help="fold the backbone first (RepMLPNet)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")

    predict = sub.add_parser("predict", help="class maps of images, drawn over them (PNG)")
    predict.add_argument("--checkpoint", required=True, metavar="FILE", help="last.pt of visionmlp segment train")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--output", default="segmentations", help="folder for the drawn PNGs")
    predict.add_argument("--deploy", action="store_true", help="fold the backbone first (RepMLPNet)")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--json", action="store_true", help="print each image's classes and pixel shares as JSON")

    export = sub.add_parser("export", help="the network as ONNX (checked with onnxruntime) or a torch.export program: "
                            "normalised images (N, 3, H, W) in, class logits (N, classes, H, W) out")
    export.add_argument("--checkpoint", required=True, metavar="FILE", help="last.pt of visionmlp segment train")
    export.add_argument("--output", required=True, metavar="FILE", help=".onnx (ONNX) or .pt2 (torch.export)")
    export.add_argument("--img-size", type=int, nargs="+", metavar="SIDE",
                        help="the graph's input: SIDE or HEIGHT WIDTH (default: the training crop)")
    export.add_argument("--deploy", action="store_true", help="fold the backbone first (RepMLPNet)")
    export.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=("shapes", "ade20k", "folder"))
    parser.add_argument("--data-path", metavar="DIR")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--workers", type=int)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    actions = {"train": _train, "eval": _eval, "predict": _predict, "export": _export}
    return actions[args.action](args)


def _train(args: argparse.Namespace) -> int:
    from .engine import train

    config = build_config(args.cfg, parse_opts(args.opts), flags_from_args(args))
    train(config)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .engine import evaluate_checkpoint

    overrides = {key: value for key, value in flags_from_args(args).items()
                 if key.startswith("data.") and key != "data.crop_size"}
    metrics = evaluate_checkpoint(args.checkpoint, overrides, args.device, args.deploy)
    if args.json:
        print(json.dumps(metrics))
    else:
        print("  ".join(f"{name} {value:.2f} %" for name, value in metrics.items()))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import draw_segmentation_masks

    from ..checkpoint import writable_folder
    from ..detection.predict import drawing_paths
    from ..engine.distributed import resolve_device
    from ..engine.predict import load_image
    from .data import EvalTransform
    from .engine import load_segmenter, segment_image

    device = resolve_device(args.device)
    model, config, classes = load_segmenter(args.checkpoint, args.deploy)
    model.to(device)
    transform = EvalTransform(config["data"]["scale"])
    colours = torch.randint(0, 256, (len(classes), 3), generator=torch.Generator().manual_seed(PALETTE_SEED))
    output = writable_folder(args.output)
    targets = drawing_paths([Path(path).stem for path in args.images], output, "segmentation", args.images)
    results = []
    for path, target in zip(args.images, targets):
        image = load_image(path)
        class_map = segment_image(model, transform(image).to(device), config, (image.height, image.width)).cpu()
        pixels = pil_to_tensor(image)
        masks = class_map[None] == torch.arange(len(classes))[:, None, None]
        drawn = draw_segmentation_masks(pixels, masks, alpha=0.5, colors=[tuple(c.tolist()) for c in colours])
        to_pil_image(drawn).save(target)
        shares = torch.bincount(class_map.flatten(), minlength=len(classes)).double() / class_map.numel()
        results.append({"image": str(path), "output": str(target),
                        "classes": {classes[i]: round(float(s) * 100, 2) for i, s in enumerate(shares) if s > 0}})
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0]))
    else:
        for r in results:
            print(f"{r['image']} -> {r['output']}: " + ", ".join(f"{k} {v:.1f} %" for k, v in r["classes"].items()))
    return 0


def _export(args: argparse.Namespace) -> int:
    from timm.layers import set_layer_config

    from ..engine.export import FORMAT_SUFFIXES, export_onnx, export_program, write_verified
    from .engine import crop_size, load_segmenter

    output = Path(args.output)
    formats = {suffix: name for name, suffix in FORMAT_SUFFIXES.items()}
    if output.suffix not in formats:
        raise ValueError(f"--output must end in .onnx (ONNX) or .pt2 (torch.export program), got {str(output)!r}")
    if args.img_size and len(args.img_size) > 2:
        raise ValueError(f"--img-size takes SIDE or HEIGHT WIDTH, got {len(args.img_size)} numbers")
    # an exported graph runs elsewhere (onnxruntime, another torch): the reference maths, public ops only
    with set_layer_config(exportable=True):
        model, config, classes = load_segmenter(args.checkpoint, args.deploy)
    model.requires_grad_(False)
    size = tuple(args.img_size * (2 // len(args.img_size))) if args.img_size else crop_size(config)
    model.backbone.padded_size(*size)  # an image the backbone cannot take is refused here, naming the fix
    writer = export_onnx if formats[output.suffix] == "onnx" else export_program
    max_diff = write_verified(output, lambda path: writer(model, path, size))
    result = {"model": config["model"]["name"], "decoder": config["model"]["decoder"], "format":
              formats[output.suffix], "output": str(output), "img_size": list(size), "classes": classes,
              "deploy": args.deploy, "max_abs_diff": max_diff}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {output} ({result['format']}, dynamic batch, {size[0]}x{size[1]}, {len(classes)} classes); "
              f"largest difference from PyTorch: {max_diff:.3e}")
    return 0
