"""AXIS Stage 1: merge task matrices by keeping their K strongest rank-one components.

Pure functions on torch tensors (paper Algorithm 1, section A.11 for the streaming fold, A.13 for
the selection strategies, A.10 for the Gavish-Donoho threshold). No files, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from axis_stream.core import entering as _entering
from axis_stream.core import svd as _svd
from axis_stream.core.registry import Registry


@dataclass(frozen=True)
class FoldStats:
    """What one streaming fold did to one matrix.

    ``new_kept``: kept components that came from the new matrix; ``energy_kept``: fraction of the
    new matrix's squared Frobenius norm carried by those components; ``svd_method`` and
    ``svd_error``: the truncated SVD's path and its certificate (see ``svd.SVDReport``);
    ``top_sigma``: the new matrix's largest singular value (what ``calibration`` keeps the max of).
    """

    new_kept: int
    energy_kept: float
    svd_method: str
    svd_error: float
    top_sigma: float = 0.0


@dataclass(frozen=True)
class Factors:
    """A task matrix in factored form ``U diag(s) V^T`` with ``U [m, r]``, ``s [r]``, ``V [n, r]``."""

    U: Tensor
    s: Tensor
    V: Tensor
    stats: FoldStats | None = field(default=None, compare=False)

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    @property
    def nbytes(self) -> int:
        return self.U.nbytes + self.s.nbytes + self.V.nbytes

    def to_dense(self) -> Tensor:
        return (self.U * self.s) @ self.V.mT


@dataclass(frozen=True)
class _Pool:
    """Rank-one components pooled from several matrices, with the index of the source of each."""

    U: Tensor
    s: Tensor
    V: Tensor
    source: Tensor

    def take(self, idx: Tensor) -> _Pool:
        return _Pool(self.U[:, idx], self.s[idx], self.V[:, idx], self.source[idx])


def _pool(parts: Sequence[tuple[Tensor, Tensor, Tensor]]) -> _Pool:
    return _Pool(
        torch.cat([p[0] for p in parts], dim=1),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts], dim=1),
        torch.cat([torch.full((p[1].numel(),), i, dtype=torch.long, device=p[1].device)
                   for i, p in enumerate(parts)]),
    )


def _top(pool: _Pool, k: int) -> _Pool:
    """The k largest singular values; ties go to the earlier source, then the earlier component."""
    order = torch.sort(pool.s, descending=True, stable=True).indices
    return pool.take(order[:k])


# --- selection strategies (paper section A.13): a registry of name -> (parts, k, seed) -> _Pool ---

Strategy = Callable[[Sequence[tuple[Tensor, Tensor, Tensor]], int, int], _Pool]


def _select_top(parts, k, seed):
    return _top(_pool(parts), k)


def _select_bottom(parts, k, seed):
    pool = _pool(parts)
    order = torch.sort(pool.s, descending=False, stable=True).indices
    return _top(pool.take(order[:k]), k)


def _select_arbitrary(parts, k, seed):
    pool = _pool(parts)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(pool.s.numel(), generator=gen)[:k]
    return _top(pool.take(torch.sort(pick).values), k)


def _select_equal_top(parts, k, seed):
    """Each source gives k // S of its top components; the first k % S sources give one more."""
    share, extra = divmod(k, len(parts))
    taken = [(u[:, :n], s[:n], v[:, :n])
             for i, (u, s, v) in enumerate(parts) for n in [share + (i < extra)]]
    return _top(_pool(taken), k)


def _select_average_top(parts, k, seed):
    """Average the sources' own top-k approximations, then keep the top k of that average's SVD."""
    avg = _pool([(u[:, :k], s[:k] / len(parts), v[:, :k]) for u, s, v in parts])
    U, s, V = _svd.orthogonalize(avg.U, avg.s, avg.V, k)
    return _Pool(U, s, V, torch.full((s.numel(),), -1, dtype=torch.long, device=s.device))


