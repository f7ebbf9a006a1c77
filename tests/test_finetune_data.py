"""Fine-tuning data sets built inside the tests: folder, Flowers-102 (both layouts), Stanford Cars,
iNaturalist 2018/2019 and Caltech-101 (its seeded 80/20 split), plus one `visionmlp train` run."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_data import make_imagenet_folder
from visionmlp.config import ConfigError, build_config
from visionmlp.data import DataError, build_dataset
from visionmlp.data import transfer

try:
    import scipy.io as sio
except ImportError:  # the .mat layouts cannot be generated (nor read) without scipy
    sio = None

needs_scipy = pytest.mark.skipif(sio is None, reason="scipy is not installed (pip install scipy): .mat files")


def _image(path: Path, seed: int, size: int = 12) -> None:
    """A tiny random image; the suffix picks JPEG or PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG" if path.suffix == ".png" else "JPEG")
    path.write_bytes(buffer.getvalue())


def _names(dataset) -> list[tuple[str, int]]:
    return [(Path(name).name, target) for name, target in dataset.samples]


# ---------------------------------------------------------------------------------------------------
# folder


def test_folder_reads_the_imagenet_layout_and_names_itself_in_errors(tmp_path):
    root = make_imagenet_folder(tmp_path / "mine", per_class=2)
    train = build_dataset("folder", "train", None, data_path=root)
    val = build_dataset("folder", "val", None, data_path=root)
    assert train.classes == ["cat", "dog"] and len(train) == len(val) == 4
    image, target = val[3]
    assert image.size == (20, 20) and target == 1
    message = r"--dataset folder: expected a folder .*val'; the data path must hold val/ \(and train/ beside it"
    with pytest.raises(DataError, match=message) as error:
        build_dataset("folder", "val", None, data_path=tmp_path)
    assert "--zip" not in str(error.value)
    with pytest.raises(DataError, match=r"expected a folder .*train'; the data path must hold train/ and val/"):
        build_dataset("folder", "train", None, data_path=tmp_path)


# ---------------------------------------------------------------------------------------------------
# Oxford 102 Flowers: 3 classes, 12 images; trnid 3, valid 3, tstid 6

FLOWER_LABELS = [1, 2, 3] * 4
FLOWER_SETS = {"trnid": [1, 2, 3], "valid": [4, 5, 6], "tstid": [7, 8, 9, 10, 11, 12]}


def make_flowers_torchvision(root: Path) -> Path:
    folder = root / "flowers-102"
    for i in range(1, len(FLOWER_LABELS) + 1):
        _image(folder / "jpg" / f"image_{i:05d}.jpg", i)
    sio.savemat(folder / "imagelabels.mat", {"labels": np.array([FLOWER_LABELS], dtype=np.uint8)})
    sio.savemat(folder / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in FLOWER_SETS.items()})
    return root


def make_flowers_raftmlp(root: Path) -> Path:
    """The RaftMLP code's arrangement: train/ = tstid, valid/ = valid, test/ = trnid."""
    for part, key in (("train", "tstid"), ("valid", "valid"), ("test", "trnid")):
        for i in FLOWER_SETS[key]:
            _image(root / "102flowers" / part / str(FLOWER_LABELS[i - 1]) / f"image_{i:05d}.jpg", i)
    return root


def _expected_flowers(key: str) -> list[tuple[str, int]]:
    return sorted((f"image_{i:05d}.jpg", FLOWER_LABELS[i - 1] - 1) for i in FLOWER_SETS[key])


@pytest.mark.parametrize("layout", ["torchvision", "raftmlp"])
def test_flowers102_both_layouts_and_both_split_schemes(tmp_path, layout):
    if layout == "torchvision":
        if sio is None:
            pytest.skip("scipy is not installed (pip install scipy): .mat files")
        root = make_flowers_torchvision(tmp_path)
    else:
        root = make_flowers_raftmlp(tmp_path)
    sizes = {}
    for scheme, train_key in (("raftmlp", "tstid"), ("official", "trnid")):
        train = build_dataset("flowers102", "train", None, data_path=root, flowers102_split=scheme)
        val = build_dataset("flowers102", "val", None, data_path=root, flowers102_split=scheme)
        assert sorted(_names(train)) == _expected_flowers(train_key)
        assert sorted(_names(val)) == _expected_flowers("valid")
        assert train.classes == val.classes == ["1", "2", "3"]  # derived from the labels present
        sizes[scheme] = (len(train), len(val))
        image, target = train[0]
        assert image.mode == "RGB" and 0 <= target < 3
    assert sizes == {"raftmlp": (6, 3), "official": (3, 3)}
    assert build_dataset("flowers102", "train", None, data_path=root).samples == \
        build_dataset("flowers102", "train", None, data_path=root, flowers102_split="raftmlp").samples


