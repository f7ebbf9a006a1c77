"""Data sets: the built-in digits, ImageNet-style folders and zip archives, CIFAR-10/100 pickles, and
(in ``transfer.py``) the fine-tuning sets Flowers-102, Stanford Cars, iNaturalist 2018/2019 and Caltech-101.

Every data set yields ``(image, target)`` with ``image`` a PIL image passed through ``transform``.
The file-backed ones yield ``None`` for an image that cannot be read (after a warning naming the
file); the loader's collate function drops those and counts them.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Transform = Callable[[Image.Image], Any] | None


class DataError(ValueError):
    """A data path that is missing or does not hold what the chosen data set needs."""


class SampleError(DataError):
    """A sample that cannot be used (an unreadable image, a mask that does not fit it), naming its files."""


# ---------------------------------------------------------------------------------------------------
# digits: shipped with the package


class DigitsDataset(Dataset):
    """The UCI handwritten digits (1,797 8x8 grey images, 10 classes), upsampled to RGB images.

    ``assets/digits.npz`` was extracted once from scikit-learn's ``load_digits()`` (scikit-learn 1.9.1);
    pixel values are 0..16. The split is fixed: a seeded permutation, the first 360 images for validation.
    """

    num_val = 360

    def __init__(self, split: str, img_size: int, transform: Transform = None) -> None:
        with resources.as_file(resources.files("visionmlp.data") / "assets" / "digits.npz") as path:
            arrays = np.load(path)
            images, labels = arrays["images"], arrays["labels"]
        order = np.random.RandomState(0).permutation(len(labels))
        chosen = order[self.num_val:] if split == "train" else order[: self.num_val]
        self.images = images[chosen]
        self.targets = labels[chosen].tolist()
        self.classes = [str(d) for d in range(10)]
        self.img_size = img_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        grey = (self.images[index].astype(np.float32) * (255.0 / 16.0)).round().astype(np.uint8)
        image = Image.fromarray(grey, "L").resize((self.img_size, self.img_size), Image.BICUBIC).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


# ---------------------------------------------------------------------------------------------------
# ImageNet-style: folders or zip archives, with an optional in-memory cache of the encoded files


class FolderSource:
    """Reads files under a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, name: str) -> bytes:
        """The bytes of file ``name`` (relative to the root)."""
        with open(self.root / name, "rb") as f:
            return f.read()

    def describe(self, name: str) -> str:
        """How to name file ``name`` in messages."""
        return str(self.root / name)


class ZipSource:
    """Reads members of a zip archive; each process (data-loader workers included) opens its own handle."""

    def __init__(self, zip_path: Path) -> None:
        self.zip_path = zip_path
        self._handle: zipfile.ZipFile | None = None
        self._pid = -1

    def read(self, name: str) -> bytes:
        """The bytes of member ``name``."""
        if self._pid != os.getpid():  # a handle inherited through fork would share its file offset
            self._handle, self._pid = zipfile.ZipFile(self.zip_path), os.getpid()
        return self._handle.read(name)

    def describe(self, name: str) -> str:
        """How to name member ``name`` in messages."""
        return f"{self.zip_path}@{name}"

    def __getstate__(self) -> dict[str, Any]:
        return {"zip_path": self.zip_path, "_handle": None, "_pid": -1}


_warned: set[str] = set()


def _warn_unreadable(what: str, exc: BaseException) -> None:
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"skipping unreadable image {what}: {exc}", stacklevel=3)


def decode_pil(data: bytes) -> Image.Image:
    """An encoded image file as a PIL RGB image."""
    return Image.open(io.BytesIO(data)).convert("RGB")


