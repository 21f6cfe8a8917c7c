"""The certified randomized truncated SVD against the float64 exact path, and orthogonalize."""

import pytest
import torch

from axis_stream.core import stage1, svd


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double()))


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def spectrum_matrix(shape, seed, s: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    return (orthonormal(m, s.numel(), g) * s) @ orthonormal(n, s.numel(), g).T


def decaying(shape, seed, scale=1.0) -> torch.Tensor:
    """A task-matrix-like spectrum: singular values ``scale * j^-0.5`` over the full rank."""
    return spectrum_matrix(shape, seed, scale * torch.arange(1, min(shape) + 1, dtype=torch.float64) ** -0.5)


SHAPES = [(600, 240), (240, 600)]
K = 24


def merged_basis(shape, sources, seed) -> stage1.Factors:
    """A basis as if ``sources`` decaying task matrices had been folded: their pooled top K values."""
    g = torch.Generator().manual_seed(seed)
    pooled = torch.cat([(1 + 0.1 * i) * torch.arange(1, K + 1, dtype=torch.float64) ** -0.5 for i in range(sources)])
    s = pooled.sort(descending=True).values[:K]
    return stage1.Factors(orthonormal(shape[0], K, g), s, orthonormal(shape[1], K, g))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sources", [0, 1, 8])
def test_randomized_fold_matches_float64_exact_fold(shape, sources):
    current64 = merged_basis(shape, sources, 11) if sources else None
    current32 = current64 and stage1.Factors(current64.U.float(), current64.s.float(), current64.V.float())
    delta = decaying(shape, 7)
    exact = stage1.fold(current64, delta, K)
    fast = stage1.fold(current32, delta.float(), K, svd="randomized")
    # an empty basis: the exact path; one source: about half the new components enter, more than the
    # block takes, so the exact path too (core/entering.py)
    assert fast.stats.svd_method == {0: "exact", 1: "randomized->exact", 8: "randomized"}[sources]
    assert fast.stats.svd_error <= 1e-4 or fast.stats.svd_method == "randomized->exact"
    assert fast.stats.new_kept == exact.stats.new_kept
    assert rel(fast.to_dense(), exact.to_dense()) < 1e-4
    assert torch.allclose(fast.s.double(), exact.s, rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_randomized_singular_values_certified_against_float64(shape):
    a = decaying(shape, 3)
    U, s, V, report = svd.top_svd(a.float(), K, method="randomized", tol=1e-4)
    assert report.method == "randomized" and 0 < report.max_rel_residual <= 1e-4
    assert report.subspace < min(shape) // 2
    assert s.dtype == torch.float32 and s.numel() == K
    assert float(svd.relative_residuals(a.float(), U, s, V).max()) <= 1e-4
    exact = torch.linalg.svdvals(a)[:K]
    assert float(((s.double() - exact) / exact).abs().max()) <= 1e-4
    eye = torch.eye(K)
    assert torch.allclose(U.T @ U, eye, atol=1e-4) and torch.allclose(V.T @ V, eye, atol=1e-4)


def test_float64_reaches_a_tight_tolerance():
    a = decaying((500, 200), 4)
    U, s, V, report = svd.top_svd(a, 12, method="randomized", tol=1e-8)
    assert report.method == "randomized" and report.max_rel_residual <= 1e-8 and s.dtype == torch.float64
    U0, s0, V0, _ = svd.top_svd(a, 12)
    assert torch.allclose(s, s0, rtol=1e-8, atol=0)
    assert rel((U * s) @ V.T, (U0 * s0) @ V0.T) < 1e-6


def test_falls_back_to_exact_on_a_flat_spectrum():
    a = spectrum_matrix((300, 200), 5, torch.linspace(1.0, 0.98, 200, dtype=torch.float64)).float()
    U, s, V, report = svd.top_svd(a, 20, method="randomized", tol=1e-4)
    assert report.method == "randomized->exact"
    assert report.max_rel_residual > 1e-4
    U0, s0, V0, _ = svd.top_svd(a, 20, method="exact")
    assert torch.equal(s, s0) and torch.equal(U, U0) and torch.equal(V, V0)


def low_rank_plus_noise(shape, seed, rank=4) -> torch.Tensor:
    """A synthetic fine-tune's change: a rank-``rank`` ``1/j`` part (90 % of the energy) plus dense
    Gaussian noise (10 %), whose spectrum is flat (a Marchenko-Pastur edge) from rank ``rank + 1`` on."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    low = (orthonormal(m, rank, g) / torch.arange(1, rank + 1)) @ orthonormal(n, rank, g).T
    noise = torch.randn(m, n, generator=g, dtype=torch.float64)
    mixed = 0.9**0.5 * low / torch.linalg.matrix_norm(low) + 0.1**0.5 * noise / torch.linalg.matrix_norm(noise)
    return mixed.float()


def float64_reference(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` singular values and the rank-``k`` truncation of ``a``, from a dense float64 SVD."""
    U, s, Vh = torch.linalg.svd(a.double(), full_matrices=False)
    return s[:k], (U[:, :k] * s[:k]) @ Vh[:k]


@pytest.mark.parametrize("shape", [(600, 240), (240, 600), (256, 256), (700, 160)])
@pytest.mark.parametrize("kind", ["decaying", "noise"])
def test_randomized_matches_the_float64_svd_whatever_path_it_takes(shape, kind):
    a = decaying(shape, 12).float() if kind == "decaying" else low_rank_plus_noise(shape, 12)
    k = min(shape) // 10
    U, s, V, report = svd.top_svd(a, k, method="randomized", tol=1e-4)
    s64, trunc64 = float64_reference(a, k)
    if kind == "decaying":
        assert report.method == "randomized" and report.stop == "certified"
        assert report.max_rel_residual <= 1e-4
    else:  # flat spectrum around the k-th value: no certificate, so the exact path is used
        assert report.method == "randomized->exact" and report.stop in ("hopeless", "exhausted")
    assert s.numel() == k
    assert float(((s.double() - s64) / s64).abs().max()) <= 1e-4
    assert rel((U * s) @ V.T, trunc64) < 1e-3


def test_flat_tail_gives_up_early_and_returns_the_exact_result(monkeypatch):
    a = low_rank_plus_noise((600, 240), 0)
    U, s, V, report = svd.top_svd(a, 24, method="randomized", tol=1e-4)
    assert report.method == "randomized->exact" and report.stop == "hopeless"
    U0, s0, V0, exact = svd.top_svd(a, 24, method="exact")
    assert exact.stop == "" and exact.products == 0
    assert torch.equal(s, s0) and torch.equal(U, U0) and torch.equal(V, V0)
    # without the give-up rule the same attempt runs to its subspace budget and still fails
    monkeypatch.setattr(svd, "GIVE_UP_FACTOR", float("inf"))
    *_, full = svd.top_svd(a, 24, method="randomized", tol=1e-4)
    assert full.method == "randomized->exact" and full.stop == "exhausted" and full.max_rel_residual > 1e-4
    assert report.subspace < full.subspace and report.products < full.products


def test_the_first_fold_takes_the_exact_path_and_later_folds_the_randomized_one(monkeypatch):
    """An empty basis has no floor: all k new components enter, so there is nothing for a randomized
    attempt to prune, and on a flat tail it fails after costing more than the exact SVD."""
    a = low_rank_plus_noise((600, 240), 0)
    b = spectrum_matrix((600, 240), 7, torch.tensor([0.6, 0.3, 0.2, 0.1], dtype=torch.float64)).float()
    first = stage1.fold(None, a, K, svd="randomized")
    s64, trunc64 = float64_reference(a, K)
    assert first.stats.svd_method == "exact" and first.stats.new_kept == K
    assert float(((first.s.double() - s64) / s64).abs().max()) <= 1e-5 and rel(first.to_dense(), trunc64) < 1e-5
    second = stage1.fold(first, b, K, svd="randomized")  # a floor now: the randomized path, certified
    assert second.stats.svd_method == "randomized" and 0 < second.stats.svd_error <= 1e-4
    reference = stage1.merge([a.double(), b.double()], K).to_dense()
    assert rel(second.to_dense(), reference) < 1e-4
    # without the rule the attempt is made, fails on the flat tail, and lands on the same exact result
    monkeypatch.setattr(stage1, "FIRST_FOLD_SVD", None)
    attempted = stage1.fold(None, a, K, svd="randomized")
    assert attempted.stats.svd_method == "randomized->exact" and attempted.stats.svd_error > 1e-4
    assert torch.equal(attempted.s, first.s) and torch.equal(attempted.U, first.U)


@pytest.mark.parametrize("shape", [(600, 240), (240, 600)])
def test_decaying_spectrum_still_takes_the_fast_path(shape, monkeypatch):
    a = spectrum_matrix(shape, 13, torch.arange(1, 241, dtype=torch.float64) ** -0.3).float()  # slow decay
    first = svd.top_svd(a, K, method="randomized", tol=1e-4)
    assert first[3].method == "randomized" and first[3].stop == "certified"
    assert 0 < first[3].max_rel_residual <= 1e-4
    assert first[3].products == 2 * first[3].subspace // svd._block_width(K, 240) + 2
    # the give-up rule never fired: the attempt is bit-identical to one without it
    monkeypatch.setattr(svd, "GIVE_UP_FACTOR", float("inf"))
    second = svd.top_svd(a, K, method="randomized", tol=1e-4)
    assert all(torch.equal(x, y) for x, y in zip(first[:3], second[:3])) and first[3] == second[3]


def test_floor_keeps_only_what_can_enter_and_shrinks_the_subspace():
    a = decaying((600, 240), 6).float()
    exact = torch.linalg.svdvals(a.double())
    floor = float(exact[4] + exact[5]) / 2  # five singular values above it
    _, s, _, report = svd.top_svd(a, K, method="randomized", floor=floor)
    _, _, _, unfloored = svd.top_svd(a, K, method="randomized")
    assert report.method == "randomized" and s.numel() == 5 and bool((s > floor).all())
    assert report.subspace < unfloored.subspace
    # per-rank floors: triplet j is wanted only if s_j > floors[j]
    floors = torch.cat([torch.zeros(3), torch.full((K - 3,), float(exact[1]))])
    _, s, _, _ = svd.top_svd(a, K, method="randomized", floor=floors)
    assert s.numel() == 3
    _, s, _, report = svd.top_svd(a, K, method="randomized", floor=2 * float(exact[0]))
    assert report.method == "randomized" and s.numel() == 0
    with pytest.raises(ValueError, match="floor"):
        svd.top_svd(a, K, floor=torch.zeros(K + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_matrix_gives_its_rank(dtype):
    a = spectrum_matrix((200, 100), 10, torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64))
    U, s, V, report = svd.top_svd(a.to(dtype), 10, method="randomized")
    assert report.method == "randomized" and s.dtype == dtype and s.numel() == 5
    assert rel((U * s) @ V.T, a) < 1e-5


def test_same_seed_is_bit_identical():
    a = decaying((400, 160), 8).float()
    first = svd.top_svd(a, 16, method="randomized", seed=3)
    second = svd.top_svd(a, 16, method="randomized", seed=3)
    other = svd.top_svd(a, 16, method="randomized", seed=4)
    assert first[3].method == "randomized"
    assert all(torch.equal(x, y) for x, y in zip(first[:3], second[:3]))
    assert first[3] == second[3]
    assert not torch.equal(first[1], other[1])
    assert torch.allclose(first[1], other[1], rtol=1e-4)


def test_bad_arguments():
    a = torch.ones(8, 8)
    with pytest.raises(ValueError, match="unknown svd method"):
        svd.top_svd(a, 1, method="lanczos")
    with pytest.raises(ValueError, match="tol"):
        svd.top_svd(torch.randn(40, 40), 2, method="randomized", tol=0.0)


def test_exact_svd_of_wide_matrix_is_the_transpose_of_tall():
    a = decaying((30, 70), 9)
    U, s, V = svd.exact_svd(a)
    Vt, st, Ut = svd.exact_svd(a.T)
    assert torch.allclose(s, st, rtol=1e-12)
    assert rel((U * s) @ V.T, a) < 1e-12
    assert torch.allclose((U * s) @ V.T, ((Ut * st) @ Vt.T), atol=1e-12)


@pytest.mark.parametrize("m, n, r, rank", [
    (40, 12, 5, 5),    # tall
    (12, 40, 5, 5),    # wide
    (20, 20, 8, 8),    # square
    (30, 25, 10, 4),   # rank-deficient stacked factors
    (15, 10, 25, 10),  # more stacked columns than min(m, n)
])
def test_orthogonalize_matches_dense_svd(m, n, r, rank):
    g = torch.Generator().manual_seed(m * n + r)
    mix = torch.randn(rank, r, generator=g, dtype=torch.float64)
    U = torch.randn(m, rank, generator=g, dtype=torch.float64) @ mix
    V = torch.randn(n, r, generator=g, dtype=torch.float64)
    s = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
    dense = (U * s) @ V.T
    Uo, so, Vo = svd.orthogonalize(U, s, V)
    expected = torch.linalg.svdvals(dense)
    expected = expected[svd.numerical_rank_mask(expected, (m, n))]
    assert so.numel() == expected.numel() == min(rank, m, n)
    assert torch.allclose(so, expected, rtol=1e-10, atol=0)
    assert rel((Uo * so) @ Vo.T, dense) < 1e-12
    eye = torch.eye(so.numel(), dtype=torch.float64)
    assert torch.allclose(Uo.T @ Uo, eye, atol=1e-12) and torch.allclose(Vo.T @ Vo, eye, atol=1e-12)
    k = 3
    Uk, sk, Vk = svd.orthogonalize(U, s, V, k)
    Ud, sd, Vdh = torch.linalg.svd(dense)
    assert torch.allclose(sk, sd[:k], rtol=1e-10)
    assert rel((Uk * sk) @ Vk.T, (Ud[:, :k] * sd[:k]) @ Vdh[:k]) < 1e-10


@pytest.mark.parametrize("shape", [(7, 19), (19, 7), (64, 64), (300, 120), (120, 300)])
@pytest.mark.parametrize("kind", ["decaying", "flat-tail"])
@pytest.mark.parametrize("solver", ["scipy-syevr", "torch-eigh"])
def test_top_k_of_a_float32_matrix_matches_the_float64_svd(shape, kind, solver):
    """The top k of a float32 matrix come from its float64 Gram matrix: the rank-k result and the
    singular values match the float64 SVD to well under float32 rounding of the data, including on a
    rank-plus-noise spectrum whose k-th value sits in a flat bulk (a fine-tune's change). Both
    eigensolvers: LAPACK's subset solver (the CPU's) and torch's ``eigh`` (a GPU fold's, here on the CPU)."""
    g = torch.Generator().manual_seed(sum(shape))
    if kind == "decaying":
        a = decaying(shape, 3)
    else:
        low = orthonormal(shape[0], 3, g) @ orthonormal(shape[1], 3, g).T
        a = low + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)
    a32 = a.float()
    k = max(1, min(shape) // 3)
    ref = torch.linalg.svd(a32.double(), full_matrices=False)
    best = (ref.U[:, :k] * ref.S[:k]) @ ref.Vh[:k]
    U, s, V = svd.exact_svd(a32, k) if solver == "scipy-syevr" else svd._gram_top(a32, k, scipy_lapack=False)
    assert U.dtype == s.dtype == V.dtype == torch.float32 and s.shape == (k,)
    assert rel((U * s) @ V.T, best) < 1e-6
    assert float((s.double() - ref.S[:k]).abs().max() / ref.S[0]) < 1e-6
    assert float((U.T.double() @ U.double() - torch.eye(k, dtype=torch.float64)).abs().max()) < 1e-5
    assert float((V.T.double() @ V.double() - torch.eye(k, dtype=torch.float64)).abs().max()) < 1e-5
