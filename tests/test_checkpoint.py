"""Reading official checkpoint wrappings safely, converting them, and writing atomically."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import timm
import torch

import visionmlp
from visionmlp.checkpoint import OpaqueObject, atomic_save, read_checkpoint, unwrap_state_dict

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "visionmlp-unpickle-marker"


class ConfigWithSideEffect:
    """Stands for a pickled training configuration whose unpickling would run code."""

    def __reduce__(self):
        return (MARKER.touch, ())


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return {"stem.weight": torch.randn(4, 3, 2, 2), "head.weight": torch.randn(2, 4), "head.bias": torch.zeros(2)}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": sd, "arch": "x"},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "max_accuracy": 81.0},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["bare", "model", "state_dict", "model+ddp", "ddp"],
)
def test_unwrap_handles_official_wrappings(wrap):
    sd = tiny_state_dict()
    unwrapped = unwrap_state_dict(wrap(sd))
    assert unwrapped.keys() == sd.keys()
    for k in sd:
        assert torch.equal(unwrapped[k], sd[k])


def test_unwrap_without_tensors_names_what_it_found():
    with pytest.raises(ValueError, match="no state dict found.*epoch"):
        unwrap_state_dict({"epoch": 3, "optimizer": {}})


def test_reading_never_runs_pickled_code_but_yields_tensors(tmp_path):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "train_ckpt.pth"
    sd = tiny_state_dict()
    torch.save({"model": sd, "config": ConfigWithSideEffect(), "args": argparse.Namespace(lr=0.1)}, path)
    checkpoint = read_checkpoint(path)
    assert not MARKER.exists(), "unpickling executed code from the checkpoint"
    assert isinstance(checkpoint["config"], OpaqueObject)
    assert isinstance(checkpoint["args"], OpaqueObject)
    assert torch.equal(unwrap_state_dict(checkpoint)["head.weight"], sd["head.weight"])

    read_checkpoint(path, allow_unsafe_pickle=True)  # explicit opt-in runs it
    assert MARKER.exists()
    MARKER.unlink()


def test_reading_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")


def test_a_folder_is_named_as_one_with_the_checkpoints_in_it(tmp_path, capsys):
    from visionmlp.cli import main

    atomic_save(tiny_state_dict(), tmp_path / "last.pt")
    atomic_save(tiny_state_dict(), tmp_path / "best.pt")
    assert main(["predict", "--checkpoint", str(tmp_path), "image.png"]) == 2
    assert (f"checkpoint {str(tmp_path)!r} is a folder, not a file; pass a checkpoint file in it: "
            f"{str(tmp_path / 'best.pt')!r}, {str(tmp_path / 'last.pt')!r}") in capsys.readouterr().err


class History(list):
    """A pickled list subclass: the restricted reader's stand-ins take no list items."""


def test_an_empty_or_text_file_is_not_a_checkpoint_and_only_a_refused_pickle_asks_for_unsafe_reading(tmp_path):
    for name, data in (("empty.pt", b""), ("garbage.pth", b"this is not a checkpoint"),
                       ("pointer.pt", b"version https://git-lfs.github.com/spec/v1\n")):
        (tmp_path / name).write_bytes(data)
        for unsafe in (False, True):
            with pytest.raises(ValueError, match="is not a checkpoint torch can read") as error:
                read_checkpoint(tmp_path / name, allow_unsafe_pickle=unsafe)
            assert "allow_unsafe_pickle" not in str(error.value)
    with pytest.raises(ValueError, match="empty"):
        read_checkpoint(tmp_path / "empty.pt")
    torch.save({"model": tiny_state_dict(), "history": History([1, 2])}, tmp_path / "history.pt")
    with pytest.raises(ValueError, match="pass allow_unsafe_pickle=True"):
        read_checkpoint(tmp_path / "history.pt")
    assert read_checkpoint(tmp_path / "history.pt", allow_unsafe_pickle=True)["history"] == [1, 2]


def test_atomic_save_round_trips_and_leaves_no_temporary(tmp_path):
    sd = tiny_state_dict()
    for name in ("a.pt", "b.safetensors"):
        atomic_save(sd, tmp_path / name)
        back = read_checkpoint(tmp_path / name)
        assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.safetensors"]


