"""Stage 1 alternatives: merge methods that turn S task vectors into one basis Stage 2 can train.

mergekit-style: every method is a small pure function plus one ``MergeMethod`` registry entry that
names it, cites its paper and lists its parameters. Each entry says how one matrix parameter's
source deltas become ``stage1.Factors`` (the basis Stage 2 trains the top-N singular values of) and
how the other parameters' deltas combine, so Stage 2 runs unchanged on any method's output.

Dense merges (task arithmetic, averaging, TIES, DARE) are reduced to the top-K SVD of the merged
matrix, the same rank-K basis shape AXIS hands Stage 2. Non-matrix parameters follow each method's
own rule (its paper applies it to the whole task vector): lambda * sum for task arithmetic, the
elementwise TIES / DARE rules for those, the plain mean for averaging, TSV-M and AXIS.
No files, no logging, no global state beyond the registry.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from axis_stream.core import continual, stage1, svd
from axis_stream.core.elementwise import average, dare, keep_top_magnitude, stack, task_arithmetic, ties
from axis_stream.core.layout import as_matrix
from axis_stream.core.registry import Registry, with_defaults
from axis_stream.core.stage1 import Factors

# --- matrix-only building blocks ---

def nearest_orthogonal(x: Tensor) -> Tensor:
    """The polar factor of ``x`` (``U V^T`` of its thin SVD): the closest matrix with orthonormal columns."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def tsvm_factors(deltas: Sequence[Tensor], alpha: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """TSV-M (Gargiulo et al. 2025): per task keep ``int(min(m, n) / T)`` singular components, stack
    the U blocks and the V blocks, whiten each stack to its nearest orthogonal matrix, and recombine
    with the stacked singular values: ``Delta = alpha * U_o diag(s) V_o^T``. Returns ``(U_o, alpha * s, V_o)``.
    """
    stacked = stack(deltas)
    t, m, n = stacked.shape
    k = min(m, n) // t
    if k < 1:
        raise ValueError(f"TSV-M needs T <= min(m, n): {t} task vectors for a {m}x{n} matrix")
    us, ss, vs = [], [], []
    for d in stacked:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].mT)
    return nearest_orthogonal(torch.cat(us, 1)), alpha * torch.cat(ss), nearest_orthogonal(torch.cat(vs, 1))


def top_k_factors(dense: Tensor, k: int) -> Factors:
    """The rank-``k`` truncated SVD of a merged dense matrix: the basis Stage 2 trains."""
    U, s, V = svd.exact_svd(dense)
    return Factors(U[:, :k], s[:k], V[:, :k])


def axis_stream(deltas: Sequence[Tensor], k: int, svd_method: str = "exact", seed: int = 0) -> Factors:
    """AXIS as the daemon runs it: the streaming Stage 1 fold applied to the sources in order."""
    current = stage1.fold(None, deltas[0], k, svd=svd_method, seed=seed)
    for d in deltas[1:]:
        current = stage1.fold(current, d, k, svd=svd_method, seed=seed)
    return current


def axis_tree(deltas: Sequence[Tensor], k: int, shards: int = 2, svd_method: str = "exact", seed: int = 0) -> Factors:
    """AXIS as ``axis-stream backfill --executor ray`` runs it: the sources in ``shards`` contiguous
    shards, each streamed, then the shards' bases folded pairwise (``stage1.tree_reduce``)."""
    parts = [axis_stream(part, k, svd_method, seed) for part in stage1.shards(deltas, shards) if part]
    return stage1.tree_reduce(parts, lambda a, b: stage1.fold_factors(a, b, k))


# --- the registry ---

MatrixRule = Callable[..., Factors]   # (deltas, k, *, seed, **params) -> Factors
VectorRule = Callable[..., Tensor]    # (deltas, *, seed, **params) -> Tensor


