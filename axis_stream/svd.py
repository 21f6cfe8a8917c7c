"""Truncated SVDs for Stage 1: the exact dense path and a certified randomized path.

Pure functions on torch tensors: no I/O, no logging, no global state. Every function returns
factors as ``(U [m, r], s [r], V [n, r])`` with ``s`` sorted in descending order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

METHODS = ("exact", "randomized")


@dataclass(frozen=True)
class SVDReport:
    """How a truncated SVD was obtained and how far it can be trusted.

    ``method`` is ``"exact"``, ``"randomized"``, or ``"randomized->exact"`` when the randomized
    result failed certification and the exact path was used instead. ``max_rel_residual`` is the
    largest ``||A v - s u|| / s`` over the kept triplets of the randomized attempt (0 for exact).
    """

    method: str
    max_rel_residual: float = 0.0


def work_dtype(t: Tensor) -> torch.dtype:
    """The dtype SVDs run in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def numerical_rank_mask(s: Tensor, shape: tuple[int, int]) -> Tensor:
    """Mask of singular values above the numerical-zero threshold ``max(m, n) * eps * s_max``."""
    if s.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=s.device)
    eps = torch.finfo(s.dtype).eps
    return s > max(shape) * eps * s.max()


def normalize_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Fix the sign ambiguity of singular pairs: the largest-magnitude entry of each u is positive."""
    if U.shape[1] == 0:
        return U, V
    idx = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(U, 0, idx))
    signs[signs == 0] = 1
    return U * signs, V * signs


def exact_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a dense matrix, numerically-zero components dropped, signs normalised."""
    U, s, Vh = torch.linalg.svd(a, full_matrices=False)
    keep = numerical_rank_mask(s, tuple(a.shape))
    U, V = normalize_signs(U[:, keep], Vh[keep].mT)
    return U, s[keep], V


def _randomized_svd(a: Tensor, k: int, seed: int, oversample: int, power_iters: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Subspace iteration with QR re-orthonormalisation (Halko, Martinsson & Tropp, alg. 4.4)."""
    m, n = a.shape
    b = min(k + oversample, m, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, b, generator=gen, dtype=a.dtype, device=a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(a.mT @ q).Q
        q = torch.linalg.qr(a @ z).Q
    ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return q @ ub[:, :k], s[:k], vh[:k].mT


def relative_residuals(a: Tensor, U: Tensor, s: Tensor, V: Tensor) -> Tensor:
    """Per-triplet certificate ``||A v_j - s_j u_j|| / s_j``: small means (u_j, s_j, v_j) is accurate."""
    if s.numel() == 0:
        return s
    return torch.linalg.vector_norm(a @ V - U * s, dim=0) / s


def top_svd(a: Tensor, k: int, *, method: str = "exact", tol: float = 1e-4,
            floor: float = 0.0, seed: int = 0, oversample: int | None = None,
            power_iters: int = 4) -> tuple[Tensor, Tensor, Tensor, SVDReport]:
    """The top ``k`` singular triplets of ``a`` whose singular values exceed ``floor``.

    ``method="exact"`` takes them from a dense SVD. ``method="randomized"`` runs a randomized
    subspace iteration, certifies every kept triplet by its relative residual, and falls back to
    the exact path when the worst residual exceeds ``tol``; the report says which path was taken.
    """
    if method not in METHODS:
        raise ValueError(f"unknown svd method {method!r}; expected one of {METHODS}")
    if method == "randomized" and 2 * k < min(a.shape):
        U, s, V = _randomized_svd(a, k, seed, k if oversample is None else oversample, power_iters)
        err = float(relative_residuals(a, U, s, V).max()) if s.numel() else 0.0
        if err <= tol:
            keep = (s > floor) & numerical_rank_mask(s, tuple(a.shape))
            U, V = normalize_signs(U[:, keep], V[:, keep])
            return U, s[keep], V, SVDReport("randomized", err)
        report = SVDReport("randomized->exact", err)
    else:
        report = SVDReport("exact")
    U, s, V = exact_svd(a)
    keep = s[:k] > floor
    return U[:, :k][:, keep], s[:k][keep], V[:, :k][:, keep], report


def orthogonalize(U: Tensor, s: Tensor, V: Tensor, k: int | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``U diag(s) V^T`` in factored form, keeping at most ``k`` components.

    QR of each stacked factor and an SVD of the small ``r x r`` core: the ``m x n`` product is
    never formed, so the cost is ``O((m + n) r^2)``.
    """
    shape = (U.shape[0], V.shape[0])
    qu, ru = torch.linalg.qr(U)
    qv, rv = torch.linalg.qr(V)
    uc, sc, vch = torch.linalg.svd((ru * s) @ rv.mT, full_matrices=False)
    keep = numerical_rank_mask(sc, shape)
    if k is not None:
        keep[k:] = False
    Uo, Vo = normalize_signs(qu @ uc[:, keep], qv @ vch[keep].mT)
    return Uo, sc[keep], Vo