def test_a_safetensors_file_keeps_the_records_of_its_checkpoint(tmp_path):
    sd, config = tiny_state_dict(), {"model": {"name": "vip_s7", "kwargs": {"depths": [1, 1]}}, "seed": 3}
    atomic_save({"model": sd, "config": config, "classes": ["cat", "dog"], "visionmlp": None}, tmp_path / "w.safetensors")
    back = read_checkpoint(tmp_path / "w.safetensors")
    assert set(back) == {"model", "config", "classes"}  # a record of None is left out
    assert back["config"] == config and back["classes"] == ["cat", "dog"]
    assert all(torch.equal(back["model"][k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match=r"holds tensors and the records .*; got \['optimizer'\]"):
        atomic_save({"model": sd, "optimizer": {}}, tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_a_truncated_file_says_so(tmp_path):
    atomic_save(tiny_state_dict(), tmp_path / "w.safetensors")
    atomic_save(tiny_state_dict(), tmp_path / "w.pt")
    torch.save(tiny_state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch < 1.6's
    for name in ("w.safetensors", "w.pt", "legacy.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        for unsafe in (False, True):
            with pytest.raises(ValueError, match="truncated"):
                read_checkpoint(tmp_path / name, allow_unsafe_pickle=unsafe)


def test_atomic_save_gives_the_file_the_permissions_open_would(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_save(tiny_state_dict(), tmp_path / "last.pt")  # not mkstemp's 0600: readable on a shared cluster
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_output_that_cannot_be_written_names_its_folder(tmp_path, capsys, monkeypatch):
    from visionmlp.cli import main

    checkpoint = tmp_path / "raft.pth"
    torch.save(visionmlp.create_model("raft_mlp_s", img_size=64).state_dict(), checkpoint)
    model = ["--model", "raft_mlp_s", "--img-size", "64", "--checkpoint", str(checkpoint)]
    (tmp_path / "notes.txt").write_text("a file where a folder is wanted")
    assert main(["convert", *model, "--output", str(tmp_path / "notes.txt" / "out.pt")]) == 2
    assert (f"the output folder {str(tmp_path / 'notes.txt')!r} is a file, not a folder; pass an --output you can "
            "write to") in capsys.readouterr().err
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != read_only and access(path, mode, **kw))
    for command in (["convert", *model, "--output", str(read_only / "out.pt")],
                    ["export", *model, "--format", "onnx", "--output", str(read_only / "out.onnx")]):
        assert main(command) == 2
        assert f"the output folder {str(read_only)!r} is not writable" in capsys.readouterr().err
    assert not list(read_only.iterdir())


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"step": torch.tensor(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"step": torch.tensor(2), "bad": Unpicklable()}, path)
    assert int(read_checkpoint(path)["step"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_converter_round_trips_our_own_state_dict(tmp_path):
    model = visionmlp.create_model("raft_mlp_s", img_size=64)
    path = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict()}, path)
    converted = visionmlp.convert_official_state_dict("raft_mlp_s", path, img_size=64)
    fresh = visionmlp.create_model("raft_mlp_s", img_size=64)
    fresh.load_state_dict(converted, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_converter_rejects_a_checkpoint_of_another_model():
    with torch.device("meta"):
        other = visionmlp.create_model("ms_mlp_tiny")
    wrong = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit 'raft_mlp_s'.*missing keys.*unexpected keys"):
        visionmlp.convert_official_state_dict("raft_mlp_s", wrong)


def test_the_family_of_a_checkpoint_is_read_from_its_keys():
    from synthetic_weights import REFERENCE_DIR, load_reference

    from visionmlp.models.factory import checkpoint_family, family_module

    for name in visionmlp.list_models():
        with torch.device("meta"):
            keys = visionmlp.create_model(name).state_dict().keys()
        assert checkpoint_family(keys) == family_module(name).__name__.rsplit(".", 1)[-1], name
    for reference in sorted(REFERENCE_DIR.glob("*.safetensors")):  # the official layouts
        official = next(name for name in sorted(visionmlp.list_models(), key=len, reverse=True)
                        if reference.stem.startswith(name))
        layout, _, _ = load_reference(reference.stem)
        assert checkpoint_family(layout) == family_module(official).__name__.rsplit(".", 1)[-1], reference.stem
    with torch.device("meta"):
        assert checkpoint_family(timm.create_model("mixer_s16_224").state_dict()) is None  # blocks.N.mlp_tokens


def test_a_checkpoint_of_another_family_names_it(tmp_path, capsys):
    from visionmlp.cli import main

    checkpoint = tmp_path / "raft.pth"
    torch.save(visionmlp.create_model("raft_mlp_s", img_size=64).state_dict(), checkpoint)
    for deploy in ([], ["--deploy"]):
        assert main(["predict", "--model", "vip_s7", "--img-size", "112", "--checkpoint", str(checkpoint), *deploy,
                     "image.png"]) == 2
        err = capsys.readouterr().err
        assert "checkpoint does not fit" in err and ("this looks like a checkpoint of RaftMLP: pass --model with one "
                                                     "of its variants (raft_mlp_s, raft_mlp_m, ") in err
        assert err.count("looks like") == 1 and "Check that the model name" not in err


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="unknown model 'vip_xxl'.*vip_s7"):
        visionmlp.create_model("vip_xxl")
