"""Plain references: the base model with its zero-shot head, a linear probe, and LoRA at a matched budget.

``Frozen`` (zero-shot) and ``LoRA`` are ``Materialized`` models, so Stage 2's loop and evaluation run
them unchanged. The linear probe trains the head instead of the model, on features of the frozen base
computed once. ``patch_dropout`` is the test-time input degradation of the robustness study.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from axis_stream.core.layout import as_matrix
from axis_stream.experiments.baselines.functional import Materialized


class Frozen(Materialized):
    """The base model as it is (the zero-shot reference): nothing trains, nothing is materialised."""

    def weights(self) -> dict[str, Tensor]:
        return {}


def lora_rank_for_budget(budget: int, shapes: Sequence[tuple[int, int]]) -> int:
    """The LoRA rank r >= 1 whose ``r * sum(m + n)`` is closest to ``budget`` (ties: the smaller r)."""
    per_rank = sum(m + n for m, n in shapes)
    if per_rank == 0:
        raise ValueError("LoRA needs at least one matrix")
    low = max(1, math.floor(budget / per_rank))
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - budget), r))


class LoRA(Materialized):
    """LoRA (Hu et al. 2022) on the named matrices: ``W = W_0 + (alpha / r) * B A``, B at 0, A Kaiming-uniform.

    ``names`` are parameter names of ``base`` (conv weights are handled in matrix form); trainable
    values: ``r * (m + n)`` per matrix. The start is exactly the base model.
    """

    def __init__(self, base: nn.Module, names: Sequence[str], rank: int, *, alpha: float | None = None,
                 seed: int = 0):
        super().__init__(base)
        if rank < 1 or not names:
            raise ValueError(f"LoRA needs rank >= 1 and at least one matrix, got rank {rank}, {len(names)} matrices")
        self.names = list(names)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for name in self.names:
            w = as_matrix(base.get_parameter(name))
            m, n = w.shape
            a = torch.empty(rank, n)
            bound = 1 / math.sqrt(n)  # nn.init.kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft do
            a.uniform_(-bound, bound, generator=gen)
            self.A.append(nn.Parameter(a.to(w)))
            self.B.append(nn.Parameter(torch.zeros(m, rank, dtype=w.dtype, device=w.device)))

    def weights(self) -> dict[str, Tensor]:
        out = {}
        for name, a, b in zip(self.names, self.A, self.B):
            w = self.base.get_parameter(name)
            out[name] = w + (self.scale * (b @ a)).reshape(w.shape)
        return out


# --- the linear probe ---

@torch.no_grad()
def features(model: Materialized, data: Dataset, batch_size: int, device: torch.device,
             num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Image features of ``model`` for every sample of ``data`` (in order) and their labels."""
    model.eval()
    weights = model.weights()
    feats, labels = [], []
    for images, y in DataLoader(data, batch_size=batch_size, num_workers=num_workers):
        feats.append(model.call("encode_image", images.to(device), weights=weights).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def accuracy(feats: Tensor, labels: Tensor, head: Tensor) -> float:
    pred = (F.normalize(feats, dim=-1) @ head.mT).argmax(dim=-1)
    return float((pred == labels).float().mean()) if len(labels) else 0.0


def linear_probe(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], head: Tensor, *, epochs: int,
                 lr: float, weight_decay: float, batch_size: int, grad_clip: float, seed: int) -> tuple[Tensor, float]:
    """Train the head ``[C, D]`` on frozen, normalised features with Stage 2's optimiser and schedule.

    Starts from the zero-shot head, runs AdamW with a cosine schedule and clipping for ``epochs``
    passes over ``train``, and returns the head with the best validation accuracy and that accuracy.
    """
    x, y = F.normalize(train[0], dim=-1), train[1]
    weight = nn.Parameter(head.detach().clone().float())
    steps = math.ceil(len(y) / batch_size) * epochs
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    best, best_val = weight.detach().clone(), accuracy(*val, weight.detach())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            idx = idx.to(x.device)
            loss = F.cross_entropy(x[idx] @ weight.mT, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([weight], grad_clip)
            optimizer.step()
            scheduler.step()
        acc = accuracy(*val, weight.detach())
        if acc > best_val:
            best, best_val = weight.detach().clone(), acc
    return best, best_val


# --- test-time patch dropout (robustness study) ---

class SeededPatchDropout(nn.Module):
    """Drops a fraction ``prob`` of the patch tokens (never the class token) in eval mode too.

    The kept patches are drawn from a generator seeded once, batch after batch, so every method
    evaluated on the same data in the same order sees the same masked patches.
    """

    def __init__(self, prob: float, seed: int):
        super().__init__()
        if not 0 <= prob < 1:
            raise ValueError(f"patch dropout must be in [0, 1), got {prob!r}")
        self.prob = prob
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        if self.prob == 0:
            return x
        cls, patches = x[:, :1], x[:, 1:]
        batch, tokens = patches.shape[:2]
        keep = max(1, int(tokens * (1 - self.prob)))
        idx = torch.rand(batch, tokens, generator=self.generator).topk(keep, dim=-1).indices.to(x.device)
        kept = patches[torch.arange(batch, device=x.device)[:, None], idx]
        return torch.cat([cls, kept], dim=1)


@contextmanager
def patch_dropout(base: nn.Module, prob: float, seed: int = 0) -> Iterator[None]:
    """Within the block, ``base``'s image tower drops ``prob`` of its patches at test time (seeded)."""
    visual = getattr(base, "visual", None)
    if visual is None or not hasattr(visual, "patch_dropout"):
        raise ValueError("test-time patch dropout needs an open_clip VisionTransformer image tower")
    original = visual.patch_dropout
    visual.patch_dropout = SeededPatchDropout(prob, seed)
    try:
        yield
    finally:
        visual.patch_dropout = original
