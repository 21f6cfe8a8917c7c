"""The SVD a streaming fold needs: the new matrix's components that enter the basis, certified on the
merged result rather than one by one.

A fold keeps the top ``k`` of the current basis's components and the new matrix ``A``'s: ``A``'s
``j``-th enters iff ``sigma_j > floor_j`` (the current basis's ``(k-1-j)``-th singular value), so the
result is ``F = C + A_e``, ``C`` the current's top ``k - e`` and ``A_e`` the rank-``e`` truncation of
``A``. A seeded randomized subspace iteration (a block of ``k/2 + 8`` columns, checked after each of
``POWER_STEPS`` power iterations) gives Ritz triplets ``(U, theta, V)`` with ``U^T A = diag(theta) V^T`` exactly and residuals ``r_j = ||A v_j - theta_j u_j||``;
the fold uses ``U_e U_e^T A`` for ``A_e``. It is accepted when

1. the entering set is certain: ``theta_{e-1} > floor_{e-1}`` (Ritz values are lower bounds) and
   ``theta_e + r_e < floor_e`` (the first excluded singular value, taken as its Ritz value plus its
   residual, as ``svd.top_svd`` certifies its floor), each by more than float32 rounding; and
2. the error bound ``||U_e U_e^T A - A_e||_F / ||F||_F <= tol`` (``basis.svd_tol``, 1e-4), with

       bound = [ ||r_j (theta_j + s_out) / (theta_j - s_out)||_j
                 + ||r_{<e}|| ||r_{>=e}|| (theta_0 + r_0) / ((theta_{e-1} - s_out)(theta_{e-1} - s_in)) ] / ||F||_F

   where ``s_in = theta_e + r_e`` bounds the excluded singular values inside the block and ``s_out``
   (the block's last Ritz value plus residual) those beyond it: the first term is Wedin's bound on the
   coupling of the entering vectors to what lies outside the block, the second the coupling, through
   the outside, to the excluded values inside it (second order in the residuals, so a small gap between
   entering and excluded values inside the block costs little). The bound is an a posteriori estimate
   under the stated upper bounds on the excluded values (``theta + r``), not a proof-grade bound;
   ``tests/test_entering.py`` checks it against float64 exact folds.

Otherwise the exact top ``k`` (``svd.exact_svd``, from the Gram matrix) is taken
(``"randomized->exact"``), and the attempt stops as soon as that is the cheaper way: when the
entering set takes more than about half the block (checked before any power step from lower bounds,
and at each check; the exact path then costs about as much as a block wide enough), when a check
has no finite certificate (the boundary sits in a flat part of the spectrum: the new matrix's noise
bulk against a basis still holding noise), or when the certificate's decay predicts it only beyond
``GIVE_UP_FACTOR`` times the last step count. The cost follows ``e``: a matrix of which nothing can
enter is settled at the first check.

A failed attempt costs 1.3-1.6x the exact path, so the basis (``store.folding.Folder``) asks
``worth_attempting`` first, from what the matrix's last fold let in and how many attempts in a row fell
back: a stream's early folds, where most of the block enters, and matrices that do not certify on
real fine-tunes then take the exact path directly. No I/O, no state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from axis_stream.core import svd as _svd

OVERSAMPLE = 8             # block columns beyond the entering count
# The power iterations after which the certificate is checked (a check costs no product with the
# matrix, only the block's small problems), and when to give up: the exact top k from the Gram matrix
# costs about ten power steps of the block at ViT-B-32's shapes, so an attempt that would need more
# than the last step count is not worth finishing.
POWER_STEPS = (2, 3, 4, 5, 6, 8)
ROUNDING = 1e-6            # relative to the top Ritz value: closer to a floor than this is a float32 tie
GIVE_UP_FACTOR = 1.0       # give up when the certificate is predicted only beyond this many times the last step count
GRAM_RANGE = 1e-4          # Ritz values down to this share of the top one come from the block's Gram matrix
BACKOFF_MAX = 3            # after f fallbacks in a row, attempts at every 2**min(f, BACKOFF_MAX)-th fold only


def _width(k: int, small: int) -> int:
    """The attempt's block: about half the entering count's bound plus oversampling, at most the short side."""
    return min(small, k // 2 + OVERSAMPLE)


def _fills(e: int, width: int, small: int) -> bool:
    """Whether ``e`` entering components take most of the block (the exact path then costs about as
    much as a block wide enough)."""
    return 2 * e + OVERSAMPLE // 2 > width and width < small


def worth_attempting(shape: tuple[int, int], k: int, entered: int | None, failed: int, count: int) -> bool:
    """Whether a matrix's fold should try the randomized attempt, from its previous folds: not when
    the last let in ``entered`` components that would fill most of the block (the attempt stops there
    at its first check; how many enter changes slowly along a stream), and after ``failed`` fallbacks
    in a row only at folds ``count`` (sources folded so far) that are multiples of ``2**failed``
    (capped): on real fine-tunes some matrices never certify. ``entered`` None: no history."""
    small = min(shape)
    if entered is not None and _fills(entered, _width(k, small), small):
        return False
    return count % 2 ** min(failed, BACKOFF_MAX) == 0


def fold_path(svd: str, shape: tuple[int, int], k: int, entered: int | None, failed: int, count: int) -> str:
    """The SVD path a fold takes under ``[basis] svd``: ``"randomized"`` gives way to ``"exact"`` where
    ``worth_attempting`` says the attempt will not pay."""
    return "exact" if svd == "randomized" and not worth_attempting(shape, k, entered, failed, count) else svd


def failed_after(failed: int, method: str) -> int:
    """The count of fallbacks in a row once a fold took ``method`` (an exact fold leaves it as it was)."""
    return {"randomized": 0, "randomized->exact": failed + 1}.get(method, failed)


def _ritz(q: Tensor, z: Tensor, qz: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ritz triplets of ``A`` on the left space ``q`` (``U^T A = diag(theta) V^T``) and their residual
    norms ``||A v - theta u||`` in float64, from the products of one subspace iteration from ``q``
    (``z = A^T q``, ``qz = orth(z)``, ``y = A qz``; the next block is ``orth(y)``): a check costs no
    product with ``A`` of its own.

    The SVD of ``b = z^T`` comes from the float64 eigenproblem of its small Gram matrix ``z^T z`` (a
    fraction of the cost of an SVD of ``b``; ``v = z u_b / theta`` is accurate to float64 rounding
    times ``(theta_0 / theta)^2``), unless a Ritz value lies under ``GRAM_RANGE`` of the top one: then
    from the SVD of ``b`` itself. ``A v = y (qz^T v)``, as ``v`` lies in the span of ``z``."""
    z64 = z.double()
    lam, ub = torch.linalg.eigh(z64.mT @ z64)
    theta, ub = lam.flip(0).clamp_min(0).sqrt(), ub.flip(1)
    if float(theta[-1]) > GRAM_RANGE * float(theta[0]):
        V = ((z64 @ ub) / theta).to(z.dtype)
        theta, ub = theta.to(z.dtype), ub.to(z.dtype)
    else:
        ub, theta, vh = torch.linalg.svd(z.mT, full_matrices=False)
        V = vh.mT
    U = q @ ub
    return U, theta, V, torch.linalg.vector_norm(y @ (qz.mT @ V) - U * theta, dim=0).double()