STRATEGIES: Registry[Strategy] = Registry("strategy")
STRATEGIES.add("top", _select_top)
STRATEGIES.add("bottom", _select_bottom)
STRATEGIES.add("arbitrary", _select_arbitrary)
STRATEGIES.add("equal-top", _select_equal_top)
STRATEGIES.add("average-top", _select_average_top)


# --- validation ---

def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _check_matrix(t: Tensor, what: str, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{what} is a {type(t).__name__}, not a torch.Tensor")
    if t.dim() != 2:
        raise ValueError(f"{what} is {t.dim()}-D with shape {tuple(t.shape)}; Stage 1 needs 2-D matrices")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {shape}")
    if not t.is_floating_point():
        raise ValueError(f"{what} has dtype {t.dtype}; Stage 1 needs floating-point matrices")
    # a finite sum means every entry is finite (a NaN or Inf propagates), at a fraction of isfinite's cost
    if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or Inf")


def _as_work(t: Tensor) -> Tensor:
    return t.to(_svd.work_dtype(t))


# --- the public API ---

def merge(deltas: Sequence[Tensor], k: int, *, strategy: str = "top", final_svd: bool = True,
          seed: int = 0) -> Factors:
    """Global Stage 1 (Algorithm 1): SVD each task matrix, pool, select k components, re-SVD.

    With ``final_svd=False`` the selected components are returned as they are (not orthogonal),
    sorted by singular value. ``seed`` only matters for ``strategy="arbitrary"``.
    """
    _check_k(k)
    select = STRATEGIES[strategy]
    if len(deltas) == 0:
        raise ValueError("merge needs at least one task matrix")
    shape = tuple(deltas[0].shape) if isinstance(deltas[0], Tensor) else None
    for i, d in enumerate(deltas):
        _check_matrix(d, f"task matrix {i}", shape)
    chosen = select([_svd.exact_svd(_as_work(d)) for d in deltas], k, seed)
    if not final_svd:
        return Factors(chosen.U, chosen.s, chosen.V)
    return Factors(*_svd.orthogonalize(chosen.U, chosen.s, chosen.V, k))


# The SVD path of a fold with nothing to beat (an empty basis: every floor is 0). Then all k
# components of the new matrix enter, so a randomized attempt has nothing to prune: it must certify
# every one of the k, and on a flat noise tail around the k-th singular value (rank-plus-noise task
# matrices, as fine-tunes' changes often are) it cannot, so attempt + exact fallback cost up to
# about twice the exact SVD (benchmarks/PERFORMANCE.md, "First fold of an empty basis"). The exact path
# bounds that cost, so it is taken outright. ``None`` keeps the requested path (what
# benchmarks/fold_memory.py and fold_speed.py compare against).
FIRST_FOLD_SVD: str | None = "exact"


def fold(current: Factors | None, delta: Tensor, k: int, *, svd: str = "exact",
         tol: float = 1e-4, seed: int = 0) -> Factors:
    """One streaming Stage 1 step, ``Stage1({current, delta})`` with the top strategy (paper A.11).

    Only the top ``k`` components of ``delta`` can enter the union's top ``k``, its ``j``-th only if
    it beats the current basis's ``(k + 1 - j)``-th singular value, so only those are computed. The
    re-orthogonalisation works on the stacked factors, never on an ``m x n`` product. ``svd="randomized"``
    computes only those that enter, certified on the merged result to ``tol`` (relative Frobenius error
    against the exact fold; ``core/entering.py``), else takes the exact SVD. With nothing to beat (no
    ``current``), ``svd`` gives way to ``FIRST_FOLD_SVD``. The returned ``Factors`` carries
    the fold's ``FoldStats``; when no component of ``delta`` enters, it holds ``current``'s own tensors.
    """
    _check_k(k)
    _check_matrix(delta, "new task matrix", current.shape if current is not None else None)
    delta = _as_work(delta)
    floor = torch.zeros(k, dtype=delta.dtype, device=delta.device)
    parts = _current_parts(current, delta.dtype)
    largest = floor[:0]
    if parts:
        # floor[j]: what the new j-th component (0-based) must beat, the current (k-1-j)-th or 0
        largest = parts[0][1].sort(descending=True).values[:k]
        floor[k - largest.numel():] = largest.flip(0)
    method = svd if bool(floor.any()) or FIRST_FOLD_SVD is None else FIRST_FOLD_SVD
    if method == "randomized":   # only what can enter, certified on the merged result (core/entering.py)
        U, s, V, report, top = _entering.fold_svd(delta, floor, largest, tol=tol, seed=seed)
    else:
        U, s, V, report = _svd.top_svd(delta, k, method=method, tol=tol, floor=floor, seed=seed)
        # s is empty when even the top component stays under every floor; its value is still kept (calibration)
        top_s = s if s.numel() else _svd.exact_svd(delta, 1)[1]
        top = float(top_s.max()) if top_s.numel() else 0.0
    total = float(torch.linalg.matrix_norm(delta) ** 2)
    return _fold_in(current, parts, (U, s, V), k, total, report.method, report.max_rel_residual, top)


def fold_factors(current: Factors | None, other: Factors, k: int) -> Factors:
    """Fold a factored source into ``current``: ``fold`` with ``other.to_dense()``, without forming it.

    ``other`` is ``U diag(s) V^T`` with orthonormal ``U`` and ``V`` (another basis: a rank-K source),
    so its SVD is its own factors: its top ``k`` components are pooled with ``current``'s, the ``k``
    largest kept and re-orthogonalised, as ``fold`` does. The stats' ``svd_method`` is ``"factored"``.
    """
    _check_k(k)
    shape = current.shape if current is not None else None
    _check_matrix(other.U, "new source's U", None if shape is None else (shape[0], other.rank))
    _check_matrix(other.V, "new source's V", None if shape is None else (shape[1], other.rank))
    if tuple(other.s.shape) != (other.rank,) or other.U.shape[1] != other.rank or other.V.shape[1] != other.rank:
        raise ValueError(f"new source's factors disagree on the rank: U {tuple(other.U.shape)}, "
                         f"s {tuple(other.s.shape)}, V {tuple(other.V.shape)}")
    dtype = _svd.work_dtype(other.U)
    order = other.s.sort(descending=True, stable=True).indices[:k]
    new = (other.U[:, order].to(dtype), other.s[order].to(dtype), other.V[:, order].to(dtype))
    total = float(other.s.double().square().sum())
    top = float(other.s.max()) if other.rank else 0.0
    return _fold_in(current, _current_parts(current, dtype), new, k, total, "factored", 0.0, top)


def _current_parts(current: Factors | None, dtype: torch.dtype) -> list[tuple[Tensor, Tensor, Tensor]]:
    if current is None:
        return []
    return [(current.U.to(dtype), current.s.to(dtype), current.V.to(dtype))]


def _fold_in(current: Factors | None, parts: list[tuple[Tensor, Tensor, Tensor]],
             new: tuple[Tensor, Tensor, Tensor], k: int, total: float, method: str, error: float,
             top_sigma: float) -> Factors:
    """The shared end of a fold: pool ``current``'s components (``parts``) and the new source's top
    ones (``new``, of squared norm ``total``, largest singular value ``top_sigma``), keep the ``k``
    largest, re-orthogonalise, with stats."""
    parts = [*parts, new]
    chosen = _top(_pool(parts), k)
    entered = chosen.source == len(parts) - 1
    stats = FoldStats(
        new_kept=int(entered.sum()),
        energy_kept=float((chosen.s[entered] ** 2).sum()) / total if total > 0 else 0.0,
        svd_method=method,
        svd_error=error,
        top_sigma=top_sigma,
    )
    if current is not None and stats.new_kept == 0 and chosen.s.numel() == current.rank:
        # the union's top k is the current basis itself (already orthonormal): returned as it is,
        # so the store can tell an untouched matrix and share its files between versions
        return Factors(current.U, current.s, current.V, stats=stats)
    if current is None:   # one source's own truncated SVD: already orthonormal, sorted, signs fixed
        return Factors(chosen.U, chosen.s, chosen.V, stats=stats)
    return Factors(*_svd.orthogonalize(chosen.U, chosen.s, chosen.V, k), stats=stats)


def tree_levels(n: int) -> list[list[tuple[int, int]]]:
    """The folds of a pairwise tree reduction of ``n`` items, level by level: ``(i, j)`` folds item
    ``j`` into item ``i`` (neighbours first; an odd one out waits for the next level)."""
    levels, step = [], 1
    while step < n:
        levels.append([(i, i + step) for i in range(0, n, 2 * step) if i + step < n])
        step *= 2
    return levels


T = TypeVar("T")


def shards(items: Sequence[T], n: int) -> list[list[T]]:
    """``items`` in ``n`` contiguous shards, in order, their sizes differing by at most one."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"shards must be an integer >= 1, got {n!r}")
    size = len(items)
    return [list(items[i * size // n:(i + 1) * size // n]) for i in range(n)]


def tree_reduce(items: Sequence[T], pair: Callable[[T, T], T]) -> T:
    """``items`` reduced pairwise in the shape of ``tree_levels`` (``pair(left, right)``): the tree a
    sharded fold (``axis-stream backfill --executor ray``, the ``axis-tree`` merge) combines its shards in."""
    if not items:
        raise ValueError("tree_reduce needs at least one item")
    held = list(items)
    for level in tree_levels(len(held)):
        for i, j in level:
            held[i] = pair(held[i], held[j])
    return held[0]


def k_for(shape: Sequence[int], fraction: float = 0.10) -> int:
    """K for a matrix: ``floor(fraction * min(m, n))``, at least 1 (ViT-B-32's 768 -> 76)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return max(1, math.floor(fraction * min(shape) + 1e-9))


def gavish_donoho_rank(s: Tensor, shape: Sequence[int]) -> int:
    """Rank kept by the Gavish-Donoho optimal hard threshold for unknown noise (paper A.10).

    ``s`` is the full spectrum of an ``m x n`` matrix; the threshold is ``omega(beta) * median(s)``
    with the published polynomial approximation ``omega(beta) = 0.56 b^3 - 0.95 b^2 + 1.82 b + 1.43``.
    """
    beta = min(shape) / max(shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    tau = omega * float(torch.median(s))
    return max(1, int((s > tau).sum()))


def update_mean(mean: Tensor | None, count: int, x: Tensor, weight: int = 1) -> Tensor:
    """Running mean of non-matrix parameters: the mean of ``count`` values so far, updated with ``x``
    (itself the mean of ``weight`` values: another basis's mean, ``Basis.fold_basis``).

    Computed in float64 and returned in ``x``'s dtype; after S updates it equals the batch mean of
    the S values to float rounding.
    """
    if mean is None or count == 0:
        return x.clone()
    if mean.shape != x.shape:
        raise ValueError(f"running mean has shape {tuple(mean.shape)}, new value {tuple(x.shape)}")
    m64 = mean.double()
    return (m64 + (x.double() - m64) * weight / (count + weight)).to(x.dtype)


MEAN_CHUNK = 1 << 20  # elements per float64 running-mean step: bounds the temporaries


def update_mean_inplace(mean: Tensor, count: int, x: Tensor | None, weight: int = 1) -> None:
    """``update_mean`` over chunks, written into ``mean`` (memory: one chunk); ``x = None`` is an all-zero delta."""
    flat_m = mean.view(-1)
    flat_x = None if x is None else x.reshape(-1)
    for i in range(0, flat_m.numel(), MEAN_CHUNK):
        m = flat_m[i:i + MEAN_CHUNK]
        xi = torch.zeros_like(m) if flat_x is None else flat_x[i:i + MEAN_CHUNK]
        m.copy_(update_mean(m, count, xi, weight))
