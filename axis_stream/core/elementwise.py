"""Elementwise merges of task vectors (any tensor shape): task arithmetic, averaging, TIES, DARE.

Pure functions of stacked tensors; ``merges`` turns them into Stage 1 bases and ``continual``
applies them one source at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from axis_stream.core import svd


def stack(deltas: Sequence[Tensor]) -> Tensor:
    if len(deltas) == 0:
        raise ValueError("a merge needs at least one task vector")
    shape = deltas[0].shape
    for i, d in enumerate(deltas):
        if d.shape != shape:
            raise ValueError(f"task vector {i} has shape {tuple(d.shape)}, expected {tuple(shape)}")
    return torch.stack([d.to(svd.work_dtype(d)) for d in deltas])


def keep_top_magnitude(t: Tensor, density: float) -> Tensor:
    """``t`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    keep = int(density * t.numel() + 1e-9)
    out = torch.zeros_like(t)
    if keep > 0:
        idx = t.abs().flatten().topk(keep).indices
        out.view(-1)[idx] = t.reshape(-1)[idx]
    return out


def task_arithmetic(deltas: Sequence[Tensor], lam: float = 0.3) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``lam * sum_i delta_i``."""
    return lam * stack(deltas).sum(0)


def average(deltas: Sequence[Tensor]) -> Tensor:
    """Simple averaging (model soup / Wortsman et al. 2022): the mean of the task vectors."""
    return stack(deltas).mean(0)


def ties(deltas: Sequence[Tensor], density: float = 0.2, lam: float = 1.0, disjoint: str = "mean") -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean (or sum), scale by ``lam``.

    Trim keeps each task's top ``density`` fraction of entries by magnitude (per tensor); the
    elected sign of an entry is the sign of the sum of the trimmed values (a zero sum takes the
    tensor's majority sign, as in the reference code); the merged entry is the mean (``disjoint =
    "sum"``: the sum) of the trimmed values that agree with the elected sign (0 where none does).
    """
    if disjoint not in ("mean", "sum"):
        raise ValueError(f"TIES disjoint merge must be 'mean' or 'sum', got {disjoint!r}")
    trimmed = torch.stack([keep_top_magnitude(d, density) for d in stack(deltas)])
    elected = torch.sign(trimmed.sum(0))
    majority = torch.sign(elected.sum())
    elected[elected == 0] = majority if majority != 0 else 1
    agree = torch.where(elected > 0, trimmed > 0, trimmed < 0)
    total = (trimmed * agree).sum(0)
    return lam * (total / agree.sum(0).clamp_min(1) if disjoint == "mean" else total)


def dare_drop(deltas: Sequence[Tensor], p: float, seed: int) -> list[Tensor]:
    """DARE's drop-and-rescale (Yu et al. 2024): zero each entry with probability ``p``, scale the rest by 1/(1-p).

    Source i's mask is the i-th ``torch.rand(shape, dtype=torch.float64)`` draw of a generator seeded with ``seed``;
    an entry is kept where its draw is ``>= p``.
    """
    if not 0 <= p < 1:
        raise ValueError(f"drop probability must be in [0, 1), got {p!r}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for d in stack(deltas):
        keep = torch.rand(d.shape, generator=gen, dtype=torch.float64) >= p
        out.append(torch.where(keep, d / (1 - p), torch.zeros_like(d)))
    return out


def dare(deltas: Sequence[Tensor], p: float = 0.5, combine: str = "average", seed: int = 0,
         density: float = 1.0, lam: float = 1.0) -> Tensor:
    """DARE: drop and rescale each task vector, then average them or TIES-merge them.

    ``density`` and ``lam`` are the TIES parameters (used only with ``combine="ties"``; density 1.0
    means DARE's own sparsity replaces the TIES trim).
    """
    dropped = dare_drop(deltas, p, seed)
    if combine == "average":
        return average(dropped)
    if combine == "ties":
        return ties(dropped, density, lam)
    raise ValueError(f"DARE combine must be 'average' or 'ties', got {combine!r}")
