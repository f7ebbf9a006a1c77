"""``pretrained=True``: official downloads into the torch hub cache, download pages, weights never released.

Nothing here reaches the network: downloads come from ``file://`` URLs in a temporary folder, the torch hub cache is
a temporary folder, and any socket connection fails the test.
"""

from __future__ import annotations

import argparse
import json
import socket
import urllib.error

import pytest
import timm
import torch

import visionmlp
from visionmlp import MODEL_NAMES
from visionmlp.cli import main
from visionmlp.engine import model_table
from visionmlp.models import ms_mlp, raft_mlp, vip, weights
from visionmlp.models.weights import PretrainedWeightsError, weights_info

# small builds of three families (the weights' layout is what matters, not their size)
SMALL = {
    "ms_mlp_tiny": dict(embed_dim=20, depths=(1, 1, 1, 1)),
    "vip_s7": dict(img_size=112, depths=(1, 1, 1, 1), embed_dims=(48, 96, 96, 96), num_segments=(8, 8, 8, 8)),
    "raft_mlp_s": dict(img_size=64, embed_dims=(16, 32, 64, 128)),
}
IMG = {"ms_mlp_tiny": 64, "vip_s7": 112, "raft_mlp_s": 64}
MS_MLP_TINY_FILE = "msmlp_tiny_patch4_ckpt_epoch299.pth"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def hub(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A torch hub folder of the test's own; returns its ``checkpoints`` folder (timm's cache)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)  # restored after the test
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def official_checkpoint(name: str, path) -> torch.nn.Module:
    """Save a small ``name`` the way the official training scripts do (nested, DDP prefix, pickled options)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL[name]).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state_dict, "epoch": 299, "args": argparse.Namespace(lr=1e-3)}, path)
    return model


def assert_same_function(model: torch.nn.Module, reference: torch.nn.Module, name: str) -> None:
    x = torch.randn(1, 3, IMG[name], IMG[name])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)


def test_download_into_the_hub_cache_then_load_from_it(tmp_path, hub) -> None:
    source = tmp_path / "release" / MS_MLP_TINY_FILE
    reference = official_checkpoint("ms_mlp_tiny", source)
    overlay = dict(url=source.as_uri())
    model = timm.create_model("ms_mlp_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL["ms_mlp_tiny"])
    assert (hub / MS_MLP_TINY_FILE).is_file()
    assert model.pretrained_cfg["file"] == str(hub / MS_MLP_TINY_FILE)
    assert_same_function(model, reference, "ms_mlp_tiny")

    source.unlink()  # from now on the cache serves it
    again = visionmlp.create_model("ms_mlp_tiny", pretrained=True, pretrained_cfg_overlay=overlay,
                                   **SMALL["ms_mlp_tiny"])
    assert_same_function(again, reference, "ms_mlp_tiny")


def test_the_official_url_is_read_from_the_cache_when_the_file_is_there(hub) -> None:
    url = timm.get_pretrained_cfg("ms_mlp_tiny").url
    assert url == weights.WEIGHTS["ms_mlp_tiny"]["url"] and url.endswith("/" + MS_MLP_TINY_FILE)
    reference = official_checkpoint("ms_mlp_tiny", hub / MS_MLP_TINY_FILE)
    model = timm.create_model("ms_mlp_tiny", pretrained=True, **SMALL["ms_mlp_tiny"])  # no download: no network
    assert_same_function(model, reference, "ms_mlp_tiny")


def test_timm_cache_dir_is_where_the_download_goes(tmp_path, hub) -> None:
    source = tmp_path / "release" / MS_MLP_TINY_FILE
    reference = official_checkpoint("ms_mlp_tiny", source)
    model = timm.create_model("ms_mlp_tiny", pretrained=True, cache_dir=tmp_path / "mine",
                              pretrained_cfg_overlay=dict(url=source.as_uri()), **SMALL["ms_mlp_tiny"])
    assert (tmp_path / "mine" / MS_MLP_TINY_FILE).is_file() and not hub.exists()
    assert_same_function(model, reference, "ms_mlp_tiny")


def never_built(*args, **kwargs):
    raise AssertionError("the model was built before the weights were found")


def test_a_failed_download_ends_with_one_message(tmp_path, hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ms_mlp, "MsMlp", never_built)
    missing = (tmp_path / "moved" / "weights.pth").as_uri()
    with pytest.raises(PretrainedWeightsError) as caught:
        timm.create_model("ms_mlp_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=missing))
    message = str(caught.value)
    assert missing in message and str(hub / "weights.pth") in message
    assert 'visionmlp.create_model("ms_mlp_tiny", checkpoint_path="weights.pth")' in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not (hub / "weights.pth").exists()


def test_an_unreachable_official_url_names_it_and_the_cache_path(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    url = weights.WEIGHTS["ms_mlp_small"]["url"]

    def not_found(url, **kwargs):
        raise urllib.error.HTTPError(url, 404, "The specified blob does not exist.", None, None)

    monkeypatch.setattr(weights, "download_cached_file", not_found)
    monkeypatch.setattr(ms_mlp, "MsMlp", never_built)
    with pytest.raises(PretrainedWeightsError, match="HTTP Error 404") as caught:
        visionmlp.create_model("ms_mlp_small", pretrained=True)
    message = str(caught.value)
    assert url in message and str(hub / "msmlp_small_patch4_ckpt_epoch299.pth") in message
    assert 'checkpoint_path="msmlp_small_patch4_ckpt_epoch299.pth"' in message


def test_a_page_only_variant_fails_at_once_then_loads_from_the_cache(tmp_path, hub, monkeypatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(vip, "VisionPermutator", never_built)
        with pytest.raises(PretrainedWeightsError) as caught:
            timm.create_model("vip_s7", pretrained=True)
    message = str(caught.value)
    assert "https://drive.google.com/file/d/1cX6eauDrsGsLSZnqsX7cl0oiKX8Dzv5z/view?usp=sharing" in message
    assert str(hub / "vip_s7.pth") in message
    assert 'visionmlp.create_model("vip_s7", checkpoint_path="vip_s7.pth")' in message

    reference = official_checkpoint("vip_s7", hub / "vip_s7.pth")
    assert_same_function(timm.create_model("vip_s7", pretrained=True, **SMALL["vip_s7"]), reference, "vip_s7")
    assert_same_function(visionmlp.create_model("vip_s7", pretrained=True, **SMALL["vip_s7"]), reference, "vip_s7")


def test_baidu_pages_give_their_access_code(hub) -> None:
    with pytest.raises(PretrainedWeightsError, match=r"Baidu \(access code rmlp\): https://pan\.baidu\.com/s/"):
        visionmlp.create_model("repmlpnet_b224", pretrained=True)
    with pytest.raises(PretrainedWeightsError, match=r"Baidu \(access code 1234\)"):
        visionmlp.create_model("strip_mlp_tiny", pretrained=True)


def test_raftmlp_weights_were_not_released_yet_a_cached_file_loads(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(raft_mlp, "RaftMLP", never_built)
        with pytest.raises(PretrainedWeightsError, match="not released by the authors") as caught:
            visionmlp.create_model("raft_mlp_s", pretrained=True)
    assert 'visionmlp.create_model("raft_mlp_s", checkpoint_path="raft_mlp_s.pth")' in str(caught.value)
    reference = official_checkpoint("raft_mlp_s", hub / "raft_mlp_s.pth")
    model = timm.create_model("raft_mlp_s", pretrained=True, **SMALL["raft_mlp_s"])
    assert_same_function(model, reference, "raft_mlp_s")


def test_every_variant_says_where_its_weights_are() -> None:
    for name in MODEL_NAMES:
        info, cfg = weights_info(name), timm.get_pretrained_cfg(name)
        assert info["where"] and info["top1_source"]
        if info["url"]:
            assert cfg.url == info["url"] and info["url"].startswith("https://")
        else:
            assert not cfg.url and info["where"].split()[-1] in cfg.notes[0]
    # the family default covers every RaftMLP variant, also those without an entry of their own
    assert weights_info("raft_mlp_x", family="raft_mlp")["where"] == "not released by the authors"
    assert "not released" in timm.get_pretrained_cfg("raft_mlp_l").notes[0]
    assert [weights_info(n)["top1"] for n in ("ms_mlp_tiny", "vip_l7", "strip_mlp_tiny_light", "repmlpnet_l256")] \
        == [82.1, 83.2, 81.2, 81.68]
    assert weights_info("raft_mlp_m")["top1"] is None


def test_models_weights_shows_the_cached_file(hub, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = dict(family="ViP", img_size=224, params=1, params_deploy=None, gmacs=1.0)  # see test_model_table.py
    monkeypatch.setattr(model_table, "describe_model", lambda name: dict(sizes, model=name))
    hub.mkdir(parents=True)
    (hub / "vip_m7.pth").write_bytes(b"")
    assert main(["models", "--family", "vip", "--weights", "--json"]) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["vip_m7"]["cached"] == str(hub / "vip_m7.pth") and rows["vip_s7"]["cached"] is None
    assert rows["vip_m7"]["top1"] == 82.7 and rows["vip_m7"]["weights"].startswith("Google Drive: https://")
