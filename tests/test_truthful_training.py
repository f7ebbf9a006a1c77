"""What a run logs for its last epoch is what `visionmlp eval` measures on the weights it saved.

At the sizes users run, with the default fused AdamW (which updates parameters in place without moving their
version counters), with fast kernels on: no derived form of a weight may outlive an optimizer step.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import visionmlp
from test_train import read_metrics, torchrun_train
from visionmlp.cli import main
from visionmlp.engine.distributed import DistContext
from visionmlp.engine.evaluate import evaluate

# The smallest variant of each family at full width and low resolution: big enough for every fast kernel
SMALLEST_AT_LOW_RESOLUTION = {
    "ms_mlp_tiny": 32, "vip_s7": 28, "strip_mlp_tiny_light": 32, "raft_mlp_s": 32, "repmlpnet_t224": 32,
}
FEW_IMAGES = ["--workers", "0", "--opts", "data.max_train_images", "48", "data.max_val_images", "40",
              "data.batch_size", "16", "print_freq", "1000"]


def eval_json(checkpoint, capsys, *flags: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def assert_logged_equals_eval(record: dict, measured: dict, suffix: str = "") -> None:
    assert record[f"val_loss{suffix}"] == pytest.approx(measured["loss"], rel=1e-5)
    assert record[f"val_acc1{suffix}"] == pytest.approx(measured["acc1"], abs=1e-9)
    assert record[f"val_acc5{suffix}"] == pytest.approx(measured["acc5"], abs=1e-9)


def test_default_run_logs_what_eval_measures(tmp_path, capsys):
    # the default `visionmlp train` (digits, the reduced ViP, fused AdamW, fast kernels), two of its epochs
    output = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--output", str(output)]) == 0
    record = read_metrics(output)[-1]
    assert_logged_equals_eval(record, eval_json(output / "last.pt", capsys))


def test_normalising_on_the_device_trains_as_normalising_in_workers(tmp_path, capsys):
    # the same pixels reach the model either way (no random erasing in this recipe): the same run, to the bit
    records = {}
    for where in ("worker", "device"):
        output = tmp_path / where
        assert main(["train", "--epochs", "1", "--output", str(output), "--opts", "data.normalize_on", where,
                     "data.max_train_images", "256", "data.max_val_images", "120"]) == 0
        records[where] = read_metrics(output)[-1]
        assert_logged_equals_eval(records[where], eval_json(output / "last.pt", capsys))
    for key in ("train_loss", "val_loss", "val_acc1", "val_acc5"):
        assert records["device"][key] == records["worker"][key], key
    state = {where: torch.load(tmp_path / where / "last.pt", weights_only=True)["model"] for where in records}
    assert all(torch.equal(state["device"][k], state["worker"][k]) for k in state["worker"])


def test_channels_last_run_trains_so_and_is_evaluated_so(tmp_path, capsys):
    # the weights and batches in NHWC memory (a model with convolutions): eval of the run's checkpoint takes the
    # recorded layout, so that it measures what the run's own validation did
    output = tmp_path / "run"
    assert main(["train", "--model", "strip_mlp_tiny_light", "--img-size", "32", "--epochs", "1", "--channels-last",
                 "--output", str(output), *FEW_IMAGES]) == 0
    stem = torch.load(output / "last.pt", weights_only=True)["model"]["stem.weight"]
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    measured = eval_json(output / "last.pt", capsys)
    assert measured["channels_last"] is True and measured["amp"] == "none"  # as recorded: train.amp auto on a CPU
    assert_logged_equals_eval(read_metrics(output)[-1], measured)


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALLEST_AT_LOW_RESOLUTION)
def test_full_width_variant_logs_what_eval_measures(name, tmp_path, capsys):
    output = tmp_path / name
    size = str(SMALLEST_AT_LOW_RESOLUTION[name])
    assert main(["train", "--model", name, "--img-size", size, "--epochs", "2", "--output", str(output),
                 "--seed", "1", *FEW_IMAGES, "train.warmup_epochs", "0", "train.ema", "true"]) == 0
    checkpoint = torch.load(output / "last.pt", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["fused"] is True
    record = read_metrics(output)[-1]
    assert_logged_equals_eval(record, eval_json(output / "last.pt", capsys))
    assert_logged_equals_eval(record, eval_json(output / "last.pt", capsys, "--ema"), suffix="_ema")


@pytest.mark.slow
def test_resumed_run_logs_what_eval_measures(tmp_path, capsys):
    output = tmp_path / "run"
    common = ["train", "--model", "strip_mlp_tiny_light", "--img-size", "32", "--seed", "2", "--output", str(output),
              "--resume", "auto"]
    assert main([*common, "--epochs", "1", *FEW_IMAGES]) == 0
    assert main([*common, "--epochs", "3", *FEW_IMAGES]) == 0
    records = read_metrics(output)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert_logged_equals_eval(records[-1], eval_json(output / "last.pt", capsys))


@pytest.mark.slow
def test_two_process_run_logs_what_eval_measures(tmp_path, capsys):
    output = tmp_path / "ddp"
    # RepMLPNet has BatchNorms, whose statistics each rank updates on its own batches
    torchrun_train("--model", "repmlpnet_t224", "--img-size", "32", "--epochs", "2", "--output", str(output),
                   *FEW_IMAGES)
    record = read_metrics(output)[-1]
    assert record["world_size"] == 2
    assert_logged_equals_eval(record, eval_json(output / "last.pt", capsys))


@pytest.mark.parametrize("fast_kernels", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("name", SMALLEST_AT_LOW_RESOLUTION)
def test_evaluation_after_fused_adamw_steps_sees_the_new_weights(name, fast_kernels):
    # two in-place optimizer steps, then an evaluation pass: equal to a fresh model holding the same state dict
    size = SMALLEST_AT_LOW_RESOLUTION[name]
    torch.manual_seed(0)
    model = visionmlp.create_model(name, img_size=size, num_classes=10, fast_kernels=fast_kernels)
    images, targets = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    loader = [(images, targets, 0)]
    context = DistContext(0, 1, 0, torch.device("cpu"))
    evaluate(model, loader, context)  # an evaluation before the steps, as after a first epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for _ in range(2):
        model.train()
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    fresh = visionmlp.create_model(name, img_size=size, num_classes=10, fast_kernels=fast_kernels)
    fresh.load_state_dict(model.state_dict())
    assert evaluate(model, loader, context) == evaluate(fresh, loader, context)
