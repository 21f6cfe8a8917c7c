"""Continual merging: a bounded state per parameter, updated one task vector at a time.

The streaming peers of AXIS's fold, as FusionBench implements them (``fusion_bench/method/opcm/``),
written here per tensor. Each keeps, per parameter, one tensor of the parameter's shape (a running
sum, the merged task vector so far, or a mean) plus, for OPCM, two model-level scalars; nothing
grows with the number of sources.

- ``continual-ta`` (task arithmetic, Ilharco et al. 2023): ``tau_m(t) = lam * sum_i tau_i``.
- ``running-average`` (weight averaging): ``tau_m(t) = mean_i tau_i``.
- ``continual-ties`` (TIES, Yadav et al. 2023, merged pairwise): ``tau_m(1) = lam * tau_1``,
  ``tau_m(t) = tau_m(t-1) + lam * TIES_sum(tau_m(t-1), tau_t)``.
- ``opcm`` (Tang et al. 2025, arXiv:2501.09522): the new matrix is projected into the full SVD basis
  of the running sum ``S`` (``P = U^T tau V``), its diagonal and its top-left ``r x r`` block (``r``:
  where the cumulative share of ``S``'s singular values first exceeds ``alpha``) are zeroed, and
  ``U P V^T`` is added to ``S``; other parameters add ``tau`` as it is. The merged delta is ``S``
  rescaled to the mean norm of the sources' whole task vectors: ``tau_m = S * mean_i ||tau_i|| / ||S||``
  (norms over the whole model). FusionBench stores ``S`` already rescaled and divides by its
  ``lambda_t``; the singular vectors, ``r`` and the result are the same.

Pure tensors in and out: no files, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from axis_stream.core import elementwise
from axis_stream.core.registry import Registry, with_defaults
from axis_stream.core.svd import work_dtype


@dataclass
class StreamState:
    """One continual merge in progress: per-tensor states and the model-level scalars."""

    tensors: dict[str, Tensor]
    count: int = 0              # task vectors folded
    mean_norm: float = 0.0      # mean of their whole-model norms (OPCM's target norm)


def opcm_clean(running: Tensor, delta: Tensor, alpha: float) -> Tensor:
    """``delta`` with what lies along ``running``'s dominant singular directions removed (OPCM's projection)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"OPCM's alpha must be in [0, 1], got {alpha!r}")
    u, s, vh = torch.linalg.svd(running, full_matrices=True)
    share = s.cumsum(0) / s.sum() if float(s.sum()) > 0 else torch.ones_like(s)
    split = int((share > alpha).to(torch.int64).argmax())
    projected = u.mT @ delta @ vh.mT
    projected.diagonal().zero_()
    projected[:split, :split] = 0
    return u @ projected @ vh


@dataclass(frozen=True)
class ContinualRule:
    """A continual merge: how one tensor's state takes the next task vector, and what it merges to.

    ``fold(state, delta, is_matrix, count, **params)`` returns the new state (``state`` is None for
    the first source, ``count`` the sources folded before); ``merged(state, scale, **params)`` is the
    merged delta, ``scale`` the model-level factor ``model_scale`` computed (1 where there is none).
    """

    name: str
    paper: str
    fold: Callable[..., Tensor]
    merged: Callable[..., Tensor]
    defaults: Mapping[str, Any]
    rescaled: bool = False      # True: the merged delta is rescaled to the sources' mean norm (OPCM)


def _ta_fold(state, delta, is_matrix, count, **params):
    return delta.clone() if state is None else state + delta


def _average_fold(state, delta, is_matrix, count, **params):
    return delta.clone() if state is None else state + (delta - state) / (count + 1)


def _ties_fold(state, delta, is_matrix, count, *, density, lam):
    if state is None:
        return lam * delta
    return state + lam * elementwise.ties([state, delta], density, 1.0, disjoint="sum")


def _opcm_fold(state, delta, is_matrix, count, *, alpha):
    if state is None:
        return delta.clone()
    return state + (opcm_clean(state, delta, alpha) if is_matrix else delta)


def _as_is(state, scale, **params):
    return state


def _ta_merged(state, scale, *, lam):
    return lam * state


def _rescaled(state, scale, **params):
    return scale * state


RULES: Registry[ContinualRule] = Registry("continual merge")
RULES.add("continual-ta", ContinualRule("continual-ta", "Task arithmetic, Ilharco et al. 2023, arXiv:2212.04089",
                                        _ta_fold, _ta_merged, {"lam": 0.3}))
RULES.add("running-average", ContinualRule("running-average", "Model soups, Wortsman et al. 2022, arXiv:2203.05482",
                                           _average_fold, _as_is, {}))
RULES.add("continual-ties", ContinualRule("continual-ties", "TIES-Merging, Yadav et al. 2023, arXiv:2306.01708",
                                          _ties_fold, _as_is, {"density": 0.2, "lam": 0.5}))
RULES.add("opcm", ContinualRule("opcm", "OPCM, Tang et al. 2025, arXiv:2501.09522", _opcm_fold, _rescaled,
                                {"alpha": 0.5}, rescaled=True))


def check_params(rule: ContinualRule, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` over the rule's defaults; an unknown name is a ValueError naming it."""
    return with_defaults("continual merge", rule.name, rule.defaults, params)


def fold(state: StreamState | None, task_vector: Mapping[str, Tensor], matrices: set[str], rule: str,
         **params: Any) -> StreamState:
    """Fold one whole task vector (``name -> theta_i - theta_pre``, matrices 2-D) into ``state``."""
    spec = RULES[rule]
    kwargs = check_params(spec, params)
    if state is None:
        state = StreamState({})
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(d.double())) ** 2 for d in task_vector.values()))
    for name, delta in task_vector.items():
        work = delta.to(work_dtype(delta))
        state.tensors[name] = spec.fold(state.tensors.get(name), work, name in matrices, state.count, **kwargs)
    state.mean_norm = next_mean_norm(state.mean_norm, state.count, norm)
    state.count += 1
    return state


def next_mean_norm(mean_norm: float, count: int, norm: float) -> float:
    """The mean of ``count`` sources' whole-model norms once one more, of norm ``norm``, is folded."""
    return mean_norm + (norm - mean_norm) / (count + 1)


def model_scale(state: StreamState, rule: str) -> float:
    """The model-level factor of ``merged``: OPCM's mean source norm over the state's norm, else 1."""
    if not RULES[rule].rescaled:
        return 1.0
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(t.double())) ** 2 for t in state.tensors.values()))
    return state.mean_norm / norm if norm > 0 else 0.0


def merged(state: StreamState, rule: str, **params: Any) -> dict[str, Tensor]:
    """The merged delta of every tensor: what is added to the base."""
    spec = RULES[rule]
    kwargs = check_params(spec, params)
    scale = model_scale(state, rule)
    return {name: spec.merged(t, scale, **kwargs) for name, t in state.tensors.items()}


def merge_stream(rule: str, task_vectors: Sequence[Mapping[str, Tensor]], matrices: set[str],
                 **params: Any) -> dict[str, Tensor]:
    """Fold ``task_vectors`` in order with ``rule`` and return the merged delta of every tensor."""
    if not task_vectors:
        raise ValueError("a continual merge needs at least one task vector")
    state = fold(None, task_vectors[0], matrices, rule, **params)
    for tv in task_vectors[1:]:
        state = fold(state, tv, matrices, rule, **params)
    return merged(state, rule, **params)
