"""Data sets built inside the tests: digits, ImageNet folders and zips (both cache modes), CIFAR pickles."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionmlp.data import DataError, DigitsDataset, build_dataset, build_loader
from visionmlp.data.loader import EvalShardSampler, ShardSampler

CLASSES = ("cat", "dog")


def _jpeg_bytes(seed: int, size: int = 20) -> bytes:
    import io

    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_imagenet_folder(root: Path, per_class: int = 3, corrupt: bool = False) -> Path:
    """train/ and val/ with one folder per class of tiny JPEGs; optionally one unreadable file in val/."""
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}.jpg").write_bytes(_jpeg_bytes(100 * c + i))
    if corrupt:
        (root / "val" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def make_imagenet_zip(root: Path, per_class: int = 3, corrupt: bool = False) -> Path:
    """train.zip, val.zip and their map files (``relative/path label``), as in the MS-MLP seed."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        lines = []
        with zipfile.ZipFile(root / f"{split}.zip", "w") as archive:
            for c, name in enumerate(CLASSES):
                for i in range(per_class):
                    member = f"{name}/{i}.jpg"
                    archive.writestr(member, _jpeg_bytes(100 * c + i))
                    lines.append(f"{member}\t{c}")
            if corrupt and split == "val":
                archive.writestr("dog/broken.jpg", b"not a jpeg")
                lines.append("dog/broken.jpg 1")
        (root / f"{split}_map.txt").write_text("\n".join(lines) + "\n")
    return root


def make_cifar(root: Path, kind: str, n_train: int = 20, n_val: int = 10) -> Path:
    """The python-pickle layout of CIFAR-10 (five train batches) or CIFAR-100 (train/test/meta)."""
    rng = np.random.RandomState(0)

    def batch(n, labels_key, num_classes):
        return {"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
                labels_key: rng.randint(0, num_classes, n).tolist()}

    def dump(path, obj):
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            dump(folder / f"data_batch_{i}", batch(n_train // 5, "labels", 10))
        dump(folder / "test_batch", batch(n_val, "labels", 10))
        dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", batch(n_train, "fine_labels", 100))
        dump(folder / "test", batch(n_val, "fine_labels", 100))
        dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return root


def test_digits_split_is_fixed_and_disjoint():
    train, val = DigitsDataset("train", 16), DigitsDataset("val", 16)
    assert (len(train), len(val)) == (1437, 360)
    assert len(train.classes) == 10
    image, target = val[0]
    assert image.size == (16, 16) and image.mode == "RGB" and 0 <= target < 10
    train_keys = {img.tobytes() for img in train.images}
    assert sum(img.tobytes() in train_keys for img in val.images) < 5  # the data set has a few duplicate glyphs
    assert DigitsDataset("val", 16).targets == val.targets


def test_imagenet_folder_skips_an_unreadable_file_with_a_warning(tmp_path):
    root = make_imagenet_folder(tmp_path / "in", corrupt=True)
    train = build_dataset("imagenet", "train", None, data_path=root)
    val = build_dataset("imagenet", "val", None, data_path=root)
    assert (len(train), len(val), train.classes) == (6, 7, list(CLASSES))
    broken = next(i for i, (name, _) in enumerate(val.samples) if "broken" in name)
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert val[broken] is None
    loader = build_loader(val, training=False, batch_size=4, workers=0)
    val.transform = lambda image: np.asarray(image.resize((8, 8)), dtype=np.float32)
    seen = skipped = 0
    for images, _, n_skipped in loader:
        seen += 0 if images is None else len(images)
        skipped += n_skipped
    assert (seen, skipped) == (6, 1)


@pytest.mark.parametrize("cache_mode", ["part", "full"])
def test_imagenet_zip_with_cache_modes(tmp_path, cache_mode):
    root = make_imagenet_zip(tmp_path / "zip", per_class=4)
    shards = [build_dataset("imagenet", "train", None, data_path=root, use_zip=True, cache_mode=cache_mode,
                            rank=rank, world_size=2) for rank in range(2)]
    if cache_mode == "part":
        assert sorted(shards[0]._cache) == [0, 2, 4, 6] and sorted(shards[1]._cache) == [1, 3, 5, 7]
    else:
        assert all(sorted(s._cache) == list(range(8)) for s in shards)
    image, target = shards[1][0]  # outside rank 1's part: read from the zip on demand
    assert image.size == (20, 20) and target == 0
    assert shards[0].classes == ["0", "1"]


def test_imagenet_zip_unreadable_member_is_skipped(tmp_path):
    root = make_imagenet_zip(tmp_path / "zip", corrupt=True)
    val = build_dataset("imagenet", "val", None, data_path=root, use_zip=True, cache_mode="full")
    with pytest.warns(UserWarning, match=r"val\.zip@dog/broken\.jpg"):
        assert val[len(val) - 1] is None


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_pickle_layout(tmp_path, kind):
    root = make_cifar(tmp_path, kind)
    train = build_dataset(kind, "train", None, data_path=root)
    val = build_dataset(kind, "val", None, data_path=root / CIFAR_FOLDERS[kind])  # the folder itself works too
    assert (len(train), len(val)) == (20, 10)
    assert len(train.classes) == (10 if kind == "cifar10" else 100)
    image, target = train[3]
    assert image.size == (32, 32) and 0 <= target < len(train.classes)


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def test_cifar_pickle_with_code_is_refused(tmp_path):
    root = make_cifar(tmp_path, "cifar10")
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [Path("x")]}, f)
    with pytest.raises(DataError, match="not a readable CIFAR pickle"):
        build_dataset("cifar10", "val", None, data_path=root)


