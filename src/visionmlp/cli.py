"""The ``visionmlp`` command line: one sub-command per task, each defined beside the code that does it."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

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


class Terminated(BaseException):
    """SIGTERM (a scheduler pre-empting the job, torchrun stopping its workers), raised where the run is, as Ctrl-C is."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread, so that the run unwinds as from Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    owner = os.getpid()

    def terminate(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked data-loader worker inherits the handler: it ends as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error_message(error: BaseException) -> str:
    """``error``'s message; for one raised in a data-loader worker, the worker's own message without its traceback.

    torch re-raises a worker's error in the main process as the same type built from the text of the worker's
    traceback; the message is what follows the last frame, less the type's name.
    """
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    lines = text.rstrip("\n").split("\n")
    last_frame = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=1)
    return "\n".join(lines[last_frame + 1:]).split(": ", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``visionmlp`` console script and of ``python -m visionmlp``."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .engine.distributed import cleanup
    from .engine.machine import num_threads
    from .engine.train import NonFiniteLossError

    label = " ".join(filter(None, ["visionmlp", args.command, getattr(args, "action", None)]))
    training = "train" in (args.command, getattr(args, "action", None))
    resume = "; its last.pt, if one was written, continues with --resume auto" if training else ""
    # a run's thread count (a recipe's `threads`) ends with it, also when main() is called from Python
    try:
        with num_threads(None), sigterm_raises():
            return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except (ValueError, OSError) as error:  # ConfigError and DataError among them: what the user gave
        print(f"{label}: error: {error_message(error)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"{label}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # checkpoints are written atomically: the last one written is whole
        print(f"{label}: interrupted{resume}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{label}: terminated (SIGTERM){resume}", file=sys.stderr)
        return 128 + int(signal.SIGTERM)
    finally:
        cleanup()
