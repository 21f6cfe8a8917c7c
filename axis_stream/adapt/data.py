"""Stage 2 targets: which dataset a name means, where its files must be, its splits and transforms.

``--target NAME`` is one of the paper's 22 datasets (read by torchvision, or from image folders where
torchvision has no train/test split) or ``imagefolder:PATH`` with ``PATH/train/<class>/`` and
``PATH/test/<class>/``. Nothing is ever downloaded: a missing dataset is a ``DatasetNotFound`` that
says where the files must be. The validation split is aTLAS's: 10 % of train, at most 5,000, seed 0.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from axis_stream.adapt.head import check_texts, packaged_texts
from axis_stream.adapt.model import AdaptError


class DatasetNotFound(AdaptError):
    """The target's files are not where the reader looks; the message says where they must be."""


def _transpose(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.TRANSPOSE)


@dataclass(frozen=True)
class Reader:
    """How one dataset is read from the data root.

    ``cls``: the ``torchvision.datasets`` class with its ``train``/``test`` keyword arguments, or None
    for image folders ``<root>/<folder>/{train,test}/<class>/``. ``folder``: the sub-folder of the data
    root handed to torchvision (most torchvision classes add their own). ``layout``: what must exist
    under the data root, for the error message. ``fix``: applied to every image (EMNIST is stored transposed).
    """

    layout: str
    cls: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    folder: str = ""
    fix: Callable[[Image.Image], Image.Image] | None = None


_SPLIT = {"train": {"split": "train"}, "test": {"split": "test"}}
_FLAG = {"train": {"train": True}, "test": {"train": False}}

READERS: dict[str, Reader] = {
    "cars": Reader("stanford_cars/ (devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat)",
                   "StanfordCars", **_SPLIT),
    "dtd": Reader("dtd/dtd/ (images/, labels/)", "DTD", **_SPLIT),
    "eurosat": Reader("eurosat/train/<class>/ and eurosat/test/<class>/", folder="eurosat"),
    "gtsrb": Reader("gtsrb/ (GTSRB/Training/, GTSRB/Final_Test/Images/, GT-final_test.csv)", "GTSRB", **_SPLIT),
    "mnist": Reader("MNIST/raw/ (the four idx-ubyte files)", "MNIST", **_FLAG),
    "resisc45": Reader("resisc45/train/<class>/ and resisc45/test/<class>/", folder="resisc45"),
    "sun397": Reader("sun397/train/<class>/ and sun397/test/<class>/", folder="sun397"),
    "svhn": Reader("svhn/ (train_32x32.mat, test_32x32.mat)", "SVHN", **_SPLIT, folder="svhn"),
    "cifar10": Reader("cifar-10-batches-py/", "CIFAR10", **_FLAG),
    "cifar100": Reader("cifar-100-python/", "CIFAR100", **_FLAG),
    "stl10": Reader("stl10_binary/", "STL10", **_SPLIT),
    "food101": Reader("food-101/ (images/, meta/)", "Food101", **_SPLIT),
    "flowers102": Reader("flowers-102/ (jpg/, imagelabels.mat, setid.mat)", "Flowers102", **_SPLIT),
    "fer2013": Reader("fer2013/ (fer2013.csv, or icml_face_data.csv, or train.csv and test.csv)", "FER2013", **_SPLIT),
    "pcam": Reader("pcam/ (camelyonpatch_level_2_split_{train,test}_{x,y}.h5; needs h5py)", "PCAM", **_SPLIT),
    "oxfordiiitpet": Reader("oxford-iiit-pet/ (images/, annotations/)", "OxfordIIITPet",
                            train={"split": "trainval"}, test={"split": "test"}),
    "renderedsst2": Reader("rendered-sst2/ (train/, test/ with negative/ and positive/)", "RenderedSST2", **_SPLIT),
    "emnist": Reader("EMNIST/raw/ (the emnist-digits idx-ubyte files)", "EMNIST",
                     train={"split": "digits", "train": True}, test={"split": "digits", "train": False},
                     fix=_transpose),
    "fashionmnist": Reader("FashionMNIST/raw/", "FashionMNIST", **_FLAG),
    "kmnist": Reader("KMNIST/raw/", "KMNIST", **_FLAG),
    "fgvcaircraft": Reader("fgvc-aircraft-2013b/ (data/images/, data/variants.txt, ...)", "FGVCAircraft", **_SPLIT),
    "country211": Reader("country211/ (train/, test/ with one folder per country code)", "Country211", **_SPLIT),
}

