"""--tracker: a tiny `visionmlp train` per tracker, offline, read back from what each tracker stored."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionmlp.cli import main

# test_train.py's tiny ViP, one epoch; print_freq 2 logs a few steps
TINY = ["--epochs", "1", "--img-size", "14", "--batch-size", "32", "--workers", "0", "--opts", "model.kwargs",
        "{depths: [1, 1, 1, 1], embed_dims: [16, 32, 32, 32], num_segments: [4, 4, 4, 4]}",
        "train.warmup_epochs", "0", "print_freq", "2", "data.max_train_images", "96", "data.max_val_images", "32"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Every tracker's files under tmp_path, no server, one thread."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_PROJECT",
                 "CLEARML_API_HOST", "CLEARML_API_ACCESS_KEY", "CLEARML_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml"))
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "no-clearml.conf"))
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")  # restored afterwards: Task.set_offline sets it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(output: Path, *trackers: str) -> dict:
    assert main(["train", "--output", str(output), *(["--tracker", *trackers] if trackers else []), *TINY]) == 0
    return json.loads((output / "metrics.jsonl").read_text().splitlines()[-1])


def test_default_is_tensorboard_and_none_turns_it_off(tmp_path):
    train(tmp_path / "default")
    assert list((tmp_path / "default" / "tensorboard").glob("events.out.tfevents.*"))
    train(tmp_path / "none", "none")
    assert not (tmp_path / "none" / "tensorboard").exists()
    assert not (tmp_path / "default" / "trackers.json").exists()  # no tracker run to continue


def test_bad_tracker_choices_are_config_errors(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path), "--opts", "trackers", "[mlfow]"]) == 2
    assert "trackers must be one of tensorboard, mlflow" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path), "--tracker", "none", "mlflow"]) == 2
    assert "none turns every tracker off" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mlflow", "wandb", "clearml"])
def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, capsys, name):
    monkeypatch.setitem(sys.modules, name, None)
    assert main(["train", "--output", str(tmp_path / "run"), "--tracker", "tensorboard", name, *TINY]) == 2
    assert f"pip install 'visionmlp[{name}]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before training


def test_mlflow_local_store(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    output = tmp_path / "run"
    record = train(output, "tensorboard", "mlflow")
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("visionmlp").experiment_id])[0]
    assert run.data.params["model.name"] == "vip_s7" and run.data.params["trackers"] == "['tensorboard', 'mlflow']"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc1")] == [record["val_acc1"]]
    assert len(client.get_metric_history(run.info.run_id, "step/loss")) == 2  # 3 steps at print_freq 2
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["best.pt"]
    assert run.info.status == "FINISHED"


def wandb_records(path: Path):
    """The records of an offline run's .wandb file (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data, position, chunks = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunks += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_run(tmp_path):
    pytest.importorskip("wandb")
    record = train(tmp_path / "run", "wandb")
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    # the configuration comes in config records, or, where W&B sends it before the run starts, in the run record
    configs = [r.config if r.WhichOneof("record_type") == "config" else r.run.config for r in records
               if r.WhichOneof("record_type") in ("config", "run")]
    config = {item.key: json.loads(item.value_json) for c in configs for item in c.update}
    assert config["model"]["name"] == "vip_s7"
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for r in records
               if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert summary["val_acc1"] == pytest.approx(record["val_acc1"]) and summary["global_step"] == 3
    artifacts = [f.path for r in records if r.WhichOneof("record_type") == "artifact"
                 for f in r.artifact.manifest.contents]
    assert artifacts == ["best.pt"]


def test_clearml_offline_session(tmp_path):
    pytest.importorskip("clearml")
    # in a process of its own: ClearML forks its reporter, which deadlocks in a process whose earlier tests left
    # compile-worker threads behind (a training run starts ClearML before anything of the kind exists)
    from test_train import subprocess_env

    command = [sys.executable, "-m", "visionmlp", "train", "--output", str(tmp_path / "run"), "--tracker", "clearml"]
    records = []
    for epochs in (["--epochs", "1"], ["--epochs", "2", "--resume", "auto"]):  # the second continues the task
        run = subprocess.run([*command, *TINY, *epochs], env=subprocess_env(), capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        records.append(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]))
    (session,) = [p for p in (tmp_path / "clearml" / "offline").iterdir() if p.is_dir()]
    assert json.loads((tmp_path / "run" / "trackers.json").read_text())["clearml"] == session.name
    assert (session.parent / f"{session.name}.zip").is_file()
    events = [e for line in (session / "metrics.jsonl").read_text().splitlines() for e in json.loads(line)]
    assert [e["value"] for e in events if e["variant"] == "val_acc1"] == [
        pytest.approx(record["val_acc1"]) for record in records]
    task = json.loads((session / "task.json").read_text())
    assert task["hyperparams"]["config"]["model.name"]["value"] == "vip_s7"
    assert task["hyperparams"]["config"]["train.epochs"]["value"] == "2"
    assert [a["key"] for a in task["execution"]["artifacts"]] == ["best.pt"]


def test_a_failed_run_is_marked_failed_and_resuming_continues_the_tracker_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    wandb.teardown()  # W&B keeps the settings of the first run in a process, WANDB_DIR included
    output = tmp_path / "run"
    first = train(output, "mlflow", "wandb")
    runs = json.loads((output / "trackers.json").read_text())

    class ExplodingLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            return super().forward(logits, targets) * float("nan")

    with monkeypatch.context() as patch:
        patch.setattr("visionmlp.engine.train.LabelSmoothingCrossEntropy", lambda smoothing: ExplodingLoss())
        epochs = ["--epochs", "2", "--resume", "auto"]
        assert main(["train", "--output", str(output), "--tracker", "mlflow", "wandb", *TINY, *epochs]) == 1
    assert "training loss is nan" in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    assert client.get_run(runs["mlflow"]).info.status == "FAILED"  # not left RUNNING
    # offline-run-<time>-<id>, and W&B appends -1 to the second folder where both runs started in the same second
    wandb_runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_ids = [re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", path.name)[1] for path in wandb_runs]
    assert run_ids == [runs["wandb"]] * 2  # the same run, resumed
    (failed_file,) = wandb_runs[1].glob("run-*.wandb")
    assert [r.exit.exit_code for r in wandb_records(failed_file) if r.WhichOneof("record_type") == "exit"] == [1]

    assert main(["train", "--output", str(output), "--tracker", "mlflow", "wandb", *TINY, *epochs]) == 0
    assert json.loads((output / "trackers.json").read_text()) == runs
    second = json.loads((output / "metrics.jsonl").read_text().splitlines()[-1])
    (run,) = client.search_runs([client.get_experiment_by_name("visionmlp").experiment_id])
    assert run.info.run_id == runs["mlflow"] and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_acc1")
    assert [(m.step, m.value) for m in history] == [(0, first["val_acc1"]), (1, second["val_acc1"])]
