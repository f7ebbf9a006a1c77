"""``visionmlp models``: the table of variants against the reference figures, JSON, README block, plot."""

from __future__ import annotations

import json

import pytest
import torch

from visionmlp import MODEL_NAMES
from visionmlp.cli import main
from visionmlp.engine import model_table
from visionmlp.engine.model_table import describe_model, model_table_markdown, replace_readme_block

# name -> (resolution, parameters, deploy-form parameters, GMACs): the official models as measured for
# the reference table (FlopCounterMode total / 2, fp32, batch 1, default resolution)
REFERENCE = {
    "ms_mlp_tiny": (224, 28_656_232, None, 4.438),
    "ms_mlp_small": (224, 50_303_752, None, 8.667),
    "ms_mlp_base": (224, 88_696_792, None, 15.334),
    "vip_s7": (224, 25_114_984, None, 6.902),
    "vip_m7": (224, 55_272_488, None, 16.284),
    "vip_l7": (224, 87_784_936, None, 24.340),
    "strip_mlp_tiny_light": (224, 18_243_920, None, 2.519),
    "strip_mlp_tiny": (224, 24_903_920, None, 3.648),
    "strip_mlp_small": (224, 42_568_600, None, 6.803),
    "strip_mlp_base": (224, 57_216_480, None, 9.185),
    "raft_mlp_s": (224, 9_868_768, None, 2.087),
    "raft_mlp_m": (224, 21_413_632, None, 4.267),
    "raft_mlp_l": (224, 36_184_672, None, 6.544),
    # the baseline and ablations, measured on the official code the same way
    "raft_mlp_org_mixer": (224, 59_918_200, None, 12.631),
    "raft_mlp_r1": (224, 58_105_432, None, 11.417),
    "raft_mlp_r2": (224, 58_162_888, None, 11.619),
    "raft_mlp_r4": (224, 58_390_696, None, 12.024),
    "raft_mlp_hierarchy_m": (224, 19_920_640, None, 3.747),
    "raft_mlp_r2_cross_emb": (224, 60_522_184, None, 12.082),
    "raft_mlp_deep": (224, 43_532_296, None, 8.989),
    "repmlpnet_t224": (224, 38_293_608, 38_331_720, 2.808),
    "repmlpnet_b224": (224, 68_242_712, 68_332_664, 6.676),
    "repmlpnet_t256": (256, 58_687_848, 58_739_400, 4.258),
    "repmlpnet_b256": (256, 96_447_512, 96_568_184, 9.640),
    "repmlpnet_d256": (256, 86_887_648, 86_985_280, 8.636),
    "repmlpnet_l256": (256, 117_641_560, 117_820_600, 11.609),
}

# RaftMLP's cross-scale embedding concatenates unfolded windows of several kernel sizes before one linear layer;
# each small window is the centre of the largest, so ours folds them into a single convolution with the largest
# kernel: the same function, less the small-kernel MACs (tokens x out x in x kernel^2 per stage).
FOLDED_EMBEDDING_GMACS = {
    "raft_mlp_s": (56**2 * 64 * 3 * 4**2 + 28**2 * 128 * 64 * 2**2 + 14**2 * 256 * 128 * 2**2) / 1e9,
    "raft_mlp_m": (56**2 * 96 * 3 * 4**2 + 28**2 * 192 * 96 * 2**2 + 14**2 * 384 * 192 * 2**2) / 1e9,
    "raft_mlp_l": (56**2 * 128 * 3 * 4**2 + 28**2 * 192 * 128 * 2**2 + 14**2 * 512 * 192 * 2**2) / 1e9,
    "raft_mlp_r2_cross_emb": 14**2 * 768 * 3 * 16**2 / 1e9,
}