@needs_scipy
def test_flowers102_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="found neither layout.*flowers-102/ with jpg/.*102flowers/"):
        build_dataset("flowers102", "train", None, data_path=tmp_path)
    root = make_flowers_torchvision(tmp_path / "tv")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(DataError, match=r"needs scipy.*pip install scipy"):
        build_dataset("flowers102", "train", None, data_path=root)
    monkeypatch.undo()
    (root / "flowers-102" / "setid.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="setid.mat.*not a readable MATLAB file"):
        build_dataset("flowers102", "train", None, data_path=root)
    arranged = make_flowers_raftmlp(tmp_path / "arranged")
    (arranged / "102flowers" / "test" / "3" / "image_00003.jpg").unlink()
    (arranged / "102flowers" / "test" / "3").rmdir()
    (arranged / "102flowers" / "test" / "roses").mkdir()
    with pytest.raises(DataError, match="must be labels 1..102.*roses"):
        build_dataset("flowers102", "val", None, data_path=arranged)
    with pytest.raises(ConfigError, match="data.flowers102_split must be one of raftmlp, official"):
        build_config(None, {"data.flowers102_split": "mine"}, {"data.dataset": "flowers102", "data.path": "x"})
    assert build_config(None, {"data.flowers102_split": "official"}, {})["data"]["flowers102_split"] == "official"


# ---------------------------------------------------------------------------------------------------
# Stanford Cars: 3 classes, 6 train and 3 test images

CAR_FIELDS = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]


def _car_annotations(path: Path, entries: list[tuple[str, int]], with_class: bool = True) -> None:
    fields = CAR_FIELDS if with_class else [f for f in CAR_FIELDS if f[0] != "class"]
    array = np.empty((1, len(entries)), dtype=fields)
    for i, (fname, cls) in enumerate(entries):
        values = (np.uint8(0), np.uint8(0), np.uint8(9), np.uint8(9)) + ((np.uint8(cls),) if with_class else ())
        array[0, i] = values + (fname,)
    sio.savemat(path, {"annotations": array})


def make_cars(root: Path, test_annos_in_devkit: bool = False) -> Path:
    folder = root / "stanford_cars"
    (folder / "devkit").mkdir(parents=True)
    train = [(f"{i:05d}.jpg", 1 + i % 3) for i in range(1, 7)]
    test = [(f"{i:05d}.jpg", 1 + i % 3) for i in range(1, 4)]
    for part, entries in (("cars_train", train), ("cars_test", test)):
        for i, (fname, _) in enumerate(entries):
            _image(folder / part / fname, 10 * len(part) + i)
    sio.savemat(folder / "devkit" / "cars_meta.mat",
                {"class_names": np.array([["AM General Hummer", "Acura RL", "Audi A5"]], dtype=object)})
    _car_annotations(folder / "devkit" / "cars_train_annos.mat", train)
    _car_annotations(folder / "devkit" / "cars_test_annos.mat", test, with_class=False)
    test_annos = folder / ("devkit" if test_annos_in_devkit else "") / "cars_test_annos_withlabels.mat"
    _car_annotations(test_annos, test)
    return root