class EncodedImageDataset(Dataset):
    """Images stored as encoded files (JPEG, PNG, ...) in a folder or zip, decoded on access.

    ``cache_mode`` keeps the encoded bytes in memory: ``full`` all of them, ``part`` only the
    indices ``rank, rank + world_size, ...`` -- the shard this rank's sampler draws from.
    """

    def __init__(
        self,
        source: FolderSource | ZipSource,
        samples: list[tuple[str, int]],
        classes: list[str],
        transform: Transform = None,
        cache_mode: str = "no",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.source, self.samples, self.classes, self.transform = source, samples, classes, transform
        self.targets = [target for _, target in samples]
        self.cache_mode = cache_mode
        self._cache: dict[int, bytes | None] = {}
        if cache_mode != "no":
            step, start = (world_size, rank) if cache_mode == "part" else (1, 0)
            for index in range(start, len(samples), step):
                try:
                    self._cache[index] = source.read(samples[index][0])
                except (OSError, KeyError) as exc:
                    _warn_unreadable(source.describe(samples[index][0]), exc)
                    self._cache[index] = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        name, target = self.samples[index]
        try:
            data = self._cache[index] if index in self._cache else self.source.read(name)
            if data is None:
                raise OSError("could not be read when filling the cache")
            # a transform may name its own decoder (the tensor pipeline's decodes JPEGs straight to a tensor)
            image = getattr(self.transform, "decode", decode_pil)(data)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            _warn_unreadable(self.source.describe(name), exc)
            return None
        return (self.transform(image) if self.transform else image), target


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def imagenet_folder(root: Path, split: str, transform: Transform, cache_mode: str, rank: int,
                    world_size: int, kind: str = "imagenet") -> EncodedImageDataset:
    """``root/train`` and ``root/val`` with one sub-folder per class; classes are numbered from ``train/``, or from
    ``val/`` where it stands alone (evaluating needs no training images).

    ``kind`` is the ``--dataset`` name the messages give (``imagenet`` or ``folder``, which read the same layout).
    """
    train_dir, split_dir = root / "train", root / split
    zip_hint = " (or pass --zip for train.zip, val.zip and the map files)" if kind == "imagenet" else ""
    if not split_dir.is_dir():
        needs = "train/ and val/" if split == "train" else f"{split}/ (and train/ beside it for training)"
        raise DataError(f"--dataset {kind}: expected a folder {str(split_dir)!r}; the data path must hold {needs}, "
                        f"each with one sub-folder of images per class{zip_hint}")
    classes_dir = train_dir if train_dir.is_dir() else split_dir
    classes = _class_folders(classes_dir)
    if len(classes) < 2:
        raise DataError(f"--dataset {kind}: {str(classes_dir)!r} holds {len(classes) or 'no'} class sub-folder"
                        f"{'' if classes else 's'}; a classifier needs one sub-folder of images per class, two or more")
    class_index = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in _class_folders(split_dir):
        if name not in class_index:
            raise DataError(f"--dataset {kind}: class folder {str(split_dir / name)!r} has no counterpart in train/")
        for folder, _, files in sorted(os.walk(split_dir / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.relpath(os.path.join(folder, file), split_dir), class_index[name]))
    if not samples:
        raise DataError(f"--dataset {kind}: no image files ({', '.join(IMG_EXTENSIONS)}) under {str(split_dir)!r}")
    return EncodedImageDataset(FolderSource(split_dir), samples, classes, transform, cache_mode, rank, world_size)


def _read_map(map_path: Path) -> list[tuple[str, int]]:
    samples = []
    with open(map_path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(
                    f"{str(map_path)!r} line {line_number}: expected 'relative/path label' "
                    f"(a path inside the zip, whitespace, an integer class), got {line.strip()!r}"
                )
            samples.append((parts[0].strip().lstrip("/"), int(parts[1])))
    if not samples:
        raise DataError(f"{str(map_path)!r} lists no images; expected lines 'relative/path label'")
    return samples


def imagenet_zip(root: Path, split: str, transform: Transform, cache_mode: str, rank: int,
                 world_size: int) -> EncodedImageDataset:
    """The zipped layout: ``train.zip``, ``val.zip``, ``train_map.txt``, ``val_map.txt`` (``path label`` lines)."""
    zip_path, map_path = root / f"{split}.zip", root / f"{split}_map.txt"
    for needed in (zip_path, map_path, root / "train_map.txt"):
        if not needed.is_file():
            raise DataError(
                f"--dataset imagenet --zip: expected a file {str(needed)!r}; the data path must hold train.zip, "
                "val.zip, train_map.txt and val_map.txt (one 'relative/path label' per line)"
            )
    if not zipfile.is_zipfile(zip_path):
        raise DataError(f"--dataset imagenet --zip: {str(zip_path)!r} is not a zip archive")
    samples = _read_map(map_path)
    num_classes = 1 + max(label for _, label in _read_map(root / "train_map.txt"))
    classes = [str(i) for i in range(num_classes)]
    return EncodedImageDataset(ZipSource(zip_path), samples, classes, transform, cache_mode, rank, world_size)


# ---------------------------------------------------------------------------------------------------
# CIFAR-10/100: the python-pickle release, read without running pickled code


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a tampered batch file cannot run code."""

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


CIFAR_LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "val": ["test_batch"], "meta": "batches.meta", "labels": "labels", "names": "label_names"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "val": ["test"], "meta": "meta",
                 "labels": "fine_labels", "names": "fine_label_names"},
}


class CifarDataset(Dataset):
    """CIFAR-10 or CIFAR-100 from the python version of the release (data path: the extracted folder or its parent)."""

    def __init__(self, kind: str, root: Path, split: str, transform: Transform = None) -> None:
        layout = CIFAR_LAYOUTS[kind]
        folder = root if (root / layout["meta"]).is_file() else root / layout["folder"]
        files = [folder / name for name in layout[split] + [layout["meta"]]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(
                f"--dataset {kind}: expected the python-pickle release under {str(root)!r} "
                f"({layout['folder']}/ with {', '.join(layout['train'] + layout['val'] + [layout['meta']])}); "
                f"missing: {', '.join(missing)}"
            )
        images, targets = [], []
        for path in files[:-1]:
            batch = self._load(path)
            try:
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                targets.extend(int(t) for t in batch[layout["labels"]])
            except (KeyError, ValueError) as exc:
                raise DataError(f"{str(path)!r} is not a {kind} batch: {exc!r}") from None
        self.images = np.concatenate(images).transpose(0, 2, 3, 1)  # N, H, W, C
        self.targets = targets
        self.classes = [str(n) for n in self._load(files[-1]).get(layout["names"], [])]
        self.transform = transform

    @staticmethod
    def _load(path: Path) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                return _ArrayUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise DataError(f"{str(path)!r} is not a readable CIFAR pickle: {exc}") from None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


class ClassSubset(Dataset):
    """The samples of ``dataset`` whose class is one of ``names``, relabelled 0, 1, ... in the order of ``names``.

    Its ``transform`` (and the digits' ``img_size``) are those of the data set it selects from.
    """

    def __init__(self, dataset: Dataset, names: list[str]) -> None:
        names = [str(name) for name in names]
        unknown = [name for name in names if name not in dataset.classes]
        if unknown or len(set(names)) != len(names):
            raise DataError(f"data.classes {names}: {'unknown ' + str(unknown) if unknown else 'a class twice'}; the "
                            f"data set's classes are {', '.join(map(str, dataset.classes[:20]))}"
                            + (", ..." if len(dataset.classes) > 20 else ""))
        self.dataset = dataset
        self.relabel = {dataset.classes.index(name): i for i, name in enumerate(names)}
        self.indices = [i for i, target in enumerate(dataset.targets) if target in self.relabel]
        self.targets = [self.relabel[dataset.targets[i]] for i in self.indices]
        self.classes = names

    @property
    def transform(self) -> Transform:
        """The selected data set's transform."""
        return self.dataset.transform

    @transform.setter
    def transform(self, transform: Transform) -> None:
        self.dataset.transform = transform

    @property
    def img_size(self) -> int:
        """The selected data set's image size (digits)."""
        return self.dataset.img_size

    @img_size.setter
    def img_size(self, size: int) -> None:
        self.dataset.img_size = size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        item = self.dataset[self.indices[index]]
        return None if item is None else (item[0], self.relabel[item[1]])


def subset_evenly(dataset: Dataset, max_images: int | None) -> Dataset:
    """At most ``max_images`` of ``dataset``, spread evenly over it (so over the classes of a sorted folder)."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    indices = np.linspace(0, len(dataset) - 1, max_images).round().astype(int).tolist()
    return Subset(dataset, indices)


DATASETS = ("digits", "imagenet", "folder", "cifar10", "cifar100", "flowers102", "stanford_cars", "inat2018",
            "inat2019", "caltech101")


def build_dataset(
    kind: str,
    split: str,
    transform: Transform,
    *,
    data_path: str | os.PathLike | None = None,
    img_size: int = 32,
    use_zip: bool = False,
    cache_mode: str = "no",
    rank: int = 0,
    world_size: int = 1,
    flowers102_split: str = "raftmlp",
    classes: list[str] | None = None,
) -> Dataset:
    """The ``train`` or ``val`` split of data set ``kind`` (one of ``DATASETS``); only the ``classes`` named, if given
    (:class:`ClassSubset`).

    ``flowers102_split`` (config ``data.flowers102_split``) picks which Flowers-102 parts train and
    val are: ``raftmlp`` or ``official`` (see ``transfer.flowers102``).
    """
    dataset = _build_dataset(kind, split, transform, data_path=data_path, img_size=img_size, use_zip=use_zip,
                             cache_mode=cache_mode, rank=rank, world_size=world_size, flowers102_split=flowers102_split)
    return dataset if classes is None else ClassSubset(dataset, classes)


def _build_dataset(
    kind: str,
    split: str,
    transform: Transform,
    *,
    data_path: str | os.PathLike | None,
    img_size: int,
    use_zip: bool,
    cache_mode: str,
    rank: int,
    world_size: int,
    flowers102_split: str,
) -> Dataset:
    """:func:`build_dataset` before the class selection."""
    if kind == "digits":
        return DigitsDataset(split, img_size, transform)
    if data_path is None:
        raise DataError(f"--dataset {kind} needs --data-path")
    root = Path(data_path).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-path {str(root)!r} is not a directory (--dataset {kind})")
    if use_zip and kind != "imagenet":
        raise DataError(f"--zip applies to --dataset imagenet only, not {kind}")
    if kind == "imagenet":
        build = imagenet_zip if use_zip else imagenet_folder
        return build(root, split, transform, cache_mode, rank, world_size)
    if kind == "folder":
        return imagenet_folder(root, split, transform, cache_mode, rank, world_size, kind="folder")
    if kind in CIFAR_LAYOUTS:
        return CifarDataset(kind, root, split, transform)
    from . import transfer  # imported here: it builds on this module's readers

    if kind == "flowers102":
        return transfer.flowers102(root, split, transform, flowers102_split, cache_mode, rank, world_size)
    if kind == "stanford_cars":
        return transfer.stanford_cars(root, split, transform, cache_mode, rank, world_size)
    if kind in ("inat2018", "inat2019"):
        return transfer.inaturalist(int(kind[4:]), root, split, transform, cache_mode, rank, world_size)
    if kind == "caltech101":
        return transfer.caltech101(root, split, transform, cache_mode, rank, world_size)
    raise DataError(f"unknown data set {kind!r}; choose one of {', '.join(DATASETS)}")
