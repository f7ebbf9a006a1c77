"""End-to-end `visionmlp train` / `visionmlp eval` on CPU with a tiny ViP configuration (few steps)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import visionmlp
from test_data import make_cifar, make_imagenet_folder, make_imagenet_zip
from visionmlp.checkpoint import read_checkpoint
from visionmlp.cli import main
from visionmlp.engine.train import COMPILE_ON_CPU_WARNING

# vip_s7's architecture at 14 x 14 input with one narrow block per stage (~37 k parameters)
TINY = ["--img-size", "14", "--batch-size", "32", "--workers", "0", "--opts", "model.kwargs",
        "{depths: [1, 1, 1, 1], embed_dims: [16, 32, 32, 32], num_segments: [4, 4, 4, 4]}",
        "train.warmup_epochs", "0", "print_freq", "1000", "data.max_train_images", "192", "data.max_val_images", "96"]

REQUIRED_KEYS = {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "epoch_time_s", "images_per_s",
                 "world_size"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread avoids oversubscription, and matches the child processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: this checkout's package, one thread (repeatable CPU arithmetic)."""
    src = str(Path(visionmlp.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_a_new_run_never_replaces_the_run_in_its_output_folder(tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--output", str(output), *TINY]) == 0
    kept = (output / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--epochs", "1", "--seed", "5", "--output", str(output), *TINY]) == 2
    assert "already holds a run (last.pt); --resume auto continues it" in capsys.readouterr().err
    assert (output / "last.pt").read_bytes() == kept
    assert main(["train", "--epochs", "1", "--seed", "5", "--overwrite", "--output", str(output), *TINY]) == 0
    assert read_checkpoint(output / "last.pt")["config"]["seed"] == 5

    # what a run cannot resume from, and a conversion onto its own input
    capsys.readouterr()
    elsewhere = ["--epochs", "2", "--output", str(tmp_path / "other")]
    assert main(["train", *elsewhere, "--resume", str(output / "model.safetensors"), *TINY]) == 2
    assert "not the last.pt of a run of this command" in capsys.readouterr().err
    wider = [*TINY[:8], "{depths: [1, 1, 1, 1], embed_dims: [24, 32, 32, 32], num_segments: [4, 4, 4, 4]}",
             *TINY[9:]]
    assert main(["train", *elsewhere, "--resume", str(output / "last.pt"), *wider]) == 2
    assert "checkpoint does not fit this run's model" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", str(output / "last.pt"), "--output", str(output / "last.pt")]) == 2
    assert "is the checkpoint being converted" in capsys.readouterr().err
    assert read_checkpoint(output / "last.pt")["optimizer"]


def test_a_run_records_its_class_names_for_predict_and_eval(tmp_path, capsys):
    root = make_imagenet_folder(tmp_path / "data")
    output = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-path", str(root), "--epochs", "1", "--output", str(output),
                 *TINY]) == 0
    names = sorted(p.name for p in (root / "train").iterdir())
    assert read_checkpoint(output / "last.pt")["classes"] == names
    capsys.readouterr()
    image = str(next((root / "val").rglob("*.jpg")))
    for weights in ("last.pt", "model.safetensors"):
        assert main(["predict", "--checkpoint", str(output / weights), image, "--json", "--top-k", "2"]) == 0
        labels = [entry["label"] for entry in json.loads(capsys.readouterr().out)[0]["top"]]
        assert len(labels) == 2 and set(labels) <= set(names), weights
    assert main(["predict", "--checkpoint", str(output / "last.pt"), image, "--top-k", "0"]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err
    shutil.rmtree(root / "train")  # evaluating needs val/ alone: its class folders name the classes
    assert main(["eval", "--checkpoint", str(output / "last.pt"), "--data-path", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == len(list((root / "val").rglob("*.jpg")))
    (root / "val" / names[0]).rename(root / "val" / "zebra")  # the same number of classes, under other names
    assert main(["eval", "--checkpoint", str(output / "last.pt"), "--data-path", str(root)]) == 2
    assert "the data's classes are not those" in capsys.readouterr().err


def test_data_a_classifier_cannot_learn_from_is_refused(tmp_path, capsys, monkeypatch):
    root = make_imagenet_folder(tmp_path / "data")
    folder = ["train", "--dataset", "folder", "--data-path", str(root), "--epochs", "1", "--img-size", "14",
              "--workers", "0", "--opts", "print_freq", "1000"]
    for path in (root / "train").rglob("*.jpg"):
        path.write_bytes(b"not a jpeg")
    assert main([*folder, "--output", str(tmp_path / "unreadable")]) == 2
    assert "not one training image could be read (" in capsys.readouterr().err
    for name in ("train", "val"):
        for extra in sorted((root / name).iterdir())[1:]:
            shutil.rmtree(extra)
    assert main([*folder, "--output", str(tmp_path / "one")]) == 2
    assert "holds 1 class sub-folder; a classifier needs" in capsys.readouterr().err
    assert main(["train", "--device", "tpu", "--output", str(tmp_path / "tpu")]) == 2
    assert "device must be 'cpu' or 'cuda[:N]'" in capsys.readouterr().err

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("visionmlp.engine.train.train", interrupted)
    assert main(["train", "--output", str(tmp_path / "stopped")]) == 130
    assert "interrupted; its last.pt, if one was written, continues with --resume auto" in capsys.readouterr().err


def test_train_and_eval_on_digits(tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--output", str(output), *TINY]) == 0
    records = read_metrics(output)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(REQUIRED_KEYS <= set(r) for r in records)
    assert records[-1]["world_size"] == 1 and 0 <= records[-1]["val_acc1"] <= records[-1]["val_acc5"] <= 100
    for name in ("last.pt", "best.pt", "config.yaml", "curves.png", "model.safetensors"):
        assert (output / name).is_file(), name
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = read_checkpoint(output / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "model_ema", "epoch", "rng", "config"} <= set(checkpoint)
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["model"]["name"] == "vip_s7"
    assert checkpoint["optimizer"]["param_groups"][0]["fused"] is True  # AdamW's single-kernel update
    assert checkpoint["config"]["train"]["amp"] == "none"  # train.amp auto, as chosen on a CPU

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(output / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-5)
    assert result["acc1"] == pytest.approx(records[-1]["val_acc1"])
    assert {"acc1", "acc5", "loss", "images"} <= set(result) and result["images"] == 96

    # the weights file records its run's configuration and classes: it evaluates alone, to the same numbers
    weights = read_checkpoint(output / "model.safetensors")
    assert weights["config"]["model"]["name"] == "vip_s7" and weights["classes"] == [str(i) for i in range(10)]
    assert main(["eval", "--checkpoint", str(output / "model.safetensors"), "--json"]) == 0
    from_weights = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_weights == {**result, "checkpoint": str(output / "model.safetensors")}
    # bare weights (written by another tool), with the run's config.yaml as recipe, give the same numbers
    save_file(weights["model"], tmp_path / "bare.safetensors")
    assert main(["eval", "--model", "vip_s7", "--checkpoint", str(tmp_path / "bare.safetensors"),
                 "--cfg", str(output / "config.yaml"), "--json"]) == 0
    bare = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bare["loss"] == pytest.approx(result["loss"], rel=1e-6) and bare["acc1"] == result["acc1"]


def test_train_on_imagenet_zip_with_cache_ema_and_accumulation(tmp_path):
    root = make_imagenet_zip(tmp_path / "zip", per_class=4, corrupt=True)
    output = tmp_path / "run"
    # no --cfg: the vip family recipe (RandAugment, mixup/cutmix, random erasing) with tiny overrides
    args = ["train", "--model", "vip_s7", "--dataset", "imagenet", "--zip", "--cache-mode", "part",
            "--data-path", str(root), "--epochs", "1", "--accumulation-steps", "2", "--output", str(output),
            *TINY, "train.ema", "true", "data.batch_size", "4"]
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert main(args) == 0
    record = read_metrics(output)[0]
    assert record["skipped_images"] == 1 and "val_acc1_ema" in record
    assert (output / "model_ema.safetensors").is_file()


def test_train_on_imagenet_folder_and_cifar(tmp_path):
    folder = make_imagenet_folder(tmp_path / "folder")
    assert main(["train", "--model", "vip_s7", "--dataset", "imagenet", "--data-path", str(folder),
                 "--cache-mode", "full", "--epochs", "1", "--output", str(tmp_path / "a"), *TINY,
                 "aug.mixup", "0", "aug.cutmix", "0"]) == 0
    cifar = make_cifar(tmp_path / "cifar", "cifar100")
    assert main(["train", "--model", "vip_s7", "--dataset", "cifar100", "--data-path", str(cifar), "--epochs", "1",
                 "--output", str(tmp_path / "b"), *TINY]) == 0
    assert read_metrics(tmp_path / "b")[0]["val_acc5"] >= 0


def test_fused_optimizer_and_compiled_training_follow_the_plain_loop(tmp_path, capsys):
    # (flags, config overrides); the overrides go last, after the tiny model's own
    runs = {"plain": ([], ["train.opt_fused", "false"]), "fused": ([], []), "compiled": (["--compile"], [])}
    records = {}
    torch._dynamo.reset()
    for label, (flags, opts) in runs.items():
        output = tmp_path / label
        assert main(["train", "--epochs", "2", "--seed", "5", "--output", str(output), *flags, *TINY, *opts]) == 0
        records[label] = read_metrics(output)
        # compiling a CPU training step is allowed, but the user is told it is the slower choice there
        assert (COMPILE_ON_CPU_WARNING in capsys.readouterr().out) == (label == "compiled"), label
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled run did compile
    for label in ("fused", "compiled"):
        for got, expected in zip(records[label], records["plain"], strict=True):
            assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-4), label
            assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-4), label


def test_a_terminated_run_resumes_to_the_same_result(tmp_path):
    command = [sys.executable, "-m", "visionmlp", "train", "--epochs", "3", "--seed", "3", *TINY]
    env = subprocess_env()
    reference = subprocess.Popen([*command, "--output", str(tmp_path / "ref")], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_dir = tmp_path / "killed"
    victim = subprocess.Popen([*command, "--output", str(killed_dir), "--resume", "auto"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        assert victim.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)  # a scheduler's pre-emption, after epoch 0 was checkpointed
    assert victim.wait(timeout=120) == 128 + signal.SIGTERM
    assert "terminated (SIGTERM); its last.pt, if one was written, continues with --resume auto" in victim.stderr.read()
    assert len(read_metrics(killed_dir)) < 3
    assert not list(killed_dir.glob(".*.tmp"))  # a checkpoint being written when the signal came is removed

    resumed = subprocess.run([*command, "--output", str(killed_dir), "--resume", "auto"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    expected, got = read_metrics(tmp_path / "ref"), read_metrics(killed_dir)
    assert [r["epoch"] for r in got] == [0, 1, 2]  # each epoch once
    assert got[-1]["val_loss"] == pytest.approx(expected[-1]["val_loss"], rel=1e-6, abs=1e-9)
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in expected], rel=1e-6)


def test_a_forked_worker_ends_on_sigterm_as_it_would_without_the_handler():
    import multiprocessing

    from visionmlp.cli import sigterm_raises

    fork = multiprocessing.get_context("fork")
    started = fork.Event()

    def sleep_once_started() -> None:
        started.set()  # a signal that came before Python's after-fork set-up would be dropped
        time.sleep(60)

    with sigterm_raises():  # a data-loader worker forked during a run inherits the handler
        worker = fork.Process(target=sleep_once_started)
        worker.start()
        try:
            assert started.wait(timeout=60)
            worker.terminate()
            worker.join(timeout=30)
        finally:
            worker.kill()
    assert worker.exitcode == -signal.SIGTERM  # not a Terminated traceback (exit code 1)


def torchrun_train(*args: str, command: tuple[str, ...] = ("train",)) -> subprocess.CompletedProcess:
    """``visionmlp COMMAND ARGS`` (default ``train``) in two CPU processes under torchrun (gloo), on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "visionmlp", *command, "--device", "cpu", *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_torchrun_with_gloo(tmp_path):
    output = tmp_path / "ddp"
    # with DDP's static graph and small gradient buckets (the truthfulness test's torchrun run keeps the defaults)
    result = torchrun_train("--epochs", "1", "--output", str(output), *TINY, "train.ddp_static_graph", "true",
                            "train.ddp_bucket_cap_mb", "1")
    records = read_metrics(output)
    assert len(records) == 1 and records[0]["world_size"] == 2
    assert result.stdout.count("epoch 1/1: train loss") == 1  # only rank 0 logs
    assert read_checkpoint(output / "last.pt")["rng"].__len__() == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--output", str(output), *TINY]) == 0

    class ExplodingLoss(torch.nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits, targets):
            ExplodingLoss.calls += 1
            loss = super().forward(logits, targets)
            return loss * float("nan") if ExplodingLoss.calls > 3 else loss

    monkeypatch.setattr("visionmlp.engine.train.LabelSmoothingCrossEntropy", lambda smoothing: ExplodingLoss())
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--output", str(output), "--resume", "auto", *TINY]) == 1
    assert "training loss is nan at epoch 2, between steps 1 and " in capsys.readouterr().err
    assert read_checkpoint(output / "last.pt")["epoch"] == 0
    assert [r["epoch"] for r in read_metrics(output)] == [0]


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet", "--data-path", "/no/such/dir"], "is not a directory"),
    (["--dataset", "cifar10"], "needs --data-path"),
    (["--resume", "/no/such/last.pt"], "no such checkpoint"),
    (["--opts", "train.epochz", "1"], "did you mean train.epochs"),
    (["--opts", "train.optimizer", "adamx"], "'adamx' is not an optimizer timm knows; choose one of adabelief"),
])
def test_bad_input_fails_at_once_with_a_clear_error(args, message, capsys):
    assert main(["train", *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_of_an_official_checkpoint_goes_through_the_converter(tmp_path, capsys):
    from synthetic_weights import load_reference, synthetic_state_dict

    layout, _, _ = load_reference("vip_s7")
    torch.save({"state_dict": synthetic_state_dict(layout)}, tmp_path / "official.pth")
    args = ["eval", "--model", "vip_s7", "--checkpoint", str(tmp_path / "official.pth"), "--dataset", "digits",
            "--workers", "0", "--json", "--opts", "model.num_classes", "1000", "data.max_val_images", "8"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8
    assert main([*args[:-4], "data.max_val_images", "8"]) == 2  # 10-class head: the size mismatch is an error
    assert "head" in capsys.readouterr().err


def test_throughput_hands_over_to_the_benchmark(capsys):
    assert main(["train", "--throughput", "--model", "vip_s7", "--img-size", "14", "--batch-size", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["images_per_s"] > 0


def test_other_commands_build_the_model_a_run_checkpoint_records(tmp_path, capsys):
    # benchmark, convert, predict and export need no --model for a checkpoint of visionmlp train: it records the
    # reduced architecture, the 10 digit classes and the 14-pixel input, none of them vip_s7's defaults
    output = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--output", str(output), *TINY]) == 0
    checkpoint = str(output / "last.pt")
    capsys.readouterr()
    assert main(["benchmark", "--checkpoint", checkpoint, "--dtype", "bf16", "--val-images", "8", "--batch-size", "2",
                 "--warmup", "0", "--reps", "1", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "vip_s7" and result["img_size"] == 14 and result["params"] < 100_000
    assert result["agreement_images"] == "8 images of the run's digits validation set"
    assert result["weights"] == checkpoint and 0 <= result["fp32_top1_agreement"] <= 100

    deployed = tmp_path / "deployed.pt"
    assert main(["convert", "--checkpoint", checkpoint, "--deploy", "--output", str(deployed)]) == 0
    image = tmp_path / "digit.png"
    image_tensor, _ = visionmlp.data.build_dataset("digits", "val", None, img_size=14)[0]
    image_tensor.save(image)
    capsys.readouterr()
    # the converted file keeps the record, and predict preprocesses as the run evaluated
    assert main(["predict", "--checkpoint", str(deployed), "--deploy", "--top-k", "3", "--json", str(image)]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)
    assert len(prediction["top"]) == 3 and all(0 <= entry["index"] < 10 for entry in prediction["top"])

    program = tmp_path / "digits.pt2"
    assert main(["export", "--checkpoint", checkpoint, "--format", "exported-program", "--output", str(program)]) == 0
    assert torch.export.load(program).module()(torch.randn(3, 3, 14, 14)).shape == (3, 10)

    for flags, message in [(["--model", "vip_m7"], "holds vip_s7"), (["--num-classes", "5"], "10-class vip_s7")]:
        assert main(["convert", "--checkpoint", checkpoint, "--check", *flags]) == 2
        assert message in capsys.readouterr().err
    for command in ("benchmark", "eval"):
        assert main([command, "--model", "raft_mlp_s", "--checkpoint", checkpoint]) == 2
        assert "holds vip_s7" in capsys.readouterr().err


def test_a_run_of_another_timm_model_trains_and_evaluates(tmp_path, capsys):
    # any timm model trains; its checkpoint records it for eval, and the variant-only commands refuse it clearly
    output = tmp_path / "run"
    assert main(["train", "--model", "resnet10t", "--epochs", "1", "--output", str(output), "--img-size", "16",
                 "--workers", "0", "--opts", "data.max_train_images", "64", "data.max_val_images", "32"]) == 0
    checkpoint = str(output / "last.pt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", checkpoint, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "resnet10t"
    for command in (["convert", "--check"], ["benchmark", "--reps", "1"]):
        assert main([*command, "--checkpoint", checkpoint]) == 2
        assert "holds the timm model 'resnet10t'" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint_is_a_clear_error(capsys):
    assert main(["eval", "--model", "vip_s7", "--checkpoint", "/no/such.pt"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_loss_is_read_every_print_freq_steps_not_every_step(tmp_path, monkeypatch):
    # a read of a device tensor makes the host wait for the device: one per logging window, none per step
    import visionmlp.engine.train as train_module

    reads = []

    def counting_all_reduce(tensor, ctx):
        reads.append(tensor.numel())
        return tensor

    monkeypatch.setattr(train_module, "all_reduce_sum", counting_all_reduce)
    # 192 images in batches of 32: 6 steps, logged every 4 steps and at the end
    assert main(["train", "--epochs", "1", "--output", str(tmp_path / "run"), *TINY, "print_freq", "4"]) == 0
    assert reads == [2, 2, 2]  # the two windows' (loss sum, steps), then the counts of images read and unreadable


def test_a_run_with_its_own_thread_count_leaves_the_callers_alone(tmp_path):
    before = torch.get_num_threads()
    # the default recipe trains on one thread
    assert main(["train", "--epochs", "1", "--output", str(tmp_path / "run"), *TINY, "threads", "1"]) == 0
    assert torch.get_num_threads() == before


def test_automatic_mixed_precision_is_bf16_on_a_gpu_that_has_it_and_none_on_a_cpu(monkeypatch):
    from visionmlp.engine.machine import resolve_amp

    assert resolve_amp("auto", torch.device("cpu")) == "none"
    assert resolve_amp("fp16", torch.device("cpu")) == "fp16"  # a choice made is kept
    for has_bf16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda has_bf16=has_bf16: has_bf16)
        assert resolve_amp("auto", torch.device("cuda")) == expected
        assert resolve_amp("none", torch.device("cuda")) == "none"
