"""Fine-tuning data sets of the transfer-learning experiments: Oxford 102 Flowers, Stanford Cars,
iNaturalist 2018/2019 and Caltech-101, read from files the user has put in place (nothing is downloaded).

Each reader checks the layout at once (a missing folder or annotation file raises ``DataError`` saying
what was expected where) and returns an ``EncodedImageDataset``, so an unreadable image is skipped with
a warning like everywhere else. Files in MATLAB format need scipy, imported only when one is read.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import IMG_EXTENSIONS, DataError, EncodedImageDataset, FolderSource, Transform

FLOWERS102_SPLITS = ("raftmlp", "official")


def _loadmat(path: Path, kind: str) -> dict[str, Any]:
    """A .mat file as a dict (scipy's ``squeeze_me`` form), with a DataError for a missing scipy or a bad file."""
    try:
        import scipy.io
    except ImportError:
        raise DataError(
            f"--dataset {kind}: reading {str(path)!r} needs scipy; install it with `pip install scipy` "
            "(or `pip install visionmlp[datasets]`)"
        ) from None
    try:
        return scipy.io.loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, ... for a damaged file
        raise DataError(f"--dataset {kind}: {str(path)!r} is not a readable MATLAB file: {exc}") from None


def _mat_field(mat: dict[str, Any], key: str, path: Path, kind: str, hint: str) -> np.ndarray:
    """Entry ``key`` of a loaded .mat file as a 1-d array (``squeeze_me`` makes a single entry 0-d)."""
    if key not in mat:
        raise DataError(f"--dataset {kind}: {str(path)!r} has no {key!r} entry; {hint}")
    return np.atleast_1d(mat[key])


def _image_files(folder: Path) -> list[str]:
    """Names of the image files directly in ``folder``, sorted."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS))


# ---------------------------------------------------------------------------------------------------
# Oxford 102 Flowers


def _flower_names(num_classes: int) -> list[str]:
    """Class names: torchvision's list of the 102 flower names when the count matches, else the labels."""
    try:
        from torchvision.datasets import Flowers102
        names = list(getattr(Flowers102, "classes", []))
    except ImportError:
        names = []
    return names if len(names) == num_classes else [str(label) for label in range(1, num_classes + 1)]


def flowers102(root: Path, split: str, transform: Transform, split_scheme: str = "raftmlp", cache_mode: str = "no",
               rank: int = 0, world_size: int = 1) -> EncodedImageDataset:
    """Oxford 102 Flowers from torchvision's layout or the one the RaftMLP official code arranges.

    Layouts (``root`` may also be the ``flowers-102`` / ``102flowers`` folder itself):

    * torchvision: ``flowers-102/jpg/image_XXXXX.jpg``, ``flowers-102/imagelabels.mat``, ``flowers-102/setid.mat``;
    * RaftMLP: ``102flowers/{train,valid,test}/<label 1..102>/image_XXXXX.jpg``, which that code fills
      with setid's ``tstid`` (train, 6,149), ``valid`` (valid, 1,020) and ``trnid`` (test, 1,020).

    ``split_scheme`` ``raftmlp`` (default) trains as the RaftMLP official code does: train = setid's
    ``tstid`` (the data set's own test split, 6,149 images), val = ``valid`` (1,020). ``official``
    keeps the data set's own split: train = ``trnid`` (1,020), val = ``valid`` (1,020).
    Targets are label - 1.
    """
    if split_scheme not in FLOWERS102_SPLITS:
        raise DataError(f"data.flowers102_split must be one of {', '.join(FLOWERS102_SPLITS)}; got {split_scheme!r}")
    # which part of the release each visionmlp split reads: setid key, and the RaftMLP folder holding it
    setid_key = {("raftmlp", "train"): "tstid", ("official", "train"): "trnid"}.get((split_scheme, split), "valid")
    arranged_folder = {"tstid": "train", "valid": "valid", "trnid": "test"}
    for candidate in (root / "102flowers", root):
        if (candidate / "valid").is_dir() and ((candidate / "train").is_dir() or (candidate / "test").is_dir()):
            return _flowers_arranged(candidate, arranged_folder[setid_key], transform, cache_mode, rank, world_size)
    for candidate in (root / "flowers-102", root):
        if (candidate / "setid.mat").is_file():
            return _flowers_mat(candidate, setid_key, transform, cache_mode, rank, world_size)
    raise DataError(
        f"--dataset flowers102: found neither layout under {str(root)!r}; expected torchvision's "
        "flowers-102/ with jpg/, imagelabels.mat and setid.mat (from the Oxford release: 102flowers.tgz and the "
        "two .mat files), or the RaftMLP arrangement 102flowers/{train,valid,test}/<label 1..102>/"
    )


def _flowers_arranged(folder: Path, part: str, transform: Transform, cache_mode: str, rank: int,
                      world_size: int) -> EncodedImageDataset:
    split_dir = folder / part
    if not split_dir.is_dir():
        raise DataError(
            f"--dataset flowers102: expected a folder {str(split_dir)!r} (the RaftMLP arrangement has train/ = "
            "tstid, valid/ = valid and test/ = trnid, each with one sub-folder per label 1..102)"
        )
    # the class count is the largest label over every part, so that train and val agree on it
    labels_by_part: dict[str, list[str]] = {}
    for name in ("train", "valid", "test"):
        if (folder / name).is_dir():
            labels_by_part[name] = sorted(e.name for e in os.scandir(folder / name) if e.is_dir())
            bad = [label for label in labels_by_part[name] if not (label.isdigit() and int(label) >= 1)]
            if bad:
                raise DataError(f"--dataset flowers102: class folders of {str(folder / name)!r} must be labels "
                                f"1..102; found {bad[:3]}")
    num_classes = max((int(label) for labels in labels_by_part.values() for label in labels), default=0)
    samples = [(f"{label}/{file}", int(label) - 1)
               for label in sorted(labels_by_part[part], key=int) for file in _image_files(split_dir / label)]
    if not samples:
        raise DataError(f"--dataset flowers102: no image files under {str(split_dir)!r}")
    return EncodedImageDataset(FolderSource(split_dir), samples, _flower_names(num_classes), transform,
                               cache_mode, rank, world_size)


def _flowers_mat(folder: Path, setid_key: str, transform: Transform, cache_mode: str, rank: int,
                 world_size: int) -> EncodedImageDataset:
    labels_path, setid_path, jpg = folder / "imagelabels.mat", folder / "setid.mat", folder / "jpg"
    for needed, what in ((labels_path, "file"), (jpg, "folder")):
        if not (needed.is_file() if what == "file" else needed.is_dir()):
            raise DataError(f"--dataset flowers102: expected a {what} {str(needed)!r} beside setid.mat "
                            "(torchvision's flowers-102/ layout: jpg/, imagelabels.mat, setid.mat)")
    hint = "expected the Oxford 102 Flowers release's file"
    labels = _mat_field(_loadmat(labels_path, "flowers102"), "labels", labels_path, "flowers102", hint).astype(int)
    ids = _mat_field(_loadmat(setid_path, "flowers102"), setid_key, setid_path, "flowers102", hint).astype(int)
    if labels.size == 0 or ids.size == 0 or labels.min() < 1 or ids.min() < 1 or ids.max() > len(labels):
        raise DataError(f"--dataset flowers102: {str(setid_path)!r} and {str(labels_path)!r} disagree: image ids "
                        f"must lie in 1..{len(labels)} and labels be >= 1")
    samples = [(f"image_{i:05d}.jpg", int(labels[i - 1]) - 1) for i in ids.tolist()]
    return EncodedImageDataset(FolderSource(jpg), samples, _flower_names(int(labels.max())), transform,
                               cache_mode, rank, world_size)


# ---------------------------------------------------------------------------------------------------
# Stanford Cars


def stanford_cars(root: Path, split: str, transform: Transform, cache_mode: str = "no", rank: int = 0,
                  world_size: int = 1) -> EncodedImageDataset:
    """Stanford Cars in the layout the RaftMLP seed documents: train = ``cars_train/``, val = ``cars_test/``.

    ``root`` is ``stanford_cars/`` or its parent; it holds ``cars_train/``, ``cars_test/``,
    ``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat``
    (beside ``devkit/`` or inside it). Targets are the annotations' ``class`` - 1; ``.classes`` the
    meta file's ``class_names``. torchvision's ``StanfordCars`` reads this layout too, but only with
    the test annotations beside ``devkit/`` and with images that must all decode, so the files are read here.
    """
    folder = root if (root / "devkit").is_dir() else root / "stanford_cars"
    layout = ("stanford_cars/ (or the data path itself) with cars_train/, cars_test/, devkit/cars_meta.mat, "
              "devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat")
    images_dir = folder / ("cars_train" if split == "train" else "cars_test")
    if split == "train":
        annos_path = folder / "devkit" / "cars_train_annos.mat"
    else:
        annos_path = next((p for p in (folder / "cars_test_annos_withlabels.mat",
                                       folder / "devkit" / "cars_test_annos_withlabels.mat") if p.is_file()),
                          folder / "cars_test_annos_withlabels.mat")
    meta_path = folder / "devkit" / "cars_meta.mat"
    for needed in (images_dir, annos_path, meta_path):
        if not (needed.is_dir() if needed is images_dir else needed.is_file()):
            what = "folder" if needed is images_dir else "file"
            raise DataError(f"--dataset stanford_cars: expected a {what} {str(needed)!r}; the data path must hold "
                            f"{layout} (the test labels are in cars_test_annos_withlabels.mat, not "
                            "devkit/cars_test_annos.mat)")
    names = [str(n) for n in _mat_field(_loadmat(meta_path, "stanford_cars"), "class_names", meta_path,
                                         "stanford_cars", "expected the devkit's cars_meta.mat").tolist()]
    annotations = _mat_field(_loadmat(annos_path, "stanford_cars"), "annotations", annos_path, "stanford_cars",
                             "expected a Stanford Cars annotation file")
    fields = annotations.dtype.names or ()
    if "fname" not in fields or "class" not in fields:
        raise DataError(f"--dataset stanford_cars: the annotations of {str(annos_path)!r} have no 'fname' and 'class' "
                        f"fields (found {list(fields)}); the test labels are in cars_test_annos_withlabels.mat")
    samples = [(str(a["fname"]), int(a["class"]) - 1) for a in annotations]
    if not samples or not all(0 <= target < len(names) for _, target in samples):
        raise DataError(f"--dataset stanford_cars: the classes of {str(annos_path)!r} must lie in 1..{len(names)} "
                        f"(the class_names of {str(meta_path)!r})")
    return EncodedImageDataset(FolderSource(images_dir), samples, names, transform, cache_mode, rank, world_size)


# ---------------------------------------------------------------------------------------------------
# iNaturalist 2018 / 2019


def _read_json(path: Path, kind: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"--dataset {kind}: {str(path)!r} is not a readable JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"--dataset {kind}: {str(path)!r} is not a COCO-style annotation file (a JSON object)")
    return data


def inaturalist(year: int, root: Path, split: str, transform: Transform, cache_mode: str = "no", rank: int = 0,
                world_size: int = 1) -> EncodedImageDataset:
    """iNaturalist 2018 or 2019 in the RaftMLP seed's layout: train = ``trainYYYY.json``, val = ``valYYYY.json``.

    ``root`` (or ``root/i_naturalist_18`` / ``_19``) holds ``train_valYYYY/<supercategory>/<id>/<hash>.jpg``
    and the COCO-style JSON files, whose ``file_name`` is relative to ``root``. Each image's target comes
    from the annotation with its ``image_id`` (the RaftMLP code pairs lists by position instead). Classes
    are the JSON's ``categories`` (the split's own file, else the train file's), sorted by id and numbered
    0..N-1, which is the ids themselves in iNat 2018/2019.
    """
    kind, short = f"inat{year}", f"{year % 100:02d}"
    folder = root if (root / f"train{year}.json").is_file() else root / f"i_naturalist_{short}"
    layout = (f"train_val{year}/<supercategory>/<category id>/*.jpg, train{year}.json and val{year}.json "
              f"(in the data path or its i_naturalist_{short}/)")
    ann_path, train_path = folder / f"{split}{year}.json", folder / f"train{year}.json"
    for needed in (folder / f"train_val{year}", train_path, ann_path):
        if not (needed.is_file() if needed.suffix == ".json" else needed.is_dir()):
            raise DataError(f"--dataset {kind}: expected {str(needed)!r}; the data path must hold {layout}")
    data = _read_json(ann_path, kind)
    try:
        category_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        images = [(str(image["file_name"]), image["id"]) for image in data["images"]]
        categories = data.get("categories")
        if categories is None and ann_path != train_path:
            categories = _read_json(train_path, kind).get("categories")
        if categories is None:  # no names anywhere: the ids of the train annotations
            ids = {a["category_id"] for a in _read_json(train_path, kind)["annotations"]}
            categories = [{"id": i} for i in ids]
        names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"--dataset {kind}: {str(ann_path)!r} is not a COCO-style annotation file: missing or "
                        f"malformed {exc} (expected images with id and file_name, annotations with image_id and "
                        "category_id, categories with id and name)") from None
    order = sorted(names)
    index = {category: i for i, category in enumerate(order)}
    unlabelled = [name for name, image_id in images if image_id not in category_of]
    if unlabelled:
        raise DataError(f"--dataset {kind}: {len(unlabelled)} images of {str(ann_path)!r} have no annotation "
                        f"(e.g. {unlabelled[0]!r})")
    unknown = {category_of[i] for _, i in images} - index.keys()
    if unknown:
        raise DataError(f"--dataset {kind}: {str(ann_path)!r} uses category ids missing from the categories "
                        f"list: {sorted(unknown)[:5]}")
    samples = [(name, index[category_of[image_id]]) for name, image_id in images]
    if not samples:
        raise DataError(f"--dataset {kind}: {str(ann_path)!r} lists no images")
    return EncodedImageDataset(FolderSource(folder), samples, [names[c] for c in order], transform,
                               cache_mode, rank, world_size)


# ---------------------------------------------------------------------------------------------------
# Caltech-101

CALTECH_SEED = 1024
CALTECH_TRAIN_RATIO = 0.8
CALTECH_SPLIT_FILE = "caltech101_split.json"
_caltech_memory: dict[str, dict[str, dict[str, list[str]]]] = {}  # split file path -> split, when unwritable
_caltech_warned: set[str] = set()


def caltech_split(categories_dir: Path) -> dict[str, dict[str, list[str]]]:
    """A fresh 80/20 split of ``101_ObjectCategories``: ``{class: {"train": [...], "val": [...]}}``.

    Follows the Strip-MLP official script ``categories101_train_val_split.py``: one Python ``random``
    generator seeded with 1024 shuffles each class's file list in turn, and the first
    ``int(0.8 * n)`` files go to train, the rest to val. The official script shuffles unsorted
    ``os.listdir`` listings (classes and files), so its split depends on the file system's order;
    here classes and files are sorted first, so the split is the same on every machine. It equals the
    official split exactly when that script saw the classes and each class's files in sorted order and
    no ``BACKGROUND_Google`` folder (left out here; shuffled first there, as it sorts first, it would
    advance the generator). Within each part files are listed sorted.
    """
    rng = random.Random(CALTECH_SEED)
    split: dict[str, dict[str, list[str]]] = {}
    for name in sorted(e.name for e in os.scandir(categories_dir) if e.is_dir() and e.name != "BACKGROUND_Google"):
        files = _image_files(categories_dir / name)
        rng.shuffle(files)
        cut = int(len(files) * CALTECH_TRAIN_RATIO)
        split[name] = {"train": sorted(files[:cut]), "val": sorted(files[cut:])}
    return split


def _write_atomically(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(temp, path)  # readers (other ranks, later runs) see the old file or the whole new one
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def _load_caltech_split(split_path: Path, categories_dir: Path) -> dict[str, dict[str, list[str]]]:
    fix = f"delete {str(split_path)!r} to split again"
    try:
        with open(split_path) as f:
            classes = json.load(f)["classes"]
        split = {str(name): {part: [str(file) for file in parts[part]] for part in ("train", "val")}
                 for name, parts in classes.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"--dataset caltech101: {str(split_path)!r} is not a split file visionmlp wrote "
                        f"({exc!r}); {fix}") from None
    missing = []
    for name, parts in split.items():
        present = set(os.listdir(categories_dir / name)) if (categories_dir / name).is_dir() else set()
        missing += [f"{name}/{file}" for file in parts["train"] + parts["val"] if file not in present]
    if missing:
        raise DataError(f"--dataset caltech101: {str(split_path)!r} names {len(missing)} files missing from "
                        f"{str(categories_dir)!r} (e.g. {missing[0]!r}); {fix}")
    if not split:
        raise DataError(f"--dataset caltech101: {str(split_path)!r} lists no classes; {fix}")
    return split


def caltech101(root: Path, split: str, transform: Transform, cache_mode: str = "no", rank: int = 0,
               world_size: int = 1) -> EncodedImageDataset:
    """Caltech-101 (``BACKGROUND_Google`` left out) with the Strip-MLP 80/20 per-class split (see ``caltech_split``).

    Images are read from ``root/101_ObjectCategories`` or torchvision's ``root/caltech101/101_ObjectCategories``.
    The split is written once to ``caltech101_split.json`` beside ``101_ObjectCategories`` (a temporary
    file renamed into place) and read back on later runs, so files added afterwards do not move images
    between train and val; in a read-only folder it is kept in memory for this process, with a warning.
    Classes are the class folders in sorted order.
    """
    categories_dir = next((c for c in (root / "101_ObjectCategories", root / "caltech101" / "101_ObjectCategories")
                           if c.is_dir()), None)
    if categories_dir is None:
        raise DataError(f"--dataset caltech101: expected a folder {str(root / '101_ObjectCategories')!r} (or "
                        f"{str(root / 'caltech101' / '101_ObjectCategories')!r}, torchvision's layout) with one "
                        "sub-folder of images per class, from the Caltech-101 release's 101_ObjectCategories.tar.gz")
    split_path = categories_dir.parent / CALTECH_SPLIT_FILE
    key = str(split_path.resolve())
    if split_path.is_file():
        parts = _load_caltech_split(split_path, categories_dir)
    elif key in _caltech_memory:
        parts = _caltech_memory[key]
    else:
        parts = caltech_split(categories_dir)
        if not parts:
            raise DataError(f"--dataset caltech101: {str(categories_dir)!r} holds no class sub-folders")
        record = {"about": f"visionmlp's Caltech-101 train/val split: one random.Random({CALTECH_SEED}) shuffles each "
                           f"class's sorted file list, classes in sorted order; the first {CALTECH_TRAIN_RATIO:.0%} go "
                           "to train, as in the Strip-MLP official script. Delete this file to split again.",
                  "seed": CALTECH_SEED, "train_ratio": CALTECH_TRAIN_RATIO, "classes": parts}
        try:
            _write_atomically(split_path, json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            _caltech_memory[key] = parts
            if key not in _caltech_warned:
                _caltech_warned.add(key)
                warnings.warn(f"--dataset caltech101: could not write the split to {str(split_path)!r} ({exc}); "
                              "keeping it in memory, so a run after files are added may split differently",
                              stacklevel=2)
    classes = sorted(parts)
    samples = [(f"{name}/{file}", target) for target, name in enumerate(classes) for file in parts[name][split]]
    if not samples:
        raise DataError(f"--dataset caltech101: no image files for the {split} split under {str(categories_dir)!r}")
    return EncodedImageDataset(FolderSource(categories_dir), samples, classes, transform, cache_mode, rank,
                               world_size)
