"""What a training run leaves behind besides checkpoints: console lines, metrics.jsonl, curves.png, and what its
experiment trackers keep (TensorBoard events by default; see trackers.py).

Only rank 0 builds a :class:`RunRecorder`; the other ranks stay silent.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .trackers import build_trackers


def log(message: str) -> None:
    """One plain, time-stamped console line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def use_progress_bars() -> bool:
    """Progress bars on a terminal; plain log lines when the output goes to a file or pipe."""
    return sys.stdout.isatty()


class RunRecorder:
    """Writes one record per epoch to ``metrics.jsonl``, ``curves.png`` and the run's trackers (``trackers`` in the
    configuration), and hands them the configuration, the per-step loss and, at the end, the weights.

    On resume the history saved in the checkpoint is authoritative: ``metrics.jsonl`` is rewritten
    from it, so an epoch that was logged but not checkpointed before a crash appears once; the trackers continue the
    runs named in ``trackers.json``.
    """

    def __init__(self, output: Path, config: Mapping[str, Any], history: list[dict[str, Any]], start_epoch: int,
                 x_key: str = "epoch") -> None:
        self.output = output
        self.history = history
        self.x_key = x_key
        self.metrics_path = output / "metrics.jsonl"
        self.metrics_path.write_text("".join(json.dumps(record) + "\n" for record in history))
        runs_path = output / "trackers.json"
        resume_ids = json.loads(runs_path.read_text()) if start_epoch > 0 and runs_path.is_file() else {}
        self.trackers = build_trackers(config["trackers"], output, start_epoch, x_key, resume_ids)
        runs = {name: tracker.run_id for name, tracker in self.trackers.items() if tracker.run_id is not None}
        if runs or runs_path.is_file():  # TensorBoard alone has no run to name
            tmp = runs_path.with_name(f".{runs_path.name}.tmp")
            tmp.write_text(json.dumps(runs, indent=1) + "\n")
            tmp.replace(runs_path)
        for tracker in self.trackers.values():
            tracker.log_config(config)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """The loss and learning rate at a global training step, to the trackers."""
        for tracker in self.trackers.values():
            tracker.log_step(step, values)

    def write_epoch(self, record: dict[str, Any]) -> None:
        """Append ``record`` (already in ``history``) to every output."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        figures = {key: value for key, value in record.items() if key != self.x_key}
        for tracker in self.trackers.values():
            tracker.log_metrics(record[self.x_key], figures)
        plot_curves(self.history, self.output / "curves.png", self.x_key)

    def close(self) -> None:
        """Hand the trackers the run's weights (``best.pt``, else ``last.pt``), then close them."""
        weights = next((p for p in (self.output / "best.pt", self.output / "last.pt") if p.is_file()), None)
        for tracker in self.trackers.values():
            if weights is not None:
                tracker.log_artifact(weights)
            tracker.close()

    def fail(self) -> None:
        """Close the trackers with their runs marked failed (the training run ended in an exception)."""
        for name, tracker in self.trackers.items():
            try:
                tracker.close(failed=True)
            except Exception as exc:  # the training run's own error is the one to raise
                log(f"could not mark the {name} run failed: {exc!r}")


@contextmanager
def trackers_failed_on_error(recorder: RunRecorder | None) -> Iterator[None]:
    """Runs a training loop; if it raises, ``recorder``'s tracker runs are closed as failed (not left running) and the
    exception goes on."""
    try:
        yield
    except BaseException:
        if recorder is not None:
            recorder.fail()
        raise


def plot_curves(history: list[dict[str, Any]], path: Path, x_key: str = "epoch") -> None:
    """Losses (train and validation) and the other validation figures (top-1 and top-5, mIoU, AP...) against
    ``x_key``, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[x_key] for r in history]
    keys = [k for k in history[-1] if isinstance(history[-1][k], (int, float))]
    losses = [k for k in keys if k.endswith("loss") or "loss_" in k]
    figures = [k for k in keys if k.startswith("val_") and k not in losses]
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for key in losses:
        loss_axes.plot(steps, [r.get(key) for r in history], marker="o", label=key.replace("_", " "))
    loss_axes.set(xlabel=x_key, ylabel="loss", title="Loss")
    for key in figures:
        metric_axes.plot(steps, [r.get(key) for r in history], marker="o", label=key.removeprefix("val_"))
    for key in [k for k in history[-1] if isinstance(history[-1][k], dict)]:  # groups: detection's bbox and segm
        for name in ("AP", "AP50"):
            if name in history[-1][key]:
                metric_axes.plot(steps, [r.get(key, {}).get(name) for r in history], marker="o", label=f"{key} {name}")
    metric_axes.set(xlabel=x_key, ylabel="validation figure", title="Validation")
    for axes in (loss_axes, metric_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
