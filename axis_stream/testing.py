"""Helpers shared by the tests and the benchmarks: fine-tune-like checkpoints, a daemon config, and a
bounded polling loop.

A leaf module (torch and safetensors only), so that tests, benchmarks and the quickstart build their
inputs and wait for their conditions the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor


def finetuned_like(base: Mapping[str, Tensor], seed: int, scale: float = 0.02, rank: int = 4,
                   prefix: str = "visual.") -> dict[str, Tensor]:
    """A checkpoint that looks fine-tuned: low-rank-plus-noise changes to every float tensor under ``prefix``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        t = t.clone()
        if name.startswith(prefix) and t.is_floating_point():
            if t.dim() == 2:
                m, n = t.shape
                r = min(rank, m, n)
                low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r
                t += scale * (low + 0.1 * torch.randn(m, n, generator=g))
            else:
                t += scale * torch.randn(t.shape, generator=g)
        out[name] = t.contiguous()
    return out


def write_checkpoints(base: Mapping[str, Tensor], count: int, folder: Path, first_seed: int = 0,
                      **kw: Any) -> list[Path]:
    """``count`` fine-tune-like safetensors checkpoints ``ckpt-NNN.safetensors`` (seeds from ``first_seed``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(first_seed, first_seed + count):
        paths.append(folder / f"ckpt-{seed:03d}.safetensors")
        save_file(finetuned_like(base, seed, **kw), paths[-1])
    return paths


def daemon_config(path: Path, base: Mapping[str, Any], watch: Mapping[str, Any], *, metrics: str = "",
                  basis: Mapping[str, Any] | None = None) -> Path:
    """Write a daemon config to ``path``: state and watch folders beside it, the ``[base]`` table,
    an exact-SVD basis (plus ``basis``), the ``[watch]`` settings and the metrics address ("" = off)."""
    def table(name: str, values: Mapping[str, Any]) -> str:
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}\n"
                                      for k, v in values.items())

    root = path.parent
    path.write_text("".join([table("paths", {"state_dir": root / "state", "watch_dir": root / "incoming"}),
                             table("base", base), table("basis", {"svd": "exact", **(basis or {})}),
                             table("watch", watch), table("metrics", {"address": metrics})]))
    return path


def wait_until(check: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.05,
               alive: Callable[[], str | None] | None = None,
               error: Callable[[str], BaseException] = TimeoutError) -> Any:
    """Poll ``check()`` until it returns something truthy and return that; ``error(message)`` after
    ``timeout`` s, or at once when ``alive()`` returns a message (the process being waited on died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        gone = alive() if alive is not None else None
        if gone:
            raise error(f"{gone} while waiting for {what}")
        if time.monotonic() >= deadline:
            raise error(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)
