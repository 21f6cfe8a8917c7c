"""aTLAS (Zhang et al. 2024, arXiv:2407.02129): learn a coefficient per source, tensor and partition.

The adapted weights are ``theta = theta_pre + sum_i sum_p c[i, l, p] * (mask_p * tau_i[l])`` for
every parameter tensor ``l`` of the wrapped module. 2-D tensors are split into ``P`` seeded random
partitions of their elements (one partition index per element, shared by all tensors of the same
shape, as in the reference code); every other tensor gets one coefficient per source. The
coefficients start at 0, so the untrained model is exactly the base model. Every source task vector
stays resident for the whole training, as in the original: that is the memory the comparison with
AXIS measures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from axis_stream.experiments.baselines.functional import Materialized


def trainable_count(sources: int, partitions: int, n_2d: int, n_other: int) -> int:
    """aTLAS's trainable values: ``S * (P * n_2d + n_other)`` coefficients."""
    return sources * (partitions * n_2d + n_other)


def p_for_budget(budget: int, sources: int, n_2d: int, n_other: int) -> int:
    """The partition count P >= 1 whose ``trainable_count`` is closest to ``budget`` (ties: the smaller P)."""
    if sources < 1 or n_2d < 1:
        raise ValueError(f"p_for_budget needs sources >= 1 and n_2d >= 1, got {sources}, {n_2d}")
    exact = (budget / sources - n_other) / n_2d
    candidates = {max(1, math.floor(exact)), max(1, math.ceil(exact))}
    return min(candidates, key=lambda p: (abs(trainable_count(sources, p, n_2d, n_other) - budget), p))


def partition_index(shape: Sequence[int], partitions: int, seed: int) -> Tensor:
    """The seeded partition of a tensor's elements: for each element, the index of its partition."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(partitions, tuple(shape), generator=gen, dtype=torch.int64).to(torch.int32)


def scaled_tensors(base: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]], scope: str = "visual."
                   ) -> tuple[list[str], list[str]]:
    """The parameters aTLAS scales, as ``(2-D names, other names)``: those under ``scope`` that some source changes."""
    names_2d, names_other = [], []
    for name, param in base.named_parameters():
        if name.startswith(scope) and any(name in tv and bool(tv[name].any()) for tv in task_vectors):
            (names_2d if param.dim() == 2 else names_other).append(name)
    return names_2d, names_other


class ATLAS(Materialized):
    """``base`` with weights ``theta_pre + sum_i sum_p c[i, l, p] * (mask_p * tau_i[l])`` (aTLAS).

    ``task_vectors``: per source, a mapping ``parameter name -> theta_i - theta_pre`` in the base's
    state-dict names (a missing name is a zero delta); ``partitions``: P. Only parameters whose name
    starts with ``scope`` (default: the image tower, as aTLAS's image encoder) and that some source
    changes get coefficients. Takes ownership of ``base`` and freezes it. The trainable parameters
    are ``coef_2d [S, n_2d, P]`` and ``coef_other [S, n_other]``; the source vectors are stacked per
    tensor into buffers of ``dtype`` (default: the parameter's dtype).
    """

    def __init__(self, base: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]], partitions: int,
                 *, scope: str = "visual.", seed: int = 0, dtype: torch.dtype | None = None):
        super().__init__(base)
        if not task_vectors:
            raise ValueError("aTLAS needs at least one source task vector")
        if partitions < 1:
            raise ValueError(f"aTLAS needs partitions >= 1, got {partitions}")
        self.partitions = partitions
        self.names_2d, self.names_other = scaled_tensors(base, task_vectors, scope)
        if not self.names_2d and not self.names_other:
            raise ValueError(f"no parameter under {scope!r} is changed by any source task vector")
        self._buffer: dict[str, str] = {}
        self._mask: dict[str, str] = {}
        for name in self.names_2d + self.names_other:
            param = base.get_parameter(name)
            stacked = torch.stack([tv[name].to(param.device).reshape(param.shape) if name in tv
                                   else torch.zeros_like(param) for tv in task_vectors])
            self._buffer[name] = f"tv_{len(self._buffer)}"
            self.register_buffer(self._buffer[name], stacked.to(dtype or param.dtype), persistent=False)
            if param.dim() == 2:
                key = "mask_" + "x".join(map(str, param.shape))
                if not hasattr(self, key):
                    self.register_buffer(key, partition_index(param.shape, partitions, seed).to(param.device),
                                         persistent=False)
                self._mask[name] = key
        sources = len(task_vectors)
        device = next(iter(base.parameters())).device
        self.coef_2d = nn.Parameter(torch.zeros(sources, len(self.names_2d), partitions, device=device))
        self.coef_other = nn.Parameter(torch.zeros(sources, len(self.names_other), device=device))

    @property
    def sources(self) -> int:
        return int(self.coef_2d.shape[0])

    def trainable_count(self) -> int:
        """The number of trainable coefficients, ``trainable_count(S, P, n_2d, n_other)``."""
        return trainable_count(self.sources, self.partitions, len(self.names_2d), len(self.names_other))

    def weights(self) -> dict[str, Tensor]:
        """The materialised weights of every scaled tensor, differentiable in the coefficients."""
        out = {}
        for j, name in enumerate(self.names_2d):
            tv = getattr(self, self._buffer[name])
            mask = getattr(self, self._mask[name])
            delta = sum(tv[i] * self.coef_2d[i, j].to(tv.dtype)[mask] for i in range(self.sources))
            out[name] = self.base.get_parameter(name) + delta
        for j, name in enumerate(self.names_other):
            tv = getattr(self, self._buffer[name])
            coef = self.coef_other[:, j].to(tv.dtype).reshape(-1, *[1] * (tv.dim() - 1))
            out[name] = self.base.get_parameter(name) + (tv * coef).sum(0)
        return out
