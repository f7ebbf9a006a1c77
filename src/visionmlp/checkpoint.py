"""Reading and writing checkpoints: safe by default, atomic on write.

Checkpoints from the five official repositories come in several wrappings (a bare state dict, one
nested under ``model`` or ``state_dict``, DDP's ``module.`` prefix) and often carry pickled
configuration objects (yacs ``CfgNode``, ``argparse.Namespace``). Reading never imports or calls
arbitrary pickled code unless the caller passes ``allow_unsafe_pickle=True``: globals outside
torch's weights-only allow-list are replaced by inert stand-ins, so the tensors still come out.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import types
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]

# Nesting keys used by the official training scripts (and ours), in order of preference.
_NESTING_KEYS = ("model", "state_dict", "model_state_dict", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# what a .safetensors file of ours records beside its tensors (a checkpoint's keys): the run's configuration, its class
# names, and convert's account of the weights' form
SAFETENSORS_RECORDS = ("config", "classes", "visionmlp")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".safetensors")
# what a run of visionmlp train writes into its output folder, the first the one to evaluate
RUN_CHECKPOINTS = ("best.pt", "last.pt", "model.safetensors", "model_ema.safetensors")
# the process umask (read by setting it), which files written through a temporary file are given as open() would
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class OpaqueObject(dict):
    """Inert stand-in for a pickled object whose class was not imported (see module docstring)."""

    qualified_name = "unknown"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        dict.__init__(self)
        self.__dict__["args"] = args

    def __call__(self, *args: Any, **kwargs: Any) -> OpaqueObject:
        return type(self)(*args)  # a stand-in used as a function (e.g. a pickled ``getattr``) stays inert

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualified_name}>"


_stand_ins: dict[str, type] = {}


def _stand_in(qualified_name: str) -> type:
    if qualified_name not in _stand_ins:
        short = qualified_name.rsplit(".", 1)[-1] or "Opaque"
        _stand_ins[qualified_name] = type(short, (OpaqueObject,), {"qualified_name": qualified_name})
    return _stand_ins[qualified_name]


def _allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Resolves only torch's weights-only allow-list; every other global becomes an inert stand-in."""

    _allowed: dict[str, Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _TensorOnlyUnpickler._allowed is None:
            _TensorOnlyUnpickler._allowed = _allowed_globals()
        qualified = f"{module}.{name}"
        if qualified in _TensorOnlyUnpickler._allowed:
            return _TensorOnlyUnpickler._allowed[qualified]
        return _stand_in(qualified)


_tensor_only_pickle = types.SimpleNamespace(
    Unpickler=_TensorOnlyUnpickler, load=pickle.load, __name__="visionmlp_tensor_only_pickle"
)


def read_checkpoint(path: str | os.PathLike, *, allow_unsafe_pickle: bool = False) -> Any:
    """Read a ``.pt``/``.pth``/``.pth.tar``/``.safetensors`` file without executing pickled code."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is a folder, not a file; {_checkpoints_in(path)}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist; pass the path of a saved checkpoint")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    problem = _not_a_torch_file(path)
    if problem:
        raise ValueError(f"{str(path)!r} is not a checkpoint torch can read: {problem}; if it was copied or "
                         "downloaded, do so again")
    if allow_unsafe_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # any unpickling failure means the same to the user
            raise ValueError(f"could not read {str(path)!r} as a torch checkpoint ({exc}); it may be truncated or "
                             "not a checkpoint") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the restricted reader below gives the error that matters
        pass  # holds pickled objects beyond tensors (configs, namespaces): read the tensors only
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tensor_only_pickle)
    except Exception as exc:
        if isinstance(exc, EOFError) or "pickle data was truncated" in str(exc):  # a legacy file cut short
            raise ValueError(f"{str(path)!r} is not a checkpoint torch can read: it is truncated; if it was copied "
                             "or downloaded, do so again") from None
        raise ValueError(
            f"could not read {str(path)!r} as a torch checkpoint ({exc}). If the file is a trusted legacy "
            "checkpoint, pass allow_unsafe_pickle=True (CLI: --allow-unsafe-pickle)"
        ) from exc


# what torch.save writes: a zip archive holding data.pkl, or (before torch 1.6, or with
# _use_new_zipfile_serialization=False) a protocol-2 pickle that starts with torch's magic number
_ZIP_HEADER = b"PK\x03\x04"
_LEGACY_HEADER = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]


def _not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a file that torch.save wrote (empty, cut short, another kind of file); None where it
    may be one."""
    if path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as f:
        header = f.read(len(_LEGACY_HEADER))
    if header.startswith(_ZIP_HEADER):
        if not zipfile.is_zipfile(path):
            return "it is truncated (a zip archive without its end)"
        with zipfile.ZipFile(path) as archive:
            if not any(name.rsplit("/", 1)[-1] == "data.pkl" for name in archive.namelist()):
                return "it is a zip archive without the data.pkl that torch.save writes"
        return None
    if header != _LEGACY_HEADER:
        return "it is not a file torch.save writes (neither a zip archive nor torch's legacy pickle)"
    return None


def _checkpoints_in(folder: Path) -> str:
    """The end of a sentence naming the checkpoint files in ``folder``, a run's best.pt and last.pt first."""
    found = [folder / name for name in RUN_CHECKPOINTS if (folder / name).is_file()]
    found += sorted(p for p in folder.iterdir()
                    if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES) and p.name not in RUN_CHECKPOINTS)
    if not found:
        return f"it holds no checkpoint ({', '.join('*' + suffix for suffix in CHECKPOINT_SUFFIXES)})"
    shown = ", ".join(repr(str(p)) for p in found[:4])
    return f"pass a checkpoint file in it: {shown}" + (", ..." if len(found) > 4 else "")


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def unwrap_state_dict(checkpoint: Any) -> StateDict:
    """Return the tensors of a checkpoint: bare, or nested under ``model``/``state_dict``, minus DDP prefixes."""
    current = checkpoint
    for _ in range(3):
        if isinstance(current, nn.Module):
            current = current.state_dict()
        if not isinstance(current, Mapping):
            break
        if current and all(isinstance(v, torch.Tensor) for v in current.values()):
            return _strip_prefixes(current)
        nested = next((current[k] for k in _NESTING_KEYS if isinstance(current.get(k), (Mapping, nn.Module))), None)
        if nested is None:
            break
        current = nested
    found = sorted(checkpoint.keys()) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(
        f"no state dict found in checkpoint (top level holds {found}); expected a mapping of tensors, "
        f"possibly nested under one of {list(_NESTING_KEYS)}"
    )