ALIASES = {"stanfordcars": "cars", "oxfordpets": "oxfordiiitpet", "pets": "oxfordiiitpet",
           "flowers": "flowers102", "fgvc": "fgvcaircraft", "sst2": "renderedsst2"}


@dataclass(frozen=True)
class Target:
    """A resolved ``--target``: its texts for the head and how to read its train and test splits."""

    key: str
    name: str
    classnames: list[str]
    templates: list[str]
    root: Path
    reader: Reader

    def open(self, split: str) -> Dataset:
        """The raw split (PIL image, label) as the reader gives it; ``DatasetNotFound`` if it is not there."""
        r = self.reader
        where = self.root / r.folder
        ds = _image_folder(where, split, self.key, r.layout) if r.cls is None else self._torchvision(where, split)
        classes = getattr(ds, "classes", None)
        if classes is not None and len(classes) != len(self.classnames):
            raise AdaptError(f"{self.key}: the {split} split under {where} has {len(classes)} classes, "
                             f"the class names list {len(self.classnames)}")
        return ds

    def _torchvision(self, where: Path, split: str) -> Dataset:
        import torchvision.datasets as tvd

        r = self.reader
        cls = getattr(tvd, r.cls)
        kwargs = dict(r.train if split == "train" else r.test)
        if "download" in inspect.signature(cls).parameters:
            kwargs["download"] = False
        try:
            return cls(str(where), **kwargs)
        except (RuntimeError, OSError, ImportError) as exc:
            detail = str(exc).split(". You can")[0].split("\n")[0]
            raise DatasetNotFound(f"{self.key}: torchvision.datasets.{r.cls} cannot read the {split} split "
                                  f"under {where} ({detail}); expected {r.layout} under the data root "
                                  f"{self.root}; nothing is downloaded") from None


def _split_folder(path: Path, split: str, key: str, layout: str) -> Path:
    """``path/split`` of an image-folder dataset; ``DatasetNotFound`` saying the layout when it is missing."""
    folder = path / split
    if not folder.is_dir():
        raise DatasetNotFound(f"{key}: no folder {folder}; expected {layout} (one sub-folder of images "
                              f"per class); nothing is downloaded")
    return folder


def _image_folder(path: Path, split: str, key: str, layout: str) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = _split_folder(path, split, key, layout)
    try:
        return ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as exc:
        raise DatasetNotFound(f"{key}: {folder}: {exc}") from None


def normalize_name(name: str) -> str:
    """Lower-case, without separators and aTLAS's ``Val`` suffix: ``Flowers-102Val`` -> ``flowers102``."""
    key = re.sub(r"[\s_\-]", "", name).lower()
    key = key[:-3] if key.endswith("val") and key[:-3] in READERS else key
    return ALIASES.get(key, key)


