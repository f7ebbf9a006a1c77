"""Experiment trackers a training run reports to (``--tracker``): TensorBoard (the default), MLflow, Weights & Biases
and ClearML.

Each tracker gets the resolved configuration, the loss and learning rate at every logging step (as ``step/loss`` and
``step/lr``), every epoch's (or evaluation's) record under the names of ``metrics.jsonl`` and, at the end, the run's
weights. Each reads its library's own settings (``MLFLOW_TRACKING_URI``, ``WANDB_MODE``, ``clearml.conf`` ...) and
works offline where no server is configured. Only rank 0 builds trackers (see ``RunRecorder``).

A resumed training run continues the tracker runs it started (their ids are kept in ``<output>/trackers.json``); a run
that ends in an exception is marked failed rather than left running.
"""

from __future__ import annotations

import importlib
import netrc
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..config import ConfigError

# tracker -> the module it needs; the package's extra has the tracker's name: pip install 'visionmlp[mlflow]'
MODULES = {"mlflow": "mlflow", "wandb": "wandb", "clearml": "clearml"}


def check_installed(names: Iterable[str]) -> None:
    """A ConfigError naming the extra to install for a chosen tracker whose package is missing."""
    for name in names:
        if name in MODULES:
            try:
                importlib.import_module(MODULES[name])
            except ImportError:
                raise ConfigError(f"--tracker {name} needs the {MODULES[name]} package: "
                                  f"pip install 'visionmlp[{name}]'") from None


def flatten(tree: Mapping[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level: ``{"bbox": {"AP": 0.4}}`` -> ``{"bbox<sep>AP": 0.4}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, groups such as detection's ``{"bbox": {"AP": ...}}`` named ``bbox_AP``."""
    return {k: v for k, v in flatten(record, "_").items() if isinstance(v, (int, float))}


class Tracker:
    """What a run reports; a tracker leaves out what it has no use for. ``run_id`` names the tracker's run, for a
    resumed training run to continue it (None: nothing to continue)."""

    run_id: str | None = None

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the resolved configuration."""

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        """Record the loss and learning rate (``values``) at a global training step."""

    def log_metrics(self, step: int, record: Mapping[str, Any]) -> None:
        """Record one epoch's (or evaluation's) figures, as in ``metrics.jsonl``."""

    def log_artifact(self, path: Path) -> None:
        """Keep a file (the run's weights)."""

    def close(self, failed: bool = False) -> None:
        """Flush and end the tracker's run; ``failed``: the training run ended in an exception."""


class TensorBoardTracker(Tracker):
    """Event files in ``<output>/tensorboard``, one point per epoch under ``train/``, ``val/`` and ``run/``."""

    def __init__(self, output: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events of epochs that will be trained again; it counts epochs, which is why the per-step
        # loss stays out of TensorBoard
        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=start_step)

    def log_metrics(self, step: int, record: Mapping[str, Any]) -> None:
        """One scalar per figure, tagged by its group."""
        for key, value in record.items():
            if isinstance(value, (int, float)):
                group = "train" if key.startswith("train_") else "val" if key.startswith("val_") else "run"
                self.writer.add_scalar(f"{group}/{key}", value, step)
            elif isinstance(value, dict):  # a group of validation figures, e.g. detection's {"bbox": {"AP": ...}}
                for name, figure in value.items():
                    if isinstance(figure, (int, float)):
                        self.writer.add_scalar(f"val/{key}_{name}", figure, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        """Close the event file."""
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run; without ``MLFLOW_TRACKING_URI``, in ``<output>/mlflow.db`` with artifacts in ``<output>/mlartifacts``
    (``mlflow ui --backend-store-uri sqlite:///<output>/mlflow.db`` shows it)."""

    def __init__(self, output: Path, resume_id: str | None) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(f"sqlite:///{output.resolve() / 'mlflow.db'}" if local else None)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "visionmlp")
        if resume_id is not None:
            try:
                self.client.update_run(resume_id, status="RUNNING")
                self.run_id = resume_id
                return
            except MlflowException:  # not in this tracking store: a run of its own
                pass
        experiment = self.client.get_experiment_by_name(name)
        # mlflow's default artifact root is ./mlruns in the working directory, not the run folder
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=(output.resolve() / "mlartifacts").as_uri() if local else None)
        self.run_id = self.client.create_run(experiment_id, run_name=output.name).info.run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Parameters with dotted keys (``train.base_lr``), in batches of mlflow's 100 at most."""
        from mlflow.entities import Param

        # mlflow's parameters cannot change: a resumed run keeps the values it started with (epochs, resume ...)
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(key, str(value)) for key, value in flatten(config, ".").items() if key not in logged]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def _log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in values.items()])

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        """``step/loss`` and ``step/lr`` at the global step."""
        self._log(step, {f"step/{k}": v for k, v in values.items()})

    def log_metrics(self, step: int, record: Mapping[str, Any]) -> None:
        """The record's numbers at its epoch (or iteration)."""
        self._log(step, scalars(record))

    def log_artifact(self, path: Path) -> None:
        """Copy the file to the run's artifacts."""
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool = False) -> None:
        """Mark the run finished (or failed)."""
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def wandb_configured() -> bool:
    """Whether W&B has a mode, a key or a ``wandb login`` (a netrc entry for its host) to go by."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(Tracker):
    """A W&B run (project ``WANDB_PROJECT``, else visionmlp), offline where W&B has no key or mode set."""

    def __init__(self, output: Path, x_key: str, resume_id: str | None) -> None:
        import wandb

        self.wandb, self.x_key = wandb, x_key
        # offline, a resumed run is a second folder under the same id, which `wandb sync` adds to the first
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "visionmlp"), name=output.name,
                              mode=None if wandb_configured() else "offline", id=resume_id,
                              resume="allow" if resume_id else None)
        self.run_id = self.run.id
        self.run.define_metric("step/*", step_metric="global_step")

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The nested configuration."""
        self.run.config.update(dict(config), allow_val_change=True)

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        """``step/loss`` and ``step/lr`` against ``global_step``."""
        self.run.log({**{f"step/{k}": v for k, v in values.items()}, "global_step": step})

    def log_metrics(self, step: int, record: Mapping[str, Any]) -> None:
        """The record's numbers with its epoch (or iteration), for the x-axis."""
        self.run.log({**scalars(record), self.x_key: step})

    def log_artifact(self, path: Path) -> None:
        """A model artifact holding the file."""
        artifact = self.wandb.Artifact(f"{self.run.id}-{path.stem}", type="model")
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, failed: bool = False) -> None:
        """Finish the run (an offline one is uploaded later with ``wandb sync``)."""
        self.run.finish(exit_code=1 if failed else 0)


