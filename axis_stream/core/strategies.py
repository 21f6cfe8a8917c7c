"""Fold strategies: how a persistent basis takes its sources one task matrix at a time (``[basis] strategy``).

Every strategy is a small class with one interface, registered by name in ``FOLD_STRATEGIES``:

- ``fold(state, delta, k, count, params)``: one matrix's state in, its next task matrix in, the new
  state out (``state`` None: nothing stored yet, an all-zero state; ``delta`` None: the source left
  the matrix unchanged, an all-zero task matrix; ``count``: the sources folded before; for ``axis``
  ``delta`` may also be another basis's ``Factors``, a rank-K source);
- ``fold_vector``: the same for a non-matrix parameter (for ``axis``, ``weight`` > 1: the mean of
  that many sources);
- ``state_bytes(shape, k)``: the most one matrix's state takes (float32), whatever the source count;
- ``fold_bytes_per_entry``: the working memory of one matrix's fold (as ``store.folding`` runs it, its
  task matrix included) per entry of the matrix, what ``store.threads.bounded_map`` keeps the folds in
  flight under ``memory_budget`` with; measured by ``benchmarks/fold_budget.py``, with headroom;
- ``merged(states, scalars, params)``: the whole model's merged delta, what ``materialize`` and
  ``export --merged`` add to the base;
- ``stage2(states, scalars, ks, params)``: the ``Factors`` Stage 2 trains (rank ``ks[name]``) and the
  merged deltas of the other parameters.

``axis`` is AXIS's streaming top-K fold (``stage1.fold``): a matrix's state is its factors of rank
<= K, ``4 (m + n + 1) K`` bytes, and Stage 2 trains them; other parameters keep their running mean.
``opcm``, ``continual-ta``, ``continual-ties`` and ``running-average`` are ``core.continual``'s rules
tensor by tensor: the state is one dense tensor of the parameter's shape (``4 m n`` bytes per
matrix) plus, for OPCM, the model-level mean norm of the sources (``Scalars``); Stage 2 trains the
top-K truncated SVD of each merged matrix, as ``merges.build_basis`` does for the batch merges.

Pure tensors in and out: no files, no logging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from axis_stream.core import continual, merges, stage1
from axis_stream.core.registry import Registry, with_defaults
from axis_stream.core.stage1 import Factors

State = Factors | Tensor
STATE_BYTES_PER_VALUE = 4        # states are stored in float32
DENSE = "dense"                  # ``FoldStats.svd_method`` of a dense strategy's fold: no SVD, no truncation
UNCHANGED = "unchanged"          # ... of a matrix the source left as it was (nothing folded)


@dataclass(frozen=True)
class Scalars:
    """The model-level part of a basis's state: how many sources it holds and the mean of their
    whole-model task-vector norms (OPCM's target norm; kept for every strategy, used by OPCM)."""

    count: int = 0
    mean_norm: float = 0.0

    def after(self, norm: float) -> Scalars:
        """The scalars once one more source, of whole-model norm ``norm``, is folded."""
        return Scalars(self.count + 1, continual.next_mean_norm(self.mean_norm, self.count, norm))


class FoldStrategy(ABC):
    """One way of folding a stream of task vectors into a bounded per-parameter state."""

    name: str
    paper: str
    defaults: Mapping[str, Any]
    dense: bool                  # True: a matrix's state is one dense tensor of its shape
    fold_bytes_per_entry: int    # one matrix's fold's working memory per entry (see the module's docstring)

    def check(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` over the defaults; an unknown name is a ValueError naming it and the known ones."""
        return with_defaults("fold strategy", self.name, self.defaults, params)

    @abstractmethod
    def fold(self, state: State | None, delta: State | None, k: int, count: int, params: Mapping[str, Any],
             *, svd: str = "exact", tol: float = 1e-4, seed: int = 0) -> State | None:
        """One matrix's next state (``svd``, ``tol``, ``seed``: the truncated SVD's, where there is one)."""

    @abstractmethod
    def fold_vector(self, state: Tensor | None, delta: Tensor | None, count: int, shape: tuple[int, ...],
                    params: Mapping[str, Any], weight: int = 1) -> Tensor:
        """One non-matrix parameter's next state (it may be ``state`` updated in place)."""

    @abstractmethod
    def state_bytes(self, shape: tuple[int, int], k: int) -> int:
        """The largest state of an ``m x n`` matrix with the basis's K, in bytes."""

    @abstractmethod
    def merged(self, states: Mapping[str, State], scalars: Scalars, params: Mapping[str, Any]) -> dict[str, Tensor]:
        """The merged delta of every tensor in ``states`` (matrices in matrix form)."""

    @abstractmethod
    def stage2(self, states: Mapping[str, State], scalars: Scalars, ks: Mapping[str, int],
               params: Mapping[str, Any]) -> tuple[dict[str, Factors], dict[str, Tensor]]:
        """``(factors, means)`` as Stage 2 takes them: the matrices ``ks`` names (rank at most
        ``ks[name]``), and the other tensors' merged deltas."""


class AxisStrategy(FoldStrategy):
    """AXIS (paper A.11): a matrix keeps the top-K components of the union of its basis and the new matrix."""

    name = "axis"
    paper = "AXIS, streaming Stage 1 (paper section A.11)"
    defaults: Mapping[str, Any] = {}
    dense = False
    fold_bytes_per_entry = 28    # measured at most 21: the task matrix, the SVD of [U s | delta] (exact or not)

    def fold(self, state, delta, k, count, params, *, svd="exact", tol=1e-4, seed=0):
        current = state if state is not None and state.rank else None
        if delta is None:
            return state
        if isinstance(delta, Factors):
            return stage1.fold_factors(current, delta, k)
        return stage1.fold(current, delta, k, svd=svd, tol=tol, seed=seed)

    def fold_vector(self, state, delta, count, shape, params, weight=1):
        if state is None:
            state = torch.zeros(shape, dtype=torch.float32 if delta is None else delta.dtype)
        stage1.update_mean_inplace(state, count, delta, weight)
        return state

    def state_bytes(self, shape, k):
        return STATE_BYTES_PER_VALUE * (shape[0] + shape[1] + 1) * k

    def merged(self, states, scalars, params):
        return {name: s.to_dense() if isinstance(s, Factors) else s for name, s in states.items()}

    def stage2(self, states, scalars, ks, params):
        return ({name: states[name] for name in ks},
                {name: s for name, s in states.items() if name not in ks})


class ContinualStrategy(FoldStrategy):
    """A ``core.continual`` rule applied tensor by tensor: a dense state of each parameter's shape."""

    dense = True

    def __init__(self, rule: str, fold_bytes_per_entry: int):
        self.rule = continual.RULES[rule]
        self.name, self.paper, self.defaults = rule, self.rule.paper, dict(self.rule.defaults)
        self.fold_bytes_per_entry = fold_bytes_per_entry

    def _step(self, state: Tensor | None, delta: Tensor | None, is_matrix: bool, count: int,
              shape: tuple[int, ...], params: Mapping[str, Any]) -> Tensor:
        """The rule's update; a missing state after the first source, or a missing delta, is all zeros."""
        like = delta if delta is not None else state
        dtype = like.dtype if like is not None else torch.float32
        if count and state is None:
            state = torch.zeros(shape, dtype=dtype)
        if delta is None:
            delta = torch.zeros(shape, dtype=dtype)
        return self.rule.fold(state if count else None, delta, is_matrix, count, **self.check(params))

    def fold(self, state, delta, k, count, params, *, svd="exact", tol=1e-4, seed=0):
        if isinstance(delta, Factors):
            raise ValueError(f"fold strategy {self.name!r} folds task matrices, not another basis's factors")
        if state is None and delta is None:   # every rule keeps an all-zero state at zero
            return None
        return self._step(state, delta, True, count, tuple((delta if delta is not None else state).shape), params)

    def fold_vector(self, state, delta, count, shape, params, weight=1):
        if weight != 1:
            raise ValueError(f"fold strategy {self.name!r} folds one source at a time, not a mean of {weight}")
        return self._step(state, delta, False, count, shape, params)

    def state_bytes(self, shape, k):
        return STATE_BYTES_PER_VALUE * shape[0] * shape[1]

    def merged(self, states, scalars, params):
        stream = continual.StreamState(dict(states), scalars.count, scalars.mean_norm)
        return continual.merged(stream, self.name, **params)

    def stage2(self, states, scalars, ks, params):
        tensors = self.merged(states, scalars, params)
        factors = {name: merges.top_k_factors(tensors[name], k) for name, k in ks.items() if name in tensors}
        return factors, {name: t for name, t in tensors.items() if name not in ks and bool(t.any())}


FOLD_STRATEGIES: Registry[FoldStrategy] = Registry("fold strategy")
FOLD_STRATEGIES.add("axis", AxisStrategy())
# fold_bytes_per_entry, about 1.3x the most measured: OPCM 43 (the full SVD of the running sum, U m x m
# and V n x n), continual TIES 46 (its float64 stack and trim), the running average 28, continual TA 24
# (each with the float64 copy of the new state that folding's energy takes, and the allocator's slack)
for _rule, _bytes in (("opcm", 56), ("continual-ta", 32), ("continual-ties", 60), ("running-average", 40)):
    FOLD_STRATEGIES.add(_rule, ContinualStrategy(_rule, _bytes))
