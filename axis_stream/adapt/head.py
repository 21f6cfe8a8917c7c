"""The frozen zero-shot classification head (SPEC section 5, as in aTLAS and task_vectors).

Per class: fill every template with the class name, encode with the base model's text tower,
L2-normalise, average, renormalise, and scale by ``logit_scale.exp()``. Logits are the normalised
image features times the head, without bias. Class names and templates for the paper's 22 datasets
ship as ``axis_stream/data/targets.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from axis_stream.adapt.model import AdaptError


@lru_cache(maxsize=1)
def packaged_texts() -> dict[str, dict]:
    """``{key: {"name", "classnames", "templates"}}`` for the 22 datasets shipped with the package."""
    return json.loads(resources.files("axis_stream").joinpath("data/targets.json").read_text(encoding="utf-8"))


def check_texts(classnames: Sequence[str], templates: Sequence[str], source: str) -> tuple[list[str], list[str]]:
    """Class names and templates as lists of strings, or an ``AdaptError`` naming ``source`` and the problem."""
    classnames, templates = list(classnames), list(templates)
    if len(classnames) < 2 or not all(isinstance(c, str) and c.strip() for c in classnames):
        raise AdaptError(f"{source}: class names must be at least two non-empty strings")
    if len(set(classnames)) != len(classnames):
        dup = next(c for c in classnames if classnames.count(c) > 1)
        raise AdaptError(f"{source}: class name {dup!r} appears more than once")
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise AdaptError(f"{source}: templates must be strings with a '{{}}' where the class name goes")
    return classnames, templates


@torch.no_grad()
def zero_shot_head(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], classnames: Sequence[str],
                   templates: Sequence[str], *, device: torch.device | str = "cpu",
                   batch_size: int = 256) -> Tensor:
    """The head ``[classes, embed_dim]`` built with ``model.encode_text`` (a CLIP's text tower), frozen."""
    was_training = model.training
    model.eval()
    texts = [t.replace("{}", c) for c in classnames for t in templates]
    feats = torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float()
                       for i in range(0, len(texts), batch_size)])
    per_class = F.normalize(feats, dim=-1).reshape(len(classnames), len(templates), -1).mean(dim=1)
    model.train(was_training)
    return (F.normalize(per_class, dim=-1) * model.logit_scale.exp().float()).detach()


def logits(image_features: Tensor, head: Tensor) -> Tensor:
    """Class scores: normalised image features times the head (no bias)."""
    return F.normalize(image_features.float(), dim=-1) @ head.mT