def clearml_configured() -> bool:
    """Whether ClearML has a server to report to: a ``clearml.conf`` or ``CLEARML_API_*`` variables."""
    from clearml.backend_config.defs import get_active_config_file

    keys = ("CLEARML_API_HOST", "CLEARML_API_ACCESS_KEY", "CLEARML_AUTH_TOKEN")
    return get_active_config_file() is not None or any(os.environ.get(key) for key in keys)


# every framework ClearML's Task.init can hook into (a name left out of its dictionary is hooked)
CLEARML_FRAMEWORKS = ("catboost", "fastai", "gradio", "hydra", "joblib", "lightgbm", "matplotlib", "megengine",
                      "pytorch", "scikit", "tensorboard", "tensorflow", "tfdefines", "xgboost")


class ClearMLTracker(Tracker):
    """A ClearML task in project visionmlp; an offline session (``clearml-task --import-offline-session``) where no
    server is configured. Artifacts go to ClearML's ``output_uri`` (e.g. S3), else its file server."""

    def __init__(self, output: Path, resume_id: str | None) -> None:
        from clearml import Task

        if not clearml_configured():
            Task.set_offline(True)
            # offline, ClearML's reporting subprocess never acknowledges a flush, so closing the task would wait out
            # its 10 s liveness check; reporting from this process writes the same session
            from clearml.backend_interface.task.task import Task as BackendTask

            BackendTask._report_subprocess_enabled = False
        # no framework hooks: they would report TensorBoard's scalars a second time and upload every torch.save; no
        # repository detection: its git subprocess, started from a thread of a process running torch's threads, can
        # hang, and the closing task waits for it
        hooks = {name: False for name in CLEARML_FRAMEWORKS}
        self.task = Task.init(project_name="visionmlp", task_name=output.name, reuse_last_task_id=False,
                              continue_last_task=resume_id or False,
                              auto_connect_frameworks={**hooks, "detect_repository": False},
                              auto_connect_arg_parser=False)
        self.run_id = self.task.id
        self.logger = self.task.get_logger()

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Hyperparameters with dotted keys."""
        self.task.connect(flatten(config, "."), name="config")

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        """Plot ``step``, one series per value."""
        for name, value in values.items():
            self.logger.report_scalar("step", name, float(value), iteration=step)

    def log_metrics(self, step: int, record: Mapping[str, Any]) -> None:
        """One plot per figure."""
        for name, value in scalars(record).items():
            self.logger.report_scalar(name, name, float(value), iteration=step)

    def log_artifact(self, path: Path) -> None:
        """Upload the file, waiting for the upload."""
        self.task.upload_artifact(path.name, artifact_object=path, wait_on_upload=True)

    def close(self, failed: bool = False) -> None:
        """Close the task (offline: zip the session), marked failed if the run failed."""
        if failed:
            self.task.mark_failed(status_reason="the training run ended in an exception", force=True)
        self.task.close()


def build_trackers(names: Iterable[str], output: Path, start_step: int, x_key: str,
                   resume_ids: Mapping[str, str | None]) -> dict[str, Tracker]:
    """The trackers named (``none``: no tracker), by name; ``start_step`` is the first epoch (or iteration) to run,
    ``resume_ids`` the runs to continue, by tracker name."""
    builders = {"tensorboard": lambda: TensorBoardTracker(output, start_step),
                "mlflow": lambda: MLflowTracker(output, resume_ids.get("mlflow")),
                "wandb": lambda: WandbTracker(output, x_key, resume_ids.get("wandb")),
                "clearml": lambda: ClearMLTracker(output, resume_ids.get("clearml"))}
    return {name: builders[name]() for name in names if name != "none"}