def check_state_dict_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped keys if ``state_dict`` does not fit ``model``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or mismatched):
        return

    def listing(items: list[str]) -> str:
        shown = ", ".join(items[:12])
        return f"{shown}, ... ({len(items)} in all)" if len(items) > 12 else shown

    from .models.factory import other_family_hint  # at call time: the models package imports this module

    family_hint = other_family_hint(model, state_dict)
    parts = [family_hint,
             f"missing keys: [{listing(missing)}]" if missing else "",
             f"unexpected keys: [{listing(unexpected)}]" if unexpected else "",
             f"shape mismatches: [{listing(mismatched)}]" if mismatched else ""]
    advice = "" if family_hint else ". Check that the model name (and img_size / deploy) matches the checkpoint."
    raise ValueError(f"checkpoint does not fit {what}; " + "; ".join(p for p in parts if p) + advice)


def load_pretrained_file(
    model: nn.Module,
    path: str | os.PathLike,
    filter_fn: Callable[[StateDict, nn.Module], StateDict],
    *,
    allow_unsafe_pickle: bool = False,
) -> None:
    """Load an official or visionmlp checkpoint into ``model``; a classifier of another size is left as built."""
    load_checkpoint_state(model, unwrap_state_dict(read_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)),
                          filter_fn)


