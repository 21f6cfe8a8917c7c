"""Shared fixtures: a tiny open_clip CLIP built in code, its weights file, and checkpoints made from it
(with ``axis_stream.testing.finetuned_like``, which the benchmarks use too)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: the tests start daemons and job processes that share
# the CI machine's two cores, and spinning waits slow small SVDs there 10-100x. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from axis_stream import config  # noqa: E402
from axis_stream.store import models  # noqa: E402
from axis_stream.testing import finetuned_like  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> tuple[config.BaseConfig, dict[str, torch.Tensor]]:
    """The tiny CLIP's config (weights saved to a local safetensors file) and its state dict."""
    root = tmp_path_factory.mktemp("tiny-base")
    cfg_path = root / "axis-tiny.json"
    cfg_path.write_text(json.dumps(models.TINY_CLIP))
    torch.manual_seed(0)
    model = models.create_base(config.BaseConfig(model="axis-tiny", pretrained="", model_config=cfg_path))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    weights = root / "axis-tiny-base.safetensors"
    save_file(state, weights)
    return config.BaseConfig(model="axis-tiny", pretrained=str(weights), model_config=cfg_path), state


@pytest.fixture
def make_checkpoint(tiny_base, tmp_path):
    """``make_checkpoint(seed, name=None, **kw) -> Path``: a fine-tuned-like safetensors checkpoint."""
    _, base = tiny_base

    def make(seed: int, name: str | None = None, directory: Path | None = None, **kw) -> Path:
        path = (directory or tmp_path) / (name or f"ckpt-{seed}.safetensors")
        save_file(finetuned_like(base, seed, **kw), path)
        return path

    return make
