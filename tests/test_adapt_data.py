"""Stage 2 targets: name resolution, image folders, a torchvision reader, the aTLAS validation split, errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from axis_stream.adapt.data import (
    DatasetNotFound,
    make_splits,
    normalize_name,
    resolve_target,
    transforms_for,
    validation_split,
)
from axis_stream.adapt.model import AdaptError
from axis_stream.store import models

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 200), "dark_yellow": (170, 160, 30)}


def write_colour_folders(root: Path, n_train: int, n_test: int, seed: int = 0, size: int = 32) -> Path:
    """``root/{train,test}/<colour>/*.png``: noisy images whose colour is the class, a learnable target."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def write_fake_mnist(root: Path, n_train: int, n_test: int) -> None:
    """MNIST's idx files as torchvision reads them from ``root/MNIST/raw``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        header = struct.pack(">IIII", 2051, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.numpy().tobytes())


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_colour_folders(tmp_path_factory.mktemp("colours"), n_train=25, n_test=5)


@pytest.mark.parametrize("name, key", [("Flowers102", "flowers102"), ("DTDVal", "dtd"), ("Stanford-Cars", "cars"),
                                       ("oxford_pets", "oxfordiiitpet"), ("SUN397Val", "sun397")])
def test_target_names_resolve_like_atlas_names(name, key):
    assert normalize_name(name) == key


def test_validation_split_is_atlas_random_split_with_seed_0():
    train, val = validation_split(1234, 0.10, 5000)
    ref_train, ref_val = torch.utils.data.random_split(range(1234), [1111, 123],
                                                       generator=torch.Generator().manual_seed(0))
    assert (train, val) == (list(ref_train.indices), list(ref_val.indices))
    assert sorted(train + val) == list(range(1234))
    assert len(validation_split(80_000, 0.10, 5000)[1]) == 5000
    with pytest.raises(AdaptError, match="too small"):
        validation_split(9, 0.10, 5000)


def test_image_folder_target_classes_splits_and_transforms(tiny_base, colours):
    target = resolve_target(f"imagefolder:{colours}", None)
    assert target.classnames == ["blue", "dark yellow", "green", "red"]  # sorted folders, "_" as a space
    assert target.templates == ["a photo of a {}."]
    train_tf, eval_tf = transforms_for(models.create_base(tiny_base[0]))
    splits = make_splits(target, train_tf, eval_tf, val_fraction=0.1, val_max=5000, max_train=50)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 10, 20)
    assert set(splits.train.indices).isdisjoint(splits.val.indices)
    image, label = splits.val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 4
    own = resolve_target(f"imagefolder:{colours}", None, classnames=["b", "y", "g", "r"], templates=["{} colour"])
    assert own.classnames == ["b", "y", "g", "r"] and own.templates == ["{} colour"]
    with pytest.raises(AdaptError, match="3 class names given for 4 class folders"):
        resolve_target(f"imagefolder:{colours}", None, classnames=["a", "b", "c"])


def test_a_torchvision_reader_with_grayscale_images(tiny_base, tmp_path):
    write_fake_mnist(tmp_path, n_train=40, n_test=10)
    target = resolve_target("MNIST", tmp_path)
    assert target.classnames == [str(i) for i in range(10)] and target.name == "MNIST"
    train_tf, eval_tf = transforms_for(models.create_base(tiny_base[0]))
    splits = make_splits(target, train_tf, eval_tf, val_fraction=0.1, val_max=5000, max_eval=5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (36, 4, 5)
    assert splits.train[0][0].shape == splits.test[0][0].shape == (3, 32, 32)


def test_missing_datasets_say_where_the_files_must_be(tmp_path):
    with pytest.raises(DatasetNotFound, match=r"flowers102: torchvision.datasets.Flowers102 .*flowers-102/"):
        resolve_target("flowers102", tmp_path).open("train")
    with pytest.raises(DatasetNotFound, match=r"eurosat: no folder .*eurosat/train"):
        resolve_target("eurosat", tmp_path).open("train")
    with pytest.raises(DatasetNotFound, match="expected .*/train/<class>/"):
        resolve_target(f"imagefolder:{tmp_path / 'nowhere'}", None)
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_unknown_targets_and_missing_data_root_are_clear_errors(tmp_path):
    with pytest.raises(AdaptError, match="unknown target 'imagenet-x'.*flowers102"):
        resolve_target("imagenet-x", tmp_path)
    with pytest.raises(AdaptError, match="--data-root"):
        resolve_target("dtd", None)
    with pytest.raises(AdaptError, match="2 class names given, the dataset has 47"):
        resolve_target("dtd", tmp_path, classnames=["a", "b"])
    write_colour_folders(tmp_path / "eurosat", n_train=1, n_test=1)
    with pytest.raises(AdaptError, match="eurosat: the train split .* has 4 classes, the class names list 10"):
        resolve_target("eurosat", tmp_path).open("train")