def load_checkpoint_state(
    model: nn.Module, state_dict: StateDict, filter_fn: Callable[[StateDict, nn.Module], StateDict],
    new_classes: bool = False,
) -> list[str]:
    """:func:`load_pretrained_file` for a checkpoint already read and unwrapped; what was not loaded as it was.

    ``new_classes``: the model's classes are others than the checkpoint's, so its fresh classifier stays even where
    the counts agree.
    """
    state_dict = filter_fn(state_dict, model)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    notes = []
    if classifier:
        own = model.state_dict()
        for suffix in (".weight", ".bias"):
            key = classifier + suffix
            if key in state_dict and key not in own:
                del state_dict[key]  # model built without a classifier
            elif key in state_dict and (new_classes or state_dict[key].shape != own[key].shape):
                if suffix == ".weight":
                    notes.append(f"classifier replaced: the checkpoint's has {state_dict[key].shape[0]} classes, "
                                 f"the model {own[key].shape[0]}" + (" other ones" if new_classes else "")
                                 + f" (a fresh {classifier})")
                state_dict[key] = own[key]  # other classes: keep the fresh head
    check_state_dict_fits(model, state_dict, type(model).__name__)
    model.load_state_dict(state_dict, strict=True)
    return notes


def writable_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path, created if missing; a ValueError naming it where it cannot be created or written to."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = "is a file, not a folder" if folder.is_file() else f"cannot be created ({exc.strerror})"
        raise ValueError(f"the output folder {str(folder)!r} {problem}; pass an --output you can write to") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {str(folder)!r} is not writable; pass an --output you can write to")
    return folder


def temporary_file_beside(path: Path) -> Path:
    """A new empty file in ``path``'s folder (created if missing) to write ``path`` into before renaming it: hidden,
    named after it, ending in its suffix (torch.export checks it), with the permissions ``open()`` would give."""
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                                dir=writable_folder(path.parent))
    os.close(fd)
    os.chmod(name, 0o666 & ~_UMASK)  # mkstemp's 0600 would keep the file from the rest of a shared cluster
    return Path(name)


def _read_safetensors(path: Path) -> Any:
    """The tensors of a ``.safetensors`` file; with the records its header holds (see :func:`atomic_save`), the
    checkpoint they were written from: ``{"model": tensors, "config": ..., ...}``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # one read of the file for header and tensors
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"could not read {str(path)!r} as a safetensors file ({exc}); it may be truncated: "
                         "copy or download it again") from None
    records = {key: json.loads(header[key]) for key in SAFETENSORS_RECORDS if key in header}
    return {"model": tensors, **records} if records else tensors


def _save_safetensors(obj: Mapping[str, Any], path: Path) -> None:
    """``obj``, a state dict or ``{"model": state_dict}`` with records beside it, as a ``.safetensors`` file: the
    records as JSON in its header."""
    from safetensors.torch import save_file

    if isinstance(obj.get("model"), Mapping):
        state_dict, records = obj["model"], {k: v for k, v in obj.items() if k != "model"}
    else:
        state_dict, records = obj, {}
    unknown = set(records) - set(SAFETENSORS_RECORDS)
    if unknown:
        raise ValueError(f"a .safetensors file holds tensors and the records {SAFETENSORS_RECORDS}; got {sorted(unknown)}")
    header = {key: json.dumps(value) for key, value in records.items() if value is not None}
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path, metadata=header or None)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write with ``torch.save`` (or safetensors for ``.safetensors``, see :func:`_save_safetensors`) to a temporary
    file, then rename."""
    path = Path(path)
    temporary = temporary_file_beside(path)
    try:
        if path.suffix == ".safetensors":
            _save_safetensors(obj, temporary)
        else:
            torch.save(obj, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
