"""The deployment commands: convert (deploy, check, int8), export (ONNX, torch.export), predict, eval --deploy."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from synthetic_weights import REFERENCE_DIR, load_reference, reference_input, relative_l2, synthetic_state_dict

from visionmlp import create_model
from visionmlp.cli import main
from visionmlp.engine import evaluate as evaluate_module
from visionmlp.engine.benchmark import results_notes, run_benchmark
from visionmlp.inference import FrozenCompiled, optimize_for_inference
from visionmlp.engine.quantize import load_quantized

SIZE = 64


@pytest.fixture(scope="module")
def repmlpnet_checkpoint(tmp_path_factory) -> str:
    """A training-form RepMLPNet-T224 checkpoint built for 64x64, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = create_model("repmlpnet_t224", img_size=SIZE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    path = tmp_path_factory.mktemp("checkpoints") / "repmlpnet_train.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, path)
    return str(path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.skipif(not (REFERENCE_DIR / "strip_mlp_tiny_light_64.safetensors").exists(), reason="no reference")
def test_convert_official_strip_mlp_checkpoint_to_deploy_form(tmp_path, capsys):
    layout, logits, _ = load_reference("strip_mlp_tiny_light_64")
    official = tmp_path / "official.pth"
    torch.save({"model": synthetic_state_dict(layout), "epoch": 3}, official)
    output = tmp_path / "deploy.safetensors"
    code, out, _ = run_cli(capsys, "convert", "--model", "strip_mlp_tiny_light", "--checkpoint", str(official),
                           "--img-size", str(SIZE), "--deploy", "--output", str(output), "--json")
    assert code == 0 and json.loads(out)["batchnorms_folded"] == 24
    model = create_model("strip_mlp_tiny_light", img_size=SIZE, deploy=True, checkpoint_path=output)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    with torch.no_grad():  # in float32: Strip-MLP's grouped convolutions are slow in float64 on CPU
        assert relative_l2(model.eval()(images.float()), logits) < 1e-5  # the official model's logits


def test_convert_check_mode_reports_a_tiny_difference(repmlpnet_checkpoint, capsys):
    code, out, _ = run_cli(capsys, "convert", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint,
                           "--img-size", str(SIZE), "--check", "--json")
    result = json.loads(out)
    assert code == 0 and result["batchnorms_folded"] == 76
    assert result["max_rel_diff"] <= 1e-5


def test_convert_int8_reports_agreement_and_reloads(repmlpnet_checkpoint, tmp_path, capsys):
    output = tmp_path / "int8.pt"
    code, out, _ = run_cli(capsys, "convert", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint,
                           "--img-size", str(SIZE), "--quantize", "int8", "--quantize-batch", "2",
                           "--output", str(output), "--json")
    result = json.loads(out)
    assert code == 0 and result["form"] == "deploy"
    assert result["quantized_linear_layers"] == 1  # the head; the partition FCs and FFNs run as matmuls
    assert 0 <= result["top1_agreement"] <= 100 and result["int8_ms_per_batch"] > 0
    quantized = load_quantized("repmlpnet_t224", output, img_size=SIZE)
    fp32 = create_model("repmlpnet_t224", img_size=SIZE, checkpoint_path=repmlpnet_checkpoint).eval()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert type(quantized.head).__name__ == "Linear" and "quantized" in type(quantized.head).__module__
        reference = fp32(images)
        # int8 activations and weights: a few per cent of the logits' scale, far from a broken model
        assert (quantized(images) - reference).norm() / reference.norm() < 0.1


def test_convert_errors_name_the_fix(repmlpnet_checkpoint, tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint,
                           "--img-size", str(SIZE), "--output", str(tmp_path / "out.bin"))
    assert code == 2 and "must end in one of .pt, .pth, .safetensors" in err
    code, _, err = run_cli(capsys, "convert", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint)
    assert code == 2 and "--output is required" in err
    assert not list(tmp_path.iterdir())


def test_onnx_export_round_trip_with_dynamic_batch(repmlpnet_checkpoint, tmp_path, capsys):
    import onnxruntime

    output = tmp_path / "model.onnx"
    code, out, _ = run_cli(capsys, "export", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint,
                           "--img-size", str(SIZE), "--deploy", "--format", "onnx", "--output", str(output), "--json")
    assert code == 0 and json.loads(out)["max_abs_diff"] < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, SIZE, SIZE)
    model = create_model("repmlpnet_t224", img_size=SIZE, checkpoint_path=repmlpnet_checkpoint).eval()
    with torch.no_grad():
        reference = model(images).numpy()
    np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], reference, atol=1e-4, rtol=1e-4)