@dataclass(frozen=True)
class MergeMethod:
    """One Stage 1 method: its name, its paper, its parameters and defaults, and its two rules."""

    name: str
    paper: str
    matrix: MatrixRule | None        # None: a continual rule (``continual.RULES``), run over the whole model
    vector: VectorRule | None
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def check(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` merged over the defaults; unknown names are a ValueError naming them."""
        return with_defaults("merge method", self.name, self.defaults, params)


def _dense(rule: Callable[..., Tensor], seeded: bool = False) -> tuple[MatrixRule, VectorRule]:
    """Matrix and vector rules of a dense elementwise merge: the matrix rule keeps the top-K SVD."""

    def vector(deltas, *, seed=0, **params):
        return rule(deltas, seed=seed, **params) if seeded else rule(deltas, **params)

    def matrix(deltas, k, *, seed=0, **params):
        return top_k_factors(vector(deltas, seed=seed, **params), k)

    return matrix, vector


def _mean_vector(deltas, *, seed=0, **params):
    return average(deltas)


def _tsvm_matrix(deltas, k, *, seed=0, alpha=1.0):
    return Factors(*svd.orthogonalize(*tsvm_factors(deltas, alpha), k))


def _axis_matrix(deltas, k, *, seed=0, svd="exact"):
    return axis_stream(deltas, k, svd, seed)


def _axis_tree_matrix(deltas, k, *, seed=0, shards=2, svd="exact"):
    return axis_tree(deltas, k, shards, svd, seed)


def _axis_global_matrix(deltas, k, *, seed=0, strategy="top", final_svd=True):
    return stage1.merge(deltas, k, strategy=strategy, final_svd=final_svd, seed=seed)


METHODS: Registry[MergeMethod] = Registry("merge method")


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry under its name (a second one with the same name is an error)."""
    return METHODS.add(method.name, method)


register(MergeMethod("axis", "AXIS, streaming Stage 1 (paper section A.11)", _axis_matrix, _mean_vector,
                     {"svd": "exact"}))
register(MergeMethod("axis-tree", "AXIS, streamed shards folded pairwise (backfill --executor ray; A.11)",
                     _axis_tree_matrix, _mean_vector, {"shards": 2, "svd": "exact"}))
register(MergeMethod("axis-global", "AXIS, global Stage 1 (paper Algorithm 1, A.13, 5.4)",
                     _axis_global_matrix, _mean_vector, {"strategy": "top", "final_svd": True}))
register(MergeMethod("ta", "Task arithmetic, Ilharco et al. 2023, arXiv:2212.04089",
                     *_dense(task_arithmetic), {"lam": 0.3}))
register(MergeMethod("average", "Model soups, Wortsman et al. 2022, arXiv:2203.05482",
                     *_dense(average), {}))
register(MergeMethod("ties", "TIES-Merging, Yadav et al. 2023, arXiv:2306.01708",
                     *_dense(ties), {"density": 0.2, "lam": 1.0}))
register(MergeMethod("dare", "DARE, Yu et al. 2024, arXiv:2311.03099",
                     *_dense(dare, seeded=True),
                     {"p": 0.5, "combine": "average", "density": 1.0, "lam": 1.0}))
register(MergeMethod("tsvm", "TSV-M, Gargiulo et al. 2025, arXiv:2412.00081", _tsvm_matrix, _mean_vector,
                     {"alpha": 1.0}))


# --- whole task vectors ---

def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: tensors of the same shape get different random draws, reproducibly."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def build_basis(method: str, task_vectors: Sequence[Mapping[str, Tensor]], matrices: Iterable[str], *,
                k_fraction: float = 0.10, seed: int = 0, params: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, Factors], dict[str, Tensor]]:
    """Merge S task vectors (``name -> theta_i - theta_pre``) with a registered method, tensor by tensor.

    Returns ``(factors, means)`` as Stage 2 takes them: ``factors[name]`` for each matrix parameter
    (conv weights in matrix form, rank ``K = stage1.k_for(shape, k_fraction)``), ``means[name]`` the
    merged delta of every other parameter, all-zero merged deltas left out.
    """
    spec = METHODS[method]
    if not task_vectors:
        raise ValueError("build_basis needs at least one task vector")
    kwargs = spec.check(params or {})
    matrices = set(matrices)
    if method in continual.RULES:
        return _continual_basis(method, task_vectors, matrices, k_fraction, kwargs)
    assert spec.matrix is not None and spec.vector is not None     # every other method has both rules
    factors: dict[str, Factors] = {}
    means: dict[str, Tensor] = {}
    for name in task_vectors[0]:
        deltas = [tv[name] for tv in task_vectors]
        if not deltas[0].is_floating_point():
            continue
        tseed = tensor_seed(seed, name)
        if name in matrices:
            mats = [as_matrix(d) for d in deltas]
            factors[name] = spec.matrix(mats, stage1.k_for(mats[0].shape, k_fraction), seed=tseed, **kwargs)
        else:
            merged = spec.vector(deltas, seed=tseed, **kwargs).to(deltas[0].dtype)
            if bool(merged.any()):
                means[name] = merged
    return factors, means


def _continual_basis(method: str, task_vectors: Sequence[Mapping[str, Tensor]], matrices: set[str],
                     k_fraction: float, params: Mapping[str, Any]) -> tuple[dict[str, Factors], dict[str, Tensor]]:
    """A continual merge over the whole model (OPCM's scale is model-wide), then the usual basis shape."""
    tvs = [{n: as_matrix(d) if n in matrices else d for n, d in tv.items() if d.is_floating_point()}
           for tv in task_vectors]
    merged = continual.merge_stream(method, tvs, matrices, **params)
    factors = {n: top_k_factors(d, stage1.k_for(d.shape, k_fraction)) for n, d in merged.items() if n in matrices}
    means = {n: d.to(task_vectors[0][n].dtype) for n, d in merged.items() if n not in matrices and bool(d.any())}
    return factors, means


def _continual_entry(name: str) -> MergeMethod:
    """The registry entry of a continual rule: no per-tensor rules, it runs over the whole model."""
    rule = continual.RULES[name]
    return MergeMethod(name, rule.paper + " (continual: sources folded in order)", None, None, dict(rule.defaults))


register(_continual_entry("continual-ta"))
register(_continual_entry("continual-ties"))
register(_continual_entry("running-average"))
register(_continual_entry("opcm"))


# --- robustness studies: what is done to the sources before any merge ---

def corrupt(delta: Tensor, seed: int, scale: float = 0.5) -> Tensor:
    """``delta`` plus zero-mean Gaussian noise with std ``scale * ||delta||_F`` (paper section 4.3)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(delta.shape, generator=gen, dtype=torch.float64)
    std = scale * float(torch.linalg.vector_norm(delta.double()))
    return (delta.double() + std * noise).to(delta.dtype)


def magnitude_prune(delta: Tensor, ratio: float) -> Tensor:
    """``delta`` with its smallest-magnitude ``ratio`` fraction of entries zeroed (paper Figure 20)."""
    return keep_top_magnitude(delta, 1.0 - ratio)
