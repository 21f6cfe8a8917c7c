"""One small training recipe for the suites: pretraining the vision base and fine-tuning the sources.

A model here is any module mapping a batch of inputs (strings or uint8 images) to L2-normalised
features; a head is a ``[C, D]`` matrix of normalised class vectors; logits are
``scale * features @ head.T`` (CLIP's zero-shot classifier). Every result is cached as a
safetensors state dict next to a JSON record of the settings that made it, so a re-run only
evaluates.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from axis_stream.adapt.loop import top1
from axis_stream.experiments.suites import Task, take
from axis_stream.store.atomic import atomic_write, atomic_write_json


@dataclass(frozen=True)
class Recipe:
    """AdamW, linear warm-up then cosine decay, gradient clipping, fixed number of steps."""

    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 32
    weight_decay: float = 0.1
    warmup: float = 0.1
    grad_clip: float = 1.0
    scale: float = 100.0     # logit scale, CLIP's exp(logit_scale) by default
    seed: int = 0


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterable[Tensor]:
    """``steps`` index batches drawn by reshuffling ``range(n)`` each epoch."""
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos:pos + min(batch_size, n)]
        pos += batch_size


def schedule(step: int, recipe: Recipe) -> float:
    warm = max(1, int(recipe.steps * recipe.warmup))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, recipe.steps - warm)))


def fit(forward: Callable[[object], Tensor], params: list[Tensor], head: Tensor, task: Task, recipe: Recipe,
        log: Callable[[str], None] | None = None) -> list[float]:
    """Train ``params`` to minimise cross-entropy of ``scale * forward(x) @ head.T``; returns the losses.

    ``head`` may itself be in ``params`` (pretraining learns it; the suites' heads are frozen).
    """
    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, recipe))
    losses = []
    t0 = time.monotonic()
    for step, idx in enumerate(batches(len(task.train_y), recipe.batch_size, recipe.steps, g)):
        feats = forward(take(task.train_x, idx))
        logits = recipe.scale * feats @ nn.functional.normalize(head, dim=-1).to(feats.device).T
        loss = nn.functional.cross_entropy(logits, task.train_y[idx].to(feats.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, recipe.steps // 5) == 0:
            log(f"  step {step + 1}/{recipe.steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f} "
                f"({time.monotonic() - t0:.0f}s)")
    return losses


@torch.no_grad()
def accuracy(forward: Callable[[object], Tensor], head: Tensor, x, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of the cosine classifier ``forward(x) @ head.T`` (evaluation mode is the caller's);
    Stage 2's own counting (``adapt.loop.top1``), for a plain module without Stage 2's ``weights()``."""
    batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size))

    def scores(inputs: object) -> Tensor:
        feats = forward(inputs)
        return feats @ head.to(feats.device).T

    return top1(batches, scores)


def finetune(module: nn.Module, head: Tensor, task: Task, recipe: Recipe,
             log: Callable[[str], None] | None = None) -> dict[str, Tensor]:
    """Full fine-tune of every floating-point parameter of ``module`` with a frozen head; returns its state dict."""
    module.train()
    params = [p for p in module.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    fit(module, params, head.detach(), task, recipe, log)
    module.eval()
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def cached(path: Path, settings: Mapping, build: Callable[[], dict[str, Tensor]],
           log: Callable[[str], None] | None = None) -> dict[str, Tensor]:
    """The state dict at ``path`` if it was made with exactly ``settings``; else ``build()`` it and save both.

    ``settings`` goes to ``<path>.json``; both files are written crash-safely, the JSON last, so a
    crash mid-way only means a rebuild.
    """
    path = Path(path)
    record = path.with_suffix(".json")
    want = json.loads(json.dumps(settings, sort_keys=True, default=str))
    if path.exists() and record.exists():
        try:
            if json.loads(record.read_text()).get("settings") == want:
                return load_file(path)
        except (OSError, ValueError):
            pass
    if log:
        log(f"building {path.name} (not cached)")
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    state = build()
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in state.items()}, p))
    atomic_write_json(record, {"settings": want, "seconds": round(time.monotonic() - t0, 1)})
    return state

