"""The merged model without Stage 2: base + a merge's delta at its stored values, as one model or
after each source of a stream.

What "the merged delta" is, per method, is what the product would export (``export --merged``):

- AXIS (``axis``, ``axis-global``): the basis as stored, its top-K ``U diag(s) V^T`` per matrix (K from
  ``stage1.k_fraction``) times its calibration factor (streaming AXIS: the real basis's
  ``basis.calibration``), and the mean of the other parameters' deltas (``Basis.materialize``).
- the continual rules (``opcm``, ``continual-ta``, ``continual-ties``, ``running-average``): the full
  ``continual.merged`` of their bounded state, with the rule's own scaling (lam, OPCM's norm rescale).
- the batch merges (``ta``, ``average``, ``ties``, ``dare``, ``tsvm``): their full merged delta, no top-K:
  the registry's matrix rule at K = min(m, n) (the exact SVD of the dense merge; TSV-M's whitened
  factors as they are) and its rule for the other parameters.

Stage 2 trains the top-K SVD of a merged matrix instead (``merges.build_basis``); for AXIS the two coincide.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from axis_stream.core import continual, merges
from axis_stream.core.layout import as_matrix
from axis_stream.core.stage1 import Factors

TOP_K_MODELS = frozenset({"axis", "axis-global"})
"""Merges whose merged model is their top-K basis: what AXIS stores and exports."""


def order_free(method: str) -> bool:
    """Whether a merge of a set of sources is the same in any arrival order: every batch merge but
    streaming AXIS, and the continual sum and mean (task arithmetic, averaging)."""
    if method in continual.RULES:
        return method in ("continual-ta", "running-average")
    return method in merges.METHODS and method != "axis"


@dataclass(frozen=True)
class Step:
    """The merged model after the first ``count`` sources of a stream."""

    count: int
    delta: dict[str, Tensor]    # name -> merged delta, in the parameter's shape
    fold_seconds: float         # taking in source ``count``: its fold, or a batch merge of all ``count``
    state_bytes: int            # what the method keeps to take in the next source


def dense(factors: Mapping[str, Factors], means: Mapping[str, Tensor], like: Mapping[str, Tensor],
          calibration: Mapping[str, float] | None = None) -> dict[str, Tensor]:
    """The dense merged delta of a basis ``(factors, means)``, each matrix in the shape of ``like[name]``
    and scaled by its ``calibration`` factor (a basis snapshot's; missing: 1), as ``Basis.materialize``."""
    calibration = calibration or {}
    out = {n: (f.to_dense() * calibration.get(n, 1.0)).reshape(like[n].shape) for n, f in factors.items() if f.rank}
    out.update(means)
    return out


def with_base(base: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The merged model's state dict: ``base + delta`` (float32 sums, the base's dtypes), as the export writes it."""
    return {n: (b.float() + delta[n].float()).to(b.dtype) if n in delta else b for n, b in base.items()}


def merged_delta(method: str, task_vectors: Sequence[Mapping[str, Tensor]], matrices: set[str], *,
                 params: Mapping[str, Any], k_fraction: float, seed: int) -> dict[str, Tensor]:
    """The merged delta of ``task_vectors`` (``name -> theta_i - theta_pre``, in order) by ``method``."""
    if method in continual.RULES:
        return collections.deque(stream(method, task_vectors, matrices, params=params), maxlen=1)[0].delta
    keep = k_fraction if method in TOP_K_MODELS else 1.0
    factors, means = merges.build_basis(method, task_vectors, matrices, k_fraction=keep, seed=seed, params=params)
    return dense(factors, means, task_vectors[0])


def stream(method: str, task_vectors: Sequence[Mapping[str, Tensor]], matrices: set[str], *,
           params: Mapping[str, Any], k_fraction: float = 0.10, seed: int = 0) -> Iterator[Step]:
    """The merged model after each of the first 1, 2, ... task vectors, in one pass.

    A continual rule folds each task vector once into its bounded state; a batch merge keeps its
    sources and merges the first ``t`` again at each ``t`` (what taking in one more source costs it).
    Streaming AXIS in the suites reads the versions of its real basis instead (``SuiteHarness``).
    """
    if method not in continual.RULES:
        for t in range(1, len(task_vectors) + 1):
            tic = time.perf_counter()
            delta = merged_delta(method, task_vectors[:t], matrices, params=params, k_fraction=k_fraction, seed=seed)
            seconds = time.perf_counter() - tic
            kept = sum(d.nbytes for tv in task_vectors[:t] for d in tv.values())
            yield Step(t, delta, seconds, kept)
        return
    state = None
    for t, tv in enumerate(task_vectors, 1):
        work = {n: as_matrix(d) if n in matrices else d for n, d in tv.items() if d.is_floating_point()}
        tic = time.perf_counter()
        state = continual.fold(state, work, matrices, method, **params)
        seconds = time.perf_counter() - tic
        like = task_vectors[0]
        delta = {n: d.reshape(like[n].shape).to(like[n].dtype)
                 for n, d in continual.merged(state, method, **params).items()}
        yield Step(t, delta, seconds, sum(s.nbytes for s in state.tensors.values()))