def test_reference_covers_every_variant() -> None:
    assert tuple(REFERENCE) == MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_variant_matches_reference(name: str) -> None:
    img_size, params, params_deploy, gmacs = REFERENCE[name]
    row = describe_model(name)
    assert (row["img_size"], row["params"], row["params_deploy"]) == (img_size, params, params_deploy)
    assert row["gmacs"] == pytest.approx(gmacs - FOLDED_EMBEDDING_GMACS.get(name, 0.0), rel=0.01)


def test_markdown_lists_every_variant_with_exact_parameters() -> None:
    table = model_table_markdown()
    rows = table.splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == list(MODEL_NAMES)
    for name, row in zip(MODEL_NAMES, rows, strict=True):
        assert f"| {REFERENCE[name][1]:,} |" in row


def test_cli_json_and_family_filter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--family", "vip", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["vip_s7", "vip_m7", "vip_l7"]
    assert all(r["family"] == "ViP" and r["params"] > 0 and r["gmacs"] > 0 for r in rows)
    assert all("weights" not in r for r in rows)  # the weights' columns only with --weights


def test_cli_markdown_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--family", "repmlpnet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | family |") and "| repmlpnet_l256 | RepMLPNet | 256 | 117,641,560 |" in out
    assert out.splitlines()[0].endswith("| GMACs |")


def test_weights_adds_where_the_weights_are_and_the_reported_top1(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)  # an empty cache of the test's own
    torch.hub.set_dir(str(tmp_path / "hub"))
    assert main(["models", "--family", "ms_mlp", "--weights"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | family | resolution | params | params (deploy) | GMACs | weights | cached | top-1 |"
    url = "https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/msmlp_tiny_patch4/"
    assert lines[2].startswith("| ms_mlp_tiny | MS-MLP | 224 | 28,656,232 | - |")
    assert lines[2].endswith(f"| {url}msmlp_tiny_patch4_ckpt_epoch299.pth | - | 82.1 |")
    assert lines[-1] == ("top-1 of ms_mlp_tiny, ms_mlp_small, ms_mlp_base: "
                         "JegZheng/MS-MLP README.md, Image Classification on ImageNet-1K, Top-1 (%)")

    assert main(["models", "--family", "raft_mlp", "--weights"]) == 0
    out = capsys.readouterr().out
    assert "| raft_mlp_s | RaftMLP | 224 | 9,868,768 |" in out
    assert "| not released by the authors | - | not reported |" in out
    assert "not reported in the repository" in out


def test_weights_and_benchmark_are_separate_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--weights", "--benchmark"]) == 2
    assert "--weights and --benchmark" in capsys.readouterr().err


def test_write_readme_replaces_only_the_marked_block(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n<!-- models:start -->\nold table\n<!-- models:end -->\n\nafter\n")
    assert main(["models", "--family", "strip_mlp", "--write-readme", str(readme)]) == 0
    printed = capsys.readouterr().out.strip()
    text = readme.read_text()
    assert text == f"# Title\n\nintro\n<!-- models:start -->\n{printed}\n<!-- models:end -->\n\nafter\n"
    replace_readme_block(readme, "new")
    assert "<!-- models:start -->\nnew\n<!-- models:end -->" in readme.read_text()


def test_write_readme_without_markers_fails(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert main(["models", "--family", "vip", "--write-readme", str(readme)]) == 2
    assert "no <!-- models:start -->" in capsys.readouterr().err
    assert readme.read_text() == "# no markers\n"


def test_plot_needs_benchmark(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--plot", str(tmp_path / "plot.png")]) == 2
    assert "--plot needs --benchmark" in capsys.readouterr().err


def test_benchmark_table_and_plot(tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(model_table, "list_models", lambda family=None: ["raft_mlp_s"])
    plot = tmp_path / "speed.png"
    argv = ["models", "--benchmark", "--batch-size", "1", "--warmup", "0", "--reps", "1", "--threads", "1"]
    assert main([*argv, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "| raft_mlp_s | RaftMLP | 224 | 9.87 |" in out and "roofline" in out
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'mixer_b16_224'; choose one of: ms_mlp_tiny"):
        describe_model("mixer_b16_224")
