"""What a training run leaves behind besides checkpoints: console lines, metrics.jsonl, TensorBoard events, curves.png.

Only rank 0 builds a :class:`RunRecorder`; the other ranks stay silent.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    """One plain, time-stamped console line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def use_progress_bars() -> bool:
    """Progress bars on a terminal; plain log lines when the output goes to a file or pipe."""
    return sys.stdout.isatty()


class RunRecorder:
    """Writes one record per epoch to ``metrics.jsonl``, TensorBoard and ``curves.png`` under ``output``.

    On resume the history saved in the checkpoint is authoritative: ``metrics.jsonl`` is rewritten
    from it, so an epoch that was logged but not checkpointed before a crash appears once.
    """

    def __init__(self, output: Path, history: list[dict[str, Any]], start_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.output = output
        self.history = history
        self.metrics_path = output / "metrics.jsonl"
        self.metrics_path.write_text("".join(json.dumps(record) + "\n" for record in history))
        # purge_step drops events of epochs that will be trained again
        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=start_epoch)

    def write_epoch(self, record: dict[str, Any]) -> None:
        """Append ``record`` (already in ``history``) to every output."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["epoch"]
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                group = "train" if key.startswith("train_") else "val" if key.startswith("val_") else "run"
                self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()
        plot_curves(self.history, self.output / "curves.png")

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        self.writer.close()


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss (train and validation) and accuracy (top-1, top-5) per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_axes.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_axes.plot(epochs, [r["val_acc1"] for r in history], marker="o", label="top-1")
    acc_axes.plot(epochs, [r["val_acc5"] for r in history], marker="o", label="top-5")
    if any("val_acc1_ema" in r for r in history):
        acc_axes.plot(epochs, [r.get("val_acc1_ema") for r in history], marker="o", label="top-1 (EMA)")
    acc_axes.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Accuracy")
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