def test_onnx_export_of_the_training_form(repmlpnet_checkpoint, tmp_path, capsys):
    # the kernels built from weights (RaftMLP's merged embedding, RepMLPNet's tiled local convs) keep shapes the
    # exporter can read
    raft = tmp_path / "raft.pt"
    torch.save(create_model("raft_mlp_s", img_size=SIZE).state_dict(), raft)
    for name, checkpoint in (("raft_mlp_s", str(raft)), ("repmlpnet_t224", repmlpnet_checkpoint)):
        code, out, _ = run_cli(capsys, "export", "--model", name, "--checkpoint", checkpoint, "--img-size", str(SIZE),
                               "--format", "onnx", "--output", str(tmp_path / f"{name}.onnx"), "--json")
        assert code == 0 and json.loads(out)["max_abs_diff"] < 1e-4, name


def test_exported_program_reloads(tmp_path, capsys):
    checkpoint = tmp_path / "raft.pt"
    torch.save(create_model("raft_mlp_s", img_size=SIZE).state_dict(), checkpoint)
    output = tmp_path / "raft.pt2"
    code, out, _ = run_cli(capsys, "export", "--model", "raft_mlp_s", "--checkpoint", str(checkpoint),
                           "--img-size", str(SIZE), "--format", "exported-program", "--output", str(output))
    assert code == 0 and "largest difference" in out and output.is_file()
    program = torch.export.load(str(output))
    assert program.module()(torch.randn(4, 3, SIZE, SIZE)).shape == (4, 1000)


def test_export_errors_name_the_fix(repmlpnet_checkpoint, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "export", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint,
                           "--format", "onnx", "--output", str(tmp_path / "model.pt2"))
    assert code == 2 and "writes .onnx files" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    code, _, err = run_cli(capsys, "export", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint,
                           "--img-size", str(SIZE), "--format", "onnx", "--output", str(tmp_path / "model.onnx"))
    assert code == 2 and "pip install 'visionmlp[deploy]'" in err
    assert not list(tmp_path.iterdir())


def test_predict_gives_five_imagenet_labels(repmlpnet_checkpoint, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "generated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(image)
    code, out, _ = run_cli(capsys, "predict", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint,
                           "--img-size", str(SIZE), "--deploy", "--json", str(image))
    assert code == 0
    (result,) = json.loads(out)
    top = result["top"]
    assert len(top) == 5 and all(isinstance(t["label"], str) and t["label"] for t in top)
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    from timm.data import ImageNetInfo

    assert top[0]["label"] == ImageNetInfo().index_to_description(top[0]["index"])

    code, _, err = run_cli(capsys, "predict", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint,
                           "--img-size", str(SIZE), str(tmp_path / "missing.png"))
    assert code == 2 and "missing.png" in err


def test_predict_skips_an_unreadable_image_with_a_warning_and_exit_status_1(repmlpnet_checkpoint, tmp_path, capsys):
    from PIL import Image

    image, broken = tmp_path / "generated.png", tmp_path / "broken.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(image)
    broken.write_text("not an image")
    model = ["predict", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint, "--img-size", str(SIZE)]
    code, out, err = run_cli(capsys, *model, "--json", str(broken), str(image))
    assert code == 1 and [result["image"] for result in json.loads(out)] == [str(image)]
    assert err == f"visionmlp predict: warning: skipped: could not read image {str(broken)!r}: " \
                  f"cannot identify image file {str(broken)!r}\n"
    code, out, err = run_cli(capsys, *model, str(broken), str(tmp_path / "missing.png"))
    assert code == 2 and "error: none of the 2 images could be read" in err and "missing.png' does not exist" in err


def test_benchmark_int8_reports_agreement():
    result = run_benchmark("raft_mlp_s", img_size=SIZE, batch_size=2, warmup=1, reps=1, quantize="int8")
    assert result["quantized_linear_layers"] > 0 and 0 <= result["fp32_top1_agreement"] <= 100
    assert 0 < result["fp32_max_rel_logit_diff"] < 0.5  # int8 rounding, far from a broken model
    assert "int8 dynamic quantization" in results_notes([result])
    with pytest.raises(ValueError, match="CPU inference"):
        run_benchmark("raft_mlp_s", img_size=SIZE, mode="train", quantize="int8")


def test_eval_training_form_deploy_form_and_folded_in_place_agree(repmlpnet_checkpoint, tmp_path, capsys):
    deploy = tmp_path / "deploy.pt"
    assert main(["convert", "--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint, "--img-size",
                 str(SIZE), "--deploy", "--output", str(deploy)]) == 0
    common = ["--model", "repmlpnet_t224", "--dataset", "digits", "--img-size", str(SIZE), "--workers", "0",
              "--json", "--opts", "model.num_classes", "1000", "data.max_val_images", "4"]
    results = []
    for checkpoint, flags in ((repmlpnet_checkpoint, []), (repmlpnet_checkpoint, ["--deploy"]), (deploy, ["--deploy"])):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(checkpoint), *flags, *common]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[1]["loss"] == pytest.approx(results[2]["loss"], rel=1e-6)
    assert main(["eval", "--checkpoint", str(deploy), *common]) == 2  # a folded checkpoint needs --deploy