@pytest.mark.parametrize("layout, message", [
    ("nothing", "is not a directory"),
    ("no_val", "expected a folder .*val"),
    ("zip_no_map", "expected a file .*val_map.txt"),
    ("bad_map", "line 1: expected 'relative/path label'"),
    ("cifar_missing", "missing: .*test_batch"),
])
def test_missing_or_malformed_data_fails_at_once(tmp_path, layout, message):
    kind, use_zip, root = "imagenet", False, tmp_path / "data"
    if layout == "no_val":
        make_imagenet_folder(root)
        for file in (root / "val").rglob("*.jpg"):
            file.unlink()
        for folder in sorted((root / "val").rglob("*"), reverse=True):
            folder.rmdir()
        (root / "val").rmdir()
    elif layout in ("zip_no_map", "bad_map"):
        use_zip = True
        make_imagenet_zip(root)
        if layout == "zip_no_map":
            (root / "val_map.txt").unlink()
        else:
            (root / "val_map.txt").write_text("dog/0.jpg\n")
    elif layout == "cifar_missing":
        kind = "cifar10"
        make_cifar(root, "cifar10")
        (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match=message):
        build_dataset(kind, "val", None, data_path=root, use_zip=use_zip)


def test_samplers_split_over_ranks():
    train_shards = [list(ShardSampler(11, rank, 3, seed=1)) for rank in range(3)]
    assert {len(s) for s in train_shards} == {4}  # equal step counts on every rank
    assert set(train_shards[1]) == {1, 4, 7, 10}
    eval_shards = [list(EvalShardSampler(11, rank, 3)) for rank in range(3)]
    assert sorted(sum(eval_shards, [])) == list(range(11))  # every image once, no padding


def test_randaugment_posterizes_to_zero_bits_on_any_pillow():
    # RandAugment's increasing posterize keeps 0 bits at magnitude 10: a black image, which Pillow 13 refuses to make
    from timm.data import auto_augment

    from visionmlp.config import build_config
    from visionmlp.data import build_transform

    config = build_config()
    config["aug"]["auto_augment"] = "rand-m10-n1-mstd0-inc1"
    transform = build_transform(config, {"input_size": (3, 16, 16), "interpolation": "bicubic", "crop_pct": 1.0,
                                         "mean": (0.5,) * 3, "std": (0.5,) * 3}, training=True)
    # the tensor pipeline runs RandAugment on a PIL view of its pixels (OnPIL)
    randaugment = next(getattr(step, "transform", step) for step in transform.transforms
                       if hasattr(getattr(step, "transform", step), "ops"))
    (posterize,) = [op for op in randaugment.ops if op.name == "PosterizeIncreasing"]
    image = Image.new("RGB", (16, 16), (200, 120, 40))
    assert posterize.aug_fn(image, 0).getextrema() == ((0, 0),) * 3
    assert posterize.aug_fn(image, 8) is image
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is auto_augment.posterize  # timm's own table untouched
