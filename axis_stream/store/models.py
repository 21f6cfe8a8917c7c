"""The base model: building it with open_clip, naming its matrices, and fingerprinting its weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from axis_stream.config import BaseConfig, Config

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""A CLIP small enough to fine-tune on a CPU in seconds, for the quickstart and the tests."""


def register_model_config(path: str | Path) -> str:
    """Make an open_clip model config JSON available under its file stem; returns that name."""
    import open_clip

    path = Path(path)
    json.loads(path.read_text())  # a clear JSON error before open_clip's
    open_clip.add_model_config(path)
    return path.stem


def create_base(cfg: BaseConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Build the configured open_clip model with its pretrained weights (a tag or a local file)."""
    import open_clip

    if cfg.model_config is not None:
        register_model_config(cfg.model_config)
    return open_clip.create_model(cfg.model, pretrained=cfg.pretrained or None, device=device)


def weights_sha256(state_dict: Mapping[str, Tensor]) -> str:
    """Fingerprint of a state dict: names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_base(cfg: Config) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The configured base model's state dict and its identity (name, pretrained; sha256 added on create)."""
    model = create_base(cfg.base)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return state, {"name": cfg.base.model, "pretrained": cfg.base.pretrained}