def resolve_target(name: str, data_root: Path | None, classnames: Sequence[str] | None = None,
                   templates: Sequence[str] | None = None) -> Target:
    """``--target NAME`` (a packaged dataset or ``imagefolder:PATH``) with its texts; user lists win."""
    if name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        train = path / "train"
        if not train.is_dir() or not (path / "test").is_dir():
            raise DatasetNotFound(f"{name}: expected {train}/<class>/ and {path / 'test'}/<class>/ with "
                                  f"one sub-folder of images per class")
        folders = sorted(p.name for p in train.iterdir() if p.is_dir())
        test_folders = sorted(p.name for p in (path / "test").iterdir() if p.is_dir())
        if folders != test_folders:
            raise AdaptError(f"{name}: train/ and test/ have different class folders")
        names = classnames or [re.sub(r"[_\-]+", " ", f) for f in folders]
        texts = check_texts(names, templates or ["a photo of a {}."], f"{name} classes/templates")
        if len(texts[0]) != len(folders):
            raise AdaptError(f"{name}: {len(texts[0])} class names given for {len(folders)} class folders")
        return Target(name, path.name, *texts, path.parent, Reader(f"{path.name}/train/<class>/ and "
                                                                   f"{path.name}/test/<class>/", folder=path.name))
    key = normalize_name(name)
    if key not in READERS:
        raise AdaptError(f"unknown target {name!r}: use imagefolder:PATH or one of {', '.join(sorted(READERS))}")
    if data_root is None:
        raise DatasetNotFound(f"{key}: no data root: pass --data-root or set paths.data_root in the config")
    root, reader = Path(data_root).expanduser(), READERS[key]
    if not root.is_dir():
        raise DatasetNotFound(f"{key}: the data root {root} is not a folder; expected {reader.layout} under it "
                              f"(--data-root or paths.data_root); nothing is downloaded")
    for split in ("train", "test") if reader.cls is None else ():   # cheap for image folders; torchvision's at open
        _split_folder(root / reader.folder, split, key, reader.layout)
    shipped = packaged_texts()[key]
    names, tpl = check_texts(classnames or shipped["classnames"], templates or shipped["templates"],
                             f"{key} classes/templates")
    if len(names) != len(shipped["classnames"]):
        raise AdaptError(f"{key}: {len(names)} class names given, the dataset has {len(shipped['classnames'])}")
    return Target(key, shipped["name"], names, tpl, root, reader)


# --- splits and transforms ---


class Transformed(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the image: splits share one reader."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable[[Image.Image], torch.Tensor],
                 fix: Callable[[Image.Image], Image.Image] | None = None):
        self.base, self.indices, self.transform, self.fix = base, list(indices), transform, fix

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[self.indices[i]]
        if self.fix is not None:
            img = self.fix(img)
        return self.transform(img), int(label)


@dataclass
class Splits:
    train: Transformed
    val: Transformed
    test: Transformed


def validation_split(n: int, fraction: float, max_val: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """aTLAS's split of ``n`` training samples into (train, val) indices: ``random_split`` with ``seed``."""
    val = min(int(n * fraction), max_val)
    if val < 1 or val >= n:
        raise AdaptError(f"a train split of {n} samples is too small for a {fraction:.0%} validation split")
    train_idx, val_idx = torch.utils.data.random_split(range(n), [n - val, val],
                                                       generator=torch.Generator().manual_seed(seed))
    return list(train_idx.indices), list(val_idx.indices)


def make_splits(target: Target, train_transform: Callable, eval_transform: Callable, *, val_fraction: float,
                val_max: int, max_train: int | None = None, max_eval: int | None = None) -> Splits:
    """Train (augmented), validation and test splits; ``max_*`` cap them for quick runs."""
    train_raw, test_raw = target.open("train"), target.open("test")
    train_idx, val_idx = validation_split(len(train_raw), val_fraction, val_max)
    test_idx = list(range(len(test_raw)))
    if max_eval is not None and max_eval < len(test_idx):
        test_idx = sorted(torch.randperm(len(test_idx), generator=torch.Generator().manual_seed(0))[:max_eval].tolist())
    fix = target.reader.fix
    return Splits(Transformed(train_raw, train_idx[:max_train], train_transform, fix),
                  Transformed(train_raw, val_idx[:max_eval], eval_transform, fix),
                  Transformed(test_raw, test_idx, eval_transform, fix))


def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


def transforms_for(model: torch.nn.Module) -> tuple[Callable, Callable]:
    """(train, eval) transforms: train is RandomResizedCrop(scale 0.5-1, bicubic) + flip, eval is open_clip's."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision import transforms as T

    cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    crop = T.RandomResizedCrop(cfg.size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    train = T.Compose([_to_rgb, crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    return train, image_transform_v2(cfg, is_train=False)