@needs_scipy
@pytest.mark.parametrize("in_devkit, point_at_folder", [(False, False), (True, True)])
def test_stanford_cars(tmp_path, in_devkit, point_at_folder):
    root = make_cars(tmp_path, in_devkit)
    path = root / "stanford_cars" if point_at_folder else root
    train = build_dataset("stanford_cars", "train", None, data_path=path)
    val = build_dataset("stanford_cars", "val", None, data_path=path)
    assert train.classes == val.classes == ["AM General Hummer", "Acura RL", "Audi A5"]
    assert (len(train), len(val)) == (6, 3)
    assert _names(val) == [("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 0)]
    image, target = train[5]
    assert image.size == (12, 12) and target == 0


@needs_scipy
def test_stanford_cars_errors(tmp_path):
    with pytest.raises(DataError, match=r"expected a folder .*cars_train.*devkit/cars_meta.mat"):
        build_dataset("stanford_cars", "train", None, data_path=tmp_path)
    root = make_cars(tmp_path / "cars")
    (root / "stanford_cars" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError, match=r"expected a file .*cars_test_annos_withlabels.mat"):
        build_dataset("stanford_cars", "val", None, data_path=root)
    # the devkit's unlabelled test annotations put where the labelled ones belong
    (root / "stanford_cars" / "devkit" / "cars_test_annos.mat").rename(
        root / "stanford_cars" / "cars_test_annos_withlabels.mat")
    with pytest.raises(DataError, match="no 'fname' and 'class' fields"):
        build_dataset("stanford_cars", "val", None, data_path=root)


# ---------------------------------------------------------------------------------------------------
# iNaturalist: COCO-style JSON, images under train_valYYYY/<supercategory>/<id>/


def make_inat(root: Path, year: int, category_ids: tuple[int, ...] = (0, 1, 2)) -> Path:
    images, annotations, counts = {"train": [], "val": []}, {"train": [], "val": []}, {"train": 3, "val": 1}
    image_id = 100
    for c in category_ids:
        for split, count in counts.items():
            for _ in range(count):
                name = f"train_val{year}/{'Plantae' if c % 2 else 'Aves'}/{c}/{image_id:032x}.jpg"
                _image(root / name, image_id)
                images[split].append({"id": image_id, "file_name": name, "width": 12, "height": 12})
                annotations[split].append({"id": image_id + 5000, "image_id": image_id, "category_id": c})
                image_id += 1
    categories = [{"id": c, "name": f"species {c}", "supercategory": "x"} for c in reversed(category_ids)]
    for split in counts:
        annotations[split].reverse()  # targets must follow image_id, not list position
        (root / f"{split}{year}.json").write_text(json.dumps(
            {"images": images[split], "annotations": annotations[split], "categories": categories}))
    return root


@pytest.mark.parametrize("year", [2018, 2019])
def test_inaturalist(tmp_path, year):
    make_inat(tmp_path / f"i_naturalist_{year % 100}", year)
    train = build_dataset(f"inat{year}", "train", None, data_path=tmp_path)  # the parent of i_naturalist_YY
    val = build_dataset(f"inat{year}", "val", None, data_path=tmp_path / f"i_naturalist_{year % 100}")
    assert train.classes == val.classes == ["species 0", "species 1", "species 2"]
    assert (len(train), len(val)) == (9, 3)
    assert [int(Path(name).parent.name) for name, _ in train.samples] == train.targets
    image, target = val[2]
    assert image.size == (12, 12) and target == 2
    (tmp_path / f"i_naturalist_{year % 100}" / val.samples[1][0]).write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert val[1] is None  # skipped by the loader's collate, like every file-backed set


def test_inaturalist_maps_sparse_category_ids_and_reports_bad_trees(tmp_path):
    root = make_inat(tmp_path / "sparse", 2018, category_ids=(3, 7, 40))
    val = build_dataset("inat2018", "val", None, data_path=root)
    assert val.classes == ["species 3", "species 7", "species 40"] and val.targets == [0, 1, 2]
    with pytest.raises(DataError, match=r"expected .*train_val2019.*train2019.json and val2019.json"):
        build_dataset("inat2019", "train", None, data_path=root)
    (root / "val2018.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(DataError, match="not a COCO-style annotation file: missing or malformed 'file_name'"):
        build_dataset("inat2018", "val", None, data_path=root)
    (root / "val2018.json").write_text("{not json")
    with pytest.raises(DataError, match="val2018.json.*not a readable JSON file"):
        build_dataset("inat2018", "val", None, data_path=root)


# ---------------------------------------------------------------------------------------------------
# Caltech-101: seeded 80/20 split per class, written once to caltech101_split.json

CALTECH_SIZES = {"accordion": 5, "Faces_easy": 10, "yin_yang": 7, "BACKGROUND_Google": 4}


def make_caltech(root: Path, order_seed: int) -> Path:
    """101_ObjectCategories with the files created in a shuffled order (so listings come in another order)."""
    files = [(name, i) for name, n in CALTECH_SIZES.items() for i in range(1, n + 1)]
    random.Random(order_seed).shuffle(files)
    for name, i in files:
        _image(root / name / f"image_{i:04d}.{'png' if i == 2 else 'jpg'}", i)
    return root


def _official_rule(categories: Path, classes: list[str]) -> dict[str, tuple[set[str], set[str]]]:
    """The Strip-MLP script's rule restated: one generator seeded 1024, per class shuffle, first int(0.8 n) to train."""
    generator = random.Random(1024)
    split = {}
    for name in classes:
        files = sorted(p.name for p in (categories / name).iterdir())
        generator.shuffle(files)
        cut = int(len(files) * 0.8)
        split[name] = (set(files[:cut]), set(files[cut:]))
    return split


def _split_of(dataset) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {}
    for name, target in dataset.samples:
        parts.setdefault(dataset.classes[target], set()).add(Path(name).name)
    return parts


def test_caltech101_split_is_reproducible_written_and_reused(tmp_path):
    first = make_caltech(tmp_path / "a" / "101_ObjectCategories", order_seed=1).parent
    second = make_caltech(tmp_path / "b" / "caltech101" / "101_ObjectCategories", order_seed=2).parent.parent
    train = build_dataset("caltech101", "train", None, data_path=first)
    val = build_dataset("caltech101", "val", None, data_path=first)
    assert train.classes == val.classes == ["Faces_easy", "accordion", "yin_yang"]  # no BACKGROUND_Google
    assert (len(train), len(val)) == (4 + 8 + 5, 1 + 2 + 2)  # int(0.8 n) per class to train
    expected = _official_rule(first / "101_ObjectCategories", train.classes)
    train_parts, val_parts = _split_of(train), _split_of(val)
    for name, (train_files, val_files) in expected.items():
        assert train_parts[name] == train_files and val_parts.get(name, set()) == val_files
    image, target = val[0]
    assert image.mode == "RGB" and target == 0

    # another creation order, torchvision's caltech101/ folder: the same split, written beside the images
    other = build_dataset("caltech101", "train", None, data_path=second)
    assert _split_of(other) == train_parts
    split_file = first / "caltech101_split.json"
    assert split_file.is_file() and (second / "caltech101" / "caltech101_split.json").is_file()
    assert not list(first.glob("*.tmp"))
    assert set(json.loads(split_file.read_text())["classes"]) == {"Faces_easy", "accordion", "yin_yang"}

    # files added later stay out: the written split is reused
    _image(first / "101_ObjectCategories" / "accordion" / "image_0099.jpg", 99)
    again = build_dataset("caltech101", "train", None, data_path=first)
    assert again.samples == train.samples
    assert len(build_dataset("caltech101", "val", None, data_path=first)) == len(val)

    # a listed file gone: say which file holds the split and how to redo it
    (first / "101_ObjectCategories" / "yin_yang" / "image_0001.jpg").unlink()
    with pytest.raises(DataError, match=r"caltech101_split.json.*names 1 files missing.*yin_yang/image_0001.jpg"
                                        r".*delete .* to split again"):
        build_dataset("caltech101", "val", None, data_path=first)
    split_file.write_text("[1, 2]")
    with pytest.raises(DataError, match="not a split file visionmlp wrote.*delete"):
        build_dataset("caltech101", "train", None, data_path=first)
    split_file.unlink()
    resplit = build_dataset("caltech101", "train", None, data_path=first)
    assert len(resplit) == int(6 * 0.8) + 8 + int(6 * 0.8)  # accordion gained a file, yin_yang lost one


def test_caltech101_read_only_root_keeps_the_split_in_memory(tmp_path, monkeypatch):
    root = make_caltech(tmp_path / "101_ObjectCategories", order_seed=3).parent

    def refuse(path, text):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(transfer, "_write_atomically", refuse)
    with pytest.warns(UserWarning, match="could not write the split.*keeping it in memory"):
        train = build_dataset("caltech101", "train", None, data_path=root)
    val = build_dataset("caltech101", "val", None, data_path=root)  # no second warning, the same split
    assert not (root / "caltech101_split.json").exists()
    assert len(train) + len(val) == 22
    assert not set(train.samples) & set(val.samples)
    with pytest.raises(DataError, match=r"expected a folder .*101_ObjectCategories.*torchvision's layout"):
        build_dataset("caltech101", "train", None, data_path=tmp_path / "101_ObjectCategories")


def test_unknown_dataset_lists_the_choices(tmp_path):
    with pytest.raises(DataError, match="choose one of .*flowers102, stanford_cars, inat2018, inat2019, caltech101"):
        build_dataset("flowers", "train", None, data_path=tmp_path)


# ---------------------------------------------------------------------------------------------------
# end to end


def test_visionmlp_train_on_a_folder(tmp_path):
    from visionmlp.cli import main

    torch.set_num_threads(1)
    root = make_imagenet_folder(tmp_path / "mine", per_class=4)
    assert main(["train", "--dataset", "folder", "--data-path", str(root), "--epochs", "1",
                 "--output", str(tmp_path / "run"), "--img-size", "14", "--batch-size", "8", "--workers", "0",
                 "--opts", "model.kwargs", "{depths: [1, 1, 1, 1], embed_dims: [16, 32, 32, 32], "
                 "num_segments: [4, 4, 4, 4]}", "train.warmup_epochs", "0", "print_freq", "1000"]) == 0
    assert (tmp_path / "run" / "last.pt").is_file()
