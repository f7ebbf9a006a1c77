"""The ``visionmlp`` command line: one sub-command per task, each defined beside the code that does it."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module exposing ``add_arguments(parser)`` and ``run(args) -> int``; imported only when used
COMMANDS = {
    "models": ("visionmlp.engine.model_table", "list the variants with resolution, parameters and GMACs"),
    "train": ("visionmlp.engine.train", "train a model (default: a small model on the built-in digits data)"),
    "transfer-demo": ("visionmlp.engine.transfer_demo",
                      "fine-tuning against training from scratch on the built-in digits, in a minute"),
    "eval": ("visionmlp.engine.evaluate", "evaluate a checkpoint: top-1, top-5 and loss"),
    "benchmark": ("visionmlp.engine.benchmark", "measure throughput, latency and memory"),
    "convert": ("visionmlp.engine.convert", "convert a checkpoint to visionmlp's format, folded or int8 if asked"),
    "export": ("visionmlp.engine.export", "export to ONNX (verified with onnxruntime) or a torch.export program"),
    "predict": ("visionmlp.engine.predict", "top-5 classes of images: ImageNet's, or those a run trained on"),
    "detect": ("visionmlp.detection.cli",
               "object detection: train, eval, predict (RetinaNet, Mask R-CNN, Faster R-CNN)"),
    "segment": ("visionmlp.segmentation.cli", "semantic segmentation: train, eval, predict (semantic FPN, UperNet)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command`` given, only that sub-command's module is imported."""
    parser = argparse.ArgumentParser(prog="visionmlp", description="Vision-MLP backbones: train, evaluate, benchmark.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``visionmlp`` console script and of ``python -m visionmlp``."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .engine.machine import num_threads

    # a run's thread count (a recipe's `threads`) ends with it, also when main() is called from Python
    try:
        with num_threads(None):
            return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except KeyboardInterrupt:  # checkpoints are written atomically: the last one written is whole
        training = "train" in (args.command, getattr(args, "action", None))
        resume = "; its last.pt, if one was written, continues with --resume auto" if training else ""
        print(f"visionmlp {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
