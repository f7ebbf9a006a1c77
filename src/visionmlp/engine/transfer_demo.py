"""``visionmlp transfer-demo``: fine-tuning against training from scratch, on the built-in digits, in a minute.

It pre-trains the default model on the digits 0-4 at 28 px, then trains on the digits 5-9 at 42 px three times with
the same schedule: fine-tuned from the pre-trained weights (the Permute-MLPs resampled to the larger grid, the
classifier replaced for the new classes), as a linear probe of them (classifier only), and from scratch. The curves
show what the first five classes taught the model about the other five.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import build_config
from .reporting import log
from .train import train

FIRST_HALF = [str(d) for d in range(5)]
SECOND_HALF = [str(d) for d in range(5, 10)]


def run_demo(output: Path, pretrain_epochs: int = 10, epochs: int = 3, img_size: int = 42) -> dict[str, Any]:
    """Pre-train, then fine-tune, probe and train from scratch (see the module docstring); the validation history of
    each of the last three runs."""
    pretrained = str(output / "pretrain" / "last.pt")
    second = {"data.classes": SECOND_HALF, "train.epochs": epochs, "data.img_size": img_size}
    runs = {
        "pretrain": {"data.classes": FIRST_HALF, "train.epochs": pretrain_epochs},
        "fine-tuned": {**second, "model.pretrained": pretrained},
        "linear probe": {**second, "model.pretrained": pretrained, "train.freeze_backbone": True},
        "from scratch": second,
    }
    # every configuration checked before the first run; the demonstration's own folders: running it again redoes it
    configs = {label: build_config(opts={**opts, "output": str(output / label.replace(" ", "-")), "overwrite": True})
               for label, opts in runs.items()}
    histories = {}
    for label, config in configs.items():
        log(f"--- {label}: digits {', '.join(config['data']['classes'])}, {config['train']['epochs']} epochs")
        train(config)
        metrics = Path(config["output"]) / "metrics.jsonl"
        histories[label] = [json.loads(line) for line in metrics.read_text().splitlines()]
    del histories["pretrain"]
    return histories


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``visionmlp transfer-demo``."""
    parser.add_argument("--output", default="runs/transfer-demo", metavar="DIR", help="where the three runs go")
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="epochs on the digits 0-4 (default: 10)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs on the digits 5-9, for each of the three runs (default: 3)")
    parser.add_argument("--img-size", type=int, default=42, help="resolution on the digits 5-9 (default: 42)")


def run(args: argparse.Namespace) -> int:
    """Run the demonstration and print the two validation curves side by side."""
    curves = run_demo(Path(args.output), args.pretrain_epochs, args.epochs, args.img_size)
    print("\nvalidation top-1 on the digits 5-9 (%), by epoch, all three with the same schedule:")
    print("| epoch | fine-tuned from the digits 0-4 | linear probe (classifier only) | from scratch |")
    print("|--:|--:|--:|--:|")
    for epoch, records in enumerate(zip(*curves.values()), start=1):
        print(f"| {epoch} | " + " | ".join(f"{record['val_acc1']:.1f}" for record in records) + " |")
    return 0
