"""The fold's entering-set SVD (core/entering.py) against a float64 exact fold from the same basis."""

import math

import pytest
import torch

from axis_stream.core import entering, stage1


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def decaying(shape, seed, power=0.5) -> torch.Tensor:
    """Singular values ``j^-power`` over the full rank, random singular vectors (float32)."""
    g = torch.Generator().manual_seed(seed)
    r = min(shape)
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -power
    return ((orthonormal(shape[0], r, g) * s) @ orthonormal(shape[1], r, g).T).float()


def finetune_like(shape, seed, rank=16, noise=0.1) -> torch.Tensor:
    """A fine-tune's change: a rank-``rank`` ``1/j`` part plus a flat (Marchenko-Pastur) noise tail
    holding ``noise`` of the energy (float32)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    low = (orthonormal(m, rank, g) / torch.arange(1, rank + 1)) @ orthonormal(n, rank, g).T
    tail = torch.randn(m, n, generator=g, dtype=torch.float64)
    return ((1 - noise) ** 0.5 * low / torch.linalg.matrix_norm(low)
            + noise**0.5 * tail / torch.linalg.matrix_norm(tail)).float()


KINDS = {
    "decaying j^-0.5": lambda shape, seed: decaying(shape, seed),
    "decaying j^-0.3": lambda shape, seed: decaying(shape, seed, 0.3),
    "rank 16 + noise": lambda shape, seed: finetune_like(shape, seed),
    "rank 4 + 30% noise": lambda shape, seed: finetune_like(shape, seed, rank=4, noise=0.3),
}

# Spectra whose later floors lie clear of a flat part: the fast path is expected to certify there. On
# the others the entering boundary falls inside a flat noise bulk (rank 4 + 30 % noise: every later
# fold) or a slow decay (j^-0.5 and j^-0.3), where telling it apart takes more power steps than the
# exact SVD costs, which is then taken.
CLEAR = {"rank 16 + noise"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double()))


def as64(f: stage1.Factors) -> stage1.Factors:
    return stage1.Factors(f.U.double(), f.s.double(), f.V.double())


@pytest.mark.parametrize("shape", [(600, 240), (240, 600), (256, 256), (768, 192)])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_later_folds_match_the_float64_exact_fold(shape, kind):
    """Sources 2..4 of a stream: each fold (float32, randomized) within 1e-4 of the float64 exact fold
    of the same float32 matrix into the same basis, and never beyond the bound it reports."""
    k = min(shape) // 10
    make = KINDS[kind]
    current = stage1.fold(None, make(shape, 0), k)
    paths = set()   # the paths of the folds whose entering set fits the block (core/entering.py)
    for seed in (1, 2, 3):
        delta = (1 + 0.13 * seed) * make(shape, seed)   # scaled: no exact ties with the basis's values
        fast = stage1.fold(current, delta, k, svd="randomized")
        exact = stage1.fold(as64(current), delta.double(), k, svd="exact")
        err = rel(fast.to_dense(), exact.to_dense())
        assert err < 1e-4, (seed, fast.stats)
        assert fast.stats.new_kept == exact.stats.new_kept
        assert fast.stats.top_sigma == pytest.approx(float(torch.linalg.svdvals(delta.double())[0]), rel=1e-4)
        if fast.stats.svd_method == "randomized":
            assert fast.stats.svd_error <= 1e-4 and err <= max(fast.stats.svd_error, 2e-6)
        if 2 * fast.stats.new_kept + entering.OVERSAMPLE // 2 <= k // 2 + entering.OVERSAMPLE:
            paths.add(fast.stats.svd_method)
        current = stage1.Factors(fast.U, fast.s, fast.V)
    if kind in CLEAR and paths:
        assert "randomized" in paths   # the fast path certified at least one of these folds


def test_what_cannot_enter_costs_one_small_block_and_leaves_the_basis(monkeypatch):
    """With the basis far above the new matrix nothing enters: the first, cheapest check certifies it,
    the basis's own tensors come back, and the new matrix's top singular value is still measured."""
    shape, k = (600, 240), 24
    current = stage1.fold(None, 10 * decaying(shape, 0), k)
    delta = finetune_like(shape, 1)
    checks = []
    certify = entering.certify
    monkeypatch.setattr(entering, "certify", lambda *args: checks.append(1) or certify(*args))
    out = stage1.fold(current, delta, k, svd="randomized")
    assert out.stats.new_kept == 0 and out.U is current.U and out.stats.svd_method == "randomized"
    assert len(checks) == 1
    assert out.stats.top_sigma == pytest.approx(float(torch.linalg.svdvals(delta.double())[0]), rel=1e-4)


def test_an_uncertifiable_boundary_falls_back_to_the_exact_fold():
    """Floors inside the flat noise bulk of the new matrix: which bulk components enter cannot be told
    from a few power iterations, so the fold takes the exact path and equals the exact fold bit for bit."""
    shape, k = (600, 240), 24
    first = finetune_like(shape, 0, rank=4)
    current = stage1.fold(None, first, k)      # 4 strong components, 20 from the noise bulk
    delta = finetune_like(shape, 1, rank=4)
    fast = stage1.fold(current, delta, k, svd="randomized")
    exact = stage1.fold(current, delta, k, svd="exact")
    assert fast.stats.svd_method == "randomized->exact" and math.isinf(fast.stats.svd_error)
    assert torch.equal(fast.U, exact.U) and torch.equal(fast.s, exact.s) and torch.equal(fast.V, exact.V)


def test_certify_counts_what_enters_and_refuses_an_unclear_boundary():
    floors = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    held_sq = torch.tensor([14.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    theta = torch.tensor([5.0, 2.5, 1.0, 0.5], dtype=torch.float64)
    rho = torch.full((4,), 1e-9, dtype=torch.float64)
    e, bound, excess = entering.certify(theta, rho, floors, held_sq, False, 1e-4)
    assert e == 2 and 0 < bound < 1e-8 and excess <= 1
    # the first excluded value could be above its floor: not certified
    wide = torch.tensor([1e-9, 1e-9, 2.5, 1e-9], dtype=torch.float64)
    assert entering.certify(theta, wide, floors, held_sq, False, 1e-4)[2] > 1
    # everything in the block enters and the block does not span the range: where it stops is unseen
    assert entering.certify(theta[:2], rho[:2], floors[:2], held_sq[[0, 1, 3]], False, 1e-4)[2] == math.inf
    # nothing enters: exact
    assert entering.certify(theta / 10, rho, floors, held_sq, False, 1e-4) == (0, 0.0, pytest.approx(0.0, abs=1e-6))


def test_a_stalled_certificate_is_hopeless_and_a_converging_one_is_not():
    assert not entering._hopeless([(2, 3000.0), (4, 20.0)])     # predicted at about 5 steps
    assert entering._hopeless([(2, 50.0), (4, 45.0)])           # predicted far beyond the last step count
    assert entering._hopeless([(2, math.inf), (4, math.inf)])
    assert entering._hopeless([(2, 44.0), (4, math.inf)])      # worse: the boundary moved into a flat part
    assert not entering._hopeless([(2, math.inf), (4, 30.0)])


def test_the_attempt_is_skipped_where_the_last_fold_filled_its_block_and_backs_off_after_fallbacks():
    shape, k = (3072, 768), 76          # a block of 76 // 2 + 8 = 46 columns: 22 entering fill it, 21 do not
    assert entering.worth_attempting(shape, k, None, 0, 1)
    assert entering.worth_attempting(shape, k, 21, 0, 1)
    assert not entering.worth_attempting(shape, k, 22, 0, 1)
    assert not entering.worth_attempting(shape, k, 76, 0, 1)
    assert entering.worth_attempting((12, 10), 5, 5, 0, 1)    # the block spans the whole range: nothing to fill
    due = [[c for c in range(1, 33) if entering.worth_attempting(shape, k, 10, f, c)] for f in (0, 1, 2, 5)]
    assert due[0] == list(range(1, 33))
    assert due[1] == list(range(2, 33, 2)) and due[2] == list(range(4, 33, 4)) and due[3] == [8, 16, 24, 32]
    assert [entering.failed_after(2, m) for m in ("randomized", "randomized->exact", "exact")] == [0, 3, 2]