def _entering(theta: Tensor, floors: Tensor) -> int:
    """How many leading values of ``theta`` (descending) beat their floors."""
    k, w = floors.numel(), theta.numel()
    return int((theta[:k] > floors[:w]).int().cumprod(0).sum())


def _entering_at_least(z: Tensor, floors: Tensor) -> int:
    """A lower bound on the entering count from ``z = A^T q``: the Ritz values of ``A`` on ``q`` (the
    singular values of ``z``, from its small Gram matrix) are lower bounds on its singular values."""
    z64 = z.double()
    return _entering(torch.linalg.eigvalsh(z64.mT @ z64).flip(0).clamp_min(0).sqrt(), floors.double())


def certify(theta: Tensor, rho: Tensor, floors: Tensor, held_sq: Tensor, full: bool, tol: float
            ) -> tuple[int, float, float]:
    """``(e, bound, excess)``: the entering count, the estimated bound on the fold result's relative
    Frobenius error (module docstring; ``math.inf`` where it cannot be given) and how far the
    certificate is from holding (``<= 1``: it holds). ``theta``, ``rho``: float64 Ritz values
    (descending) and residual norms of the whole block; ``held_sq[i]``: the squared norm of the
    current basis's top ``k - i`` components; ``full``: the block spans the whole range."""
    k, w = floors.numel(), theta.numel()
    e = _entering(theta, floors)
    if e == w and not full:
        return e, math.inf, math.inf          # the entering set fills the block: where it stops is unseen
    up = theta + rho                          # a singular value lies within its residual of each Ritz value
    margin = ROUNDING * float(theta[0])       # closer to a floor than this is a float32 tie: the exact path decides
    excess = 0.0
    if e < min(k, w):
        room = float(floors[e] - theta[e]) - margin
        excess = float(rho[e]) / room if room > 0 else math.inf
    if e and float(theta[e - 1] - floors[e - 1]) <= margin:
        excess = math.inf
    if e == 0 or not math.isfinite(excess):
        return e, (0.0 if e == 0 else math.inf), excess
    outside = 0.0 if full else float(up[-1])  # beyond the block: at most its last Ritz value plus residual
    inside = float(up[e]) if e < w else 0.0   # the first excluded value within the block
    lead = theta[:e]
    norm = math.sqrt(float(held_sq[e]) + float(lead.square().sum()))
    if float(lead[-1]) <= max(outside, inside) or norm <= 0:
        return e, math.inf, math.inf
    first = torch.linalg.vector_norm(rho[:e] * (lead + outside) / (lead - outside))
    second = (torch.linalg.vector_norm(rho[:e]) * torch.linalg.vector_norm(rho[e:]) * float(up[0])
              / ((float(lead[-1]) - outside) * (float(lead[-1]) - inside))) if e < w else 0.0
    bound = float(first + second) / norm
    return e, bound, max(excess, bound / tol)


