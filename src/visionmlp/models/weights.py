"""Where each variant's official ImageNet-1K weights are, and ``pretrained=True`` loading them.

MS-MLP's authors publish direct downloads: those variants' pretrained configs carry the URL, and
``pretrained=True`` downloads it with timm's ``download_cached_file`` into the torch hub cache
(``<torch.hub.get_dir()>/checkpoints/<the URL's file name>``, or timm's ``cache_dir=``) and loads it through the
family's checkpoint filter (``model.load_pretrained``). ViP's, Strip-MLP's and RepMLPNet's weights sit behind
Google Drive or Baidu pages, and RaftMLP's authors did not release theirs: ``pretrained=True`` loads
``<cache>/<variant>.pth`` if a file is there and otherwise fails at once, naming the page and the line that loads a
downloaded file. Weights given explicitly (``pretrained_cfg_overlay=dict(file=...)``, ``checkpoint_path=``) load as
before. :data:`WEIGHTS` records each figure with its source; ``visionmlp models --weights`` prints it.
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
from timm.models import _builder, model_entrypoint
from timm.models._builder import resolve_pretrained_cfg
from timm.models._hub import download_cached_file

__all__ = [
    "NOT_REPORTED",
    "WEIGHTS",
    "PretrainedWeightsError",
    "cache_folder",
    "cached_weights",
    "pretrained_cfg_entries",
    "resolve_pretrained_kwargs",
    "weights_info",
]

NOT_REPORTED = "not reported in the repository"
NOT_RELEASED = "not released by the authors"

_MS_MLP = "JegZheng/MS-MLP README.md, Image Classification on ImageNet-1K, Top-1 (%)"
_MS_MLP_URL = "https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/{0}/{0}_ckpt_epoch299.pth"
_VIP = "houqb/VisionPermutator README.md, Comparison with Recent MLP-like Models, Top 1 Acc."
_STRIP_MLP = "Med-Process/Strip_MLP README.md, Results on ImageNet-1K, Acc@1"
_REPMLPNET = "DingXiaoH/RepMLP README.md, Pre-trained models, ImageNet-1K acc of the released weights"
_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"

# variant -> url (a direct download) or pages (Google Drive, Baidu; Baidu's access code is the pwd in the link),
# released_as (the file name the official repository gives the checkpoint, where it names one), top1, top1_source
WEIGHTS: dict[str, dict[str, Any]] = {
    "ms_mlp_tiny": {"url": _MS_MLP_URL.format("msmlp_tiny_patch4"), "top1": 82.1, "top1_source": _MS_MLP},
    "ms_mlp_small": {"url": _MS_MLP_URL.format("msmlp_small_patch4"), "top1": 83.4, "top1_source": _MS_MLP},
    "ms_mlp_base": {"url": _MS_MLP_URL.format("msmlp_base_patch4"), "top1": 83.8, "top1_source": _MS_MLP},
    "vip_s7": {"pages": (_DRIVE.format("1cX6eauDrsGsLSZnqsX7cl0oiKX8Dzv5z"),), "released_as": "vip_s7.pth",
               "top1": 81.5, "top1_source": _VIP},
    "vip_m7": {"pages": (_DRIVE.format("15y5WMypthpbBFdc01E3mJCZit7q0Yn8m"),), "top1": 82.7, "top1_source": _VIP},
    "vip_l7": {"pages": (_DRIVE.format("14F5IXGXmB_3jrwK33Efae-WEb5D_G85c"),), "top1": 83.2, "top1_source": _VIP},
    "strip_mlp_tiny_light": {"pages": ("https://pan.baidu.com/s/15SQy1MxY5RQlybNVpuFQcg?pwd=1234",),
                             "top1": 81.2, "top1_source": _STRIP_MLP},
    "strip_mlp_tiny": {"pages": ("https://pan.baidu.com/s/1mUDavm3Y8pmW8p7QmypnNQ?pwd=1234",),
                       "top1": 82.2, "top1_source": _STRIP_MLP},
    "strip_mlp_small": {"pages": ("https://pan.baidu.com/s/1uXoPzrhptbA8FBuQcaOrVg?pwd=1234",),
                        "top1": 83.3, "top1_source": _STRIP_MLP},
    "strip_mlp_base": {"pages": ("https://pan.baidu.com/s/1t4iQuMqUR8yfAO0kRS1EFg?pwd=1234",),
                       "top1": 83.6, "top1_source": _STRIP_MLP},
    "repmlpnet_t224": {"pages": (_DRIVE.format("1TgPDD78G-d3h_Y_vNTuqYdSJZHmnju7b"),
                                 "https://pan.baidu.com/s/1vDMl06wVUvkJgC7DOeleNA?pwd=rmlp"),
                       "top1": 76.62, "top1_source": _REPMLPNET},
    "repmlpnet_b224": {"pages": (_DRIVE.format("1GwoUvxGXgzKArlCf0V9kvc9_3GtkGltp"),
                                 "https://pan.baidu.com/s/1MzkKTTzmOdOvtUCuRqwswA?pwd=rmlp"),
                       "top1": 80.32, "top1_source": _REPMLPNET},
    "repmlpnet_t256": {"pages": (_DRIVE.format("1mU0L76x20eAKzkHxEM7J2BvEOLWx_mux"),
                                 "https://pan.baidu.com/s/1pALVZES9lVnjpXf20NxW3Q?pwd=rmlp"),
                       "top1": 77.44, "top1_source": _REPMLPNET},
    "repmlpnet_b256": {"pages": (_DRIVE.format("1W-__gXE7903cX-gOSXEGxNBCJjvqFCiJ"),
                                 "https://pan.baidu.com/s/1GGqIOoVBAd3thaU5LoUtqQ?pwd=rmlp"),
                       "top1": 81.03, "top1_source": _REPMLPNET},
    "repmlpnet_d256": {"pages": (_DRIVE.format("1e5IYac0UHnJq2_lzbuE7J4rahMENX2ha"),
                                 "https://pan.baidu.com/s/12PvSLGepMCCImr--D-RQvw?pwd=rmlp"),
                       "released_as": "RepMLPNet-D256-train-acc80.828.pth", "top1": 80.83, "top1_source": _REPMLPNET},
    "repmlpnet_l256": {"pages": (_DRIVE.format("1SHhNJ6pZax9qMLm8DJZtQ_XfmcmddPYU"),
                                 "https://pan.baidu.com/s/1qz2JBUyYY6JEpnzFIdm-xQ?pwd=rmlp"),
                       "top1": 81.68, "top1_source": _REPMLPNET},
}

# family (module name) -> what holds for each of its variants that has no entry above
FAMILY_WEIGHTS: dict[str, dict[str, Any]] = {
    "raft_mlp": {"not_released": True, "origin": "https://github.com/okojoalg/raft-mlp"},
}


class PretrainedWeightsError(RuntimeError):
    """``pretrained=True`` found no weights: not a direct download and not in the cache, or the download failed."""


def _family(name: str) -> str:
    return model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _page_label(url: str) -> str:
    parts = urlparse(url)
    if "baidu" in parts.netloc:
        code = parse_qs(parts.query).get("pwd")
        return f"Baidu (access code {code[0]})" if code else "Baidu"
    return "Google Drive" if "drive.google" in parts.netloc else parts.netloc


def weights_info(name: str, family: str | None = None) -> dict[str, Any]:
    """What is known of variant ``name``'s official weights (``family``: its module's name, looked up if not given).

    ``url``: a direct download; ``pages``: pages to download from by hand; ``released``: either exists; ``where``:
    one line saying which (or that the weights were not released); ``file_name``: the name ``pretrained=True``
    looks for in the cache (the URL's, else ``<name>.pth``); ``released_as``: the checkpoint's name in the official
    repository, where it gives one; ``top1`` (None: not reported) and ``top1_source``.
    """
    entry = WEIGHTS.get(name)
    if entry is None:
        entry = FAMILY_WEIGHTS.get(family or _family(name), {})
    info: dict[str, Any] = {"url": "", "pages": (), "released_as": "", "top1": None, "top1_source": NOT_REPORTED,
                            "not_released": False, "origin": "", **entry}
    info["released"] = bool(info["url"] or info["pages"])
    info["file_name"] = os.path.basename(urlparse(info["url"]).path) if info["url"] else f"{name}.pth"
    info["where"] = info["url"] or "; ".join(f"{_page_label(p)}: {p}" for p in info["pages"]) or (
        NOT_RELEASED if info["not_released"] else "no official weights recorded")
    return info


def pretrained_cfg_entries(name: str | None = None, *, family: str | None = None) -> dict[str, Any]:
    """The entries of a pretrained cfg that say where the official weights are: the ``url`` of a direct download,
    else ``notes`` naming the pages. ``name``: a variant of :data:`WEIGHTS`; else ``family``: the family's default
    (RaftMLP: not released), so that every variant of the family gets it."""
    if name is None:
        origin = FAMILY_WEIGHTS[family]["origin"]
        return {"notes": (f"official weights: {NOT_RELEASED} ({origin})",)}
    info = weights_info(name, family)
    if info["url"]:
        return {"url": info["url"]}
    note = (f"official weights: {info['where']}; downloaded by hand and put in the torch hub cache as "
            f"checkpoints/{info['file_name']}, pretrained=True loads them (docs/weights.md)")
    return {"notes": (note,)}


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``pretrained=True`` keeps and looks for weight files: timm's ``cache_dir`` if given, else
    ``<torch.hub.get_dir()>/checkpoints`` (timm's ``get_cache_dir()``; ``$TORCH_HOME/hub/checkpoints``)."""
    return Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The official weights of ``name`` in the cache, or None."""
    path = cache_folder(cache_dir) / weights_info(name)["file_name"]
    return path if path.is_file() else None


def _how_to_load(name: str, path: Path, info: dict[str, Any]) -> str:
    file_name = info["released_as"] or info["file_name"]
    return (f"put it at\n    {path}\nwhere pretrained=True finds it from then on, or load it from anywhere with\n"
            f'    visionmlp.create_model("{name}", checkpoint_path="{file_name}")')


def _download(name: str, url: str, info: dict[str, Any], cache_dir: str | os.PathLike | None) -> Path:
    folder = cache_folder(cache_dir)
    path = folder / os.path.basename(urlparse(url).path)
    where = {"cache_dir": str(folder)} if cache_dir else {}  # else timm's get_cache_dir(), the same folder
    try:
        return Path(download_cached_file(url, check_hash=getattr(_builder, "_CHECK_HASH", False),
                                         progress=getattr(_builder, "_DOWNLOAD_PROGRESS", False), **where))
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as error:  # URLError, HTTPError, hash
        info = dict(info, file_name=path.name, released_as="")
        raise PretrainedWeightsError(
            f"could not download the weights of {name!r} from {url} ({error}). Download it by hand and "
            + _how_to_load(name, path, info)) from None


def resolve_pretrained_kwargs(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for ``build_model_with_cfg`` such that ``pretrained=True`` loads a local file with the family's
    ``load_pretrained``: the official download (fetched into the cache now, before the model is built), or the
    documented file in the cache. Weights given some other way (``file``, ``state_dict``, the Hugging Face hub)
    are left to timm. Raises :class:`PretrainedWeightsError` at once where there is nothing to load."""
    if not pretrained:
        return kwargs
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    load_from, location = _builder._resolve_pretrained_source(cfg.to_dict())
    info = weights_info(variant)
    if load_from == "url":
        path = _download(variant, location, info, kwargs.get("cache_dir"))
    elif load_from:
        return kwargs
    else:
        path = cache_folder(kwargs.get("cache_dir")) / info["file_name"]
        if not path.is_file():
            if info["pages"]:
                where = (f"the official weights of {variant!r} are not a direct download: get them from\n    "
                         + "\n    ".join(f"{_page_label(p)}: {p}" for p in info["pages"]) + "\nthen ")
            else:
                where = (f"the official ImageNet weights of {variant!r}: {info['where']}"
                         + (f" ({info['origin']})" if info["origin"] else "")
                         + "; with a checkpoint of your own (e.g. from visionmlp train), ")
            raise PretrainedWeightsError(where + _how_to_load(variant, path, info))
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, file=str(path), custom_load=True)
    return {**kwargs, "pretrained_cfg_overlay": overlay}