def test_eval_runs_the_benchmarks_fast_path_on_data(repmlpnet_checkpoint, capsys, monkeypatch):
    prepared = []

    def recording_optimize_for_inference(model, **kwargs):
        result = optimize_for_inference(model, **kwargs)
        weight = model.conv_embedding.conv.weight
        prepared.append((isinstance(result, FrozenCompiled), weight.dtype,
                         weight.is_contiguous(memory_format=torch.channels_last)))
        return result

    monkeypatch.setattr(evaluate_module, "optimize_for_inference", recording_optimize_for_inference)
    # 4 images in batches of 3: the compiled graph meets a second batch size
    common = ["--model", "repmlpnet_t224", "--checkpoint", repmlpnet_checkpoint, "--dataset", "digits", "--img-size",
              str(SIZE), "--workers", "0", "--batch-size", "3", "--deploy", "--json",
              "--opts", "model.num_classes", "1000", "data.max_val_images", "4"]
    results = []
    for flags in ([], ["--dtype", "bf16", "--channels-last", "--compile"]):
        capsys.readouterr()
        assert main(["eval", *common, *flags]) == 0
        results.append(json.loads(capsys.readouterr().out))
    fp32, fast = results
    assert (fp32["dtype"], fp32["channels_last"], fp32["compile"]) == ("fp32", False, False)
    assert (fast["dtype"], fast["channels_last"], fast["compile"]) == ("bf16", True, True)
    assert fast["images"] == fp32["images"] == 4
    assert fast["loss"] == pytest.approx(fp32["loss"], rel=2e-2) and fast["loss"] != fp32["loss"]
    assert prepared == [(False, torch.float32, False), (True, torch.bfloat16, True)]  # eval goes through it

    capsys.readouterr()
    assert main(["eval", *common, "--dtype", "bf16", "--amp", "bf16"]) == 2
    assert "--amp bf16 autocasts fp32" in capsys.readouterr().err


@pytest.mark.skipif(not (REFERENCE_DIR / "repmlpnet_t224_deploy.safetensors").exists(), reason="no reference")
def test_convert_official_repmlpnet_deploy_checkpoint_folds_the_rest(tmp_path, capsys):
    layout, logits, _ = load_reference("repmlpnet_t224_deploy")
    official = tmp_path / "official_deploy.pth"
    torch.save({"model": synthetic_state_dict(layout)}, official)
    output = tmp_path / "deploy.pt"
    code, _, _ = run_cli(capsys, "convert", "--model", "repmlpnet_t224", "--checkpoint", str(official),
                         "--deploy", "--output", str(output))
    assert code == 0
    model = create_model("repmlpnet_t224", deploy=True, checkpoint_path=output).eval()
    with torch.no_grad():
        assert relative_l2(model(reference_input(224).float()), logits) < 1e-5
    code, _, err = run_cli(capsys, "convert", "--model", "repmlpnet_t224", "--checkpoint", str(official), "--check")
    assert code == 2 and "deploy" in err  # check mode needs a training-form checkpoint


def test_benchmark_checks_a_fast_path_on_validation_images(repmlpnet_checkpoint, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(5):  # two class folders, as in ImageNet's val/
        folder = tmp_path / "val" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (70 + i, 90, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "val" / "notes.txt").write_text("not an image")
    common = ["benchmark", "--model", "repmlpnet_t224", "--img-size", str(SIZE), "--batch-size", "2",
              "--warmup", "0", "--reps", "1", "--threads", "1", "--json"]
    code, out, _ = run_cli(capsys, *common, "--checkpoint", repmlpnet_checkpoint, "--deploy", "--channels-last",
                           "--val-data", str(tmp_path / "val"), "--val-images", "3")
    result = json.loads(out)
    assert code == 0 and result["weights"] == repmlpnet_checkpoint
    assert result["agreement_images"] == f"3 images from {tmp_path / 'val'}"
    # the fp32 deploy form computes the training form's outputs
    assert result["fp32_top1_agreement"] == 100.0 and result["fp32_max_rel_logit_diff"] <= 1e-5

    (tmp_path / "empty").mkdir()
    for extra, message in [
        (["--val-data", str(tmp_path / "missing")], "is not a directory"),
        (["--val-data", str(tmp_path / "empty")], "holds no image files"),
        (["--val-data", str(tmp_path / "val"), "--val-images", "0"], "--val-images must be >= 1"),
        (["--val-data", str(tmp_path / "val"), "--mode", "train"], "use it with --mode infer"),
        (["--val-data", str(tmp_path / "val"), "--dtype", "fp32"], "at least one of --dtype bf16|fp16, --deploy"),
        (["--checkpoint", str(tmp_path / "missing.pth")], "missing.pth"),
    ]:
        code, _, err = run_cli(capsys, *common, "--dtype", "bf16", *extra)
        assert code == 2 and message in err, (extra, err)
    code, _, err = run_cli(capsys, *common, "--model", "repmlpnet_b224", "--checkpoint", repmlpnet_checkpoint)
    assert code == 2 and "does not fit" in err