def _hopeless(history: list[tuple[int, float]]) -> bool:
    """Whether the certificate's excess, extrapolated log-linearly from its last two checks (power
    iteration converges linearly), reaches 1 only beyond ``GIVE_UP_FACTOR`` times the last step
    count; a check with no finite excess after another is hopeless too."""
    if len(history) < 2:
        return False
    (s1, x1), (s2, x2) = history[-2:]
    if not math.isfinite(x2):
        return True                           # worse than the check before (e.g. a boundary in a flat bulk)
    if not math.isfinite(x1):
        return False
    if x2 >= x1:
        return True
    rate = (math.log(x1) - math.log(x2)) / (s2 - s1)
    return s2 + math.log(x2) / rate > GIVE_UP_FACTOR * POWER_STEPS[-1]


def entering_svd(a: Tensor, floors: Tensor, held: Tensor, *, tol: float, seed: int = 0
                 ) -> tuple[Tensor, Tensor, Tensor, float, float] | None:
    """The components of ``a`` that enter a fold with per-rank ``floors`` (``k`` non-decreasing values)
    into a basis whose singular values are ``held`` (descending, at most ``k``), certified to ``tol``
    on the merged result (module docstring): ``(U, s, V, bound, sigma_max)``, or None when it cannot
    certify within ``POWER_STEPS`` or is predicted not to (the caller takes the exact path)."""
    k, small = floors.numel(), min(a.shape)
    h = torch.zeros(k, dtype=torch.float64, device=a.device)
    h[:held.numel()] = held.double().square()[:k]
    held_sq = torch.cat([h.cumsum(0).flip(0), h.new_zeros(1)])   # held_sq[i] = h[:k - i].sum()
    gen = torch.Generator(device=a.device).manual_seed(seed)
    width = _width(k, small)
    q = torch.linalg.qr(a @ torch.randn(a.shape[1], width, generator=gen, dtype=a.dtype, device=a.device)).Q
    history: list[tuple[int, float]] = []
    for step in range(POWER_STEPS[-1] + 1):
        z = a.mT @ q
        if step == 0 and _fills(_entering_at_least(z, floors), width, small):
            return None        # before any power step: most of the block enters already
        qz = torch.linalg.qr(z).Q
        y = a @ qz
        if step in POWER_STEPS:
            U, theta, V, rho = _ritz(q, z, qz, y)
            e, bound, excess = certify(theta.double(), rho, floors.double(), held_sq, width >= small, tol)
            if excess <= 1:
                return U[:, :e], theta[:e], V[:, :e], bound, float(theta[0])
            if _fills(e, width, small) or not math.isfinite(excess):
                return None    # most of the block enters, or the boundary sits in a flat part: the exact path
            history.append((step, excess))
            if _hopeless(history):
                return None
        q = torch.linalg.qr(y).Q    # the next block
    return None


def fold_svd(a: Tensor, floors: Tensor, held: Tensor, *, tol: float, seed: int = 0
             ) -> tuple[Tensor, Tensor, Tensor, _svd.SVDReport, float]:
    """``entering_svd``, else the exact top ``k`` above the floors (report ``"randomized->exact"``):
    ``(U, s, V, report, sigma_max)``; ``report.max_rel_residual`` holds the certified bound."""
    out = entering_svd(a, floors, held, tol=tol, seed=seed)
    if out is not None:
        U, s, V, bound, top = out
        U, V = _svd.normalize_signs(U, V)
        return U, s, V, _svd.SVDReport("randomized", bound), top
    U, s, V = _svd.exact_svd(a, floors.numel())
    keep = s.double() > floors[:s.numel()].double()
    return U[:, keep], s[keep], V[:, keep], _svd.SVDReport("randomized->exact", math.inf), float(s[0]) if s.numel() else 0.0
