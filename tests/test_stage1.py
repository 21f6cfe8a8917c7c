"""Stage 1 against a plain dense float64 reference written here: SVD each, pool, sort, sum, SVD."""

import pytest
import torch

from axis_stream.core import stage1
from axis_stream.core.stage1 import Factors

SHAPES = [(12, 12), (20, 8), (8, 20), (30, 17)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b).clamp_min(1e-300))


def random_delta(shape, seed, rank=None, decay=0.9):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n) if rank is None else rank
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(r, dtype=torch.float64) * (1 + torch.rand(r, generator=g, dtype=torch.float64))
    return (u * s) @ v.T


def reference_merge(deltas, k, pick="top"):
    """The paper's Algorithm 1 written the obvious way with dense matrices."""
    triplets = []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = int(torch.linalg.matrix_rank(d))
        triplets += [(float(s[j]), u[:, j], vh[j]) for j in range(r)]
    triplets.sort(key=lambda t: -t[0] if pick == "top" else t[0])
    chosen = triplets[:k]
    return sum(s * torch.outer(u, v) for s, u, v in chosen)


def assert_orthonormal(f: Factors, atol=1e-10):
    eye = torch.eye(f.rank, dtype=f.U.dtype)
    assert torch.allclose(f.U.T @ f.U, eye, atol=atol)
    assert torch.allclose(f.V.T @ f.V, eye, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 7, 100])
def test_merge_top_matches_dense_reference(shape, k):
    deltas = [random_delta(shape, seed) for seed in range(3)]
    out = stage1.merge(deltas, k)
    assert rel(out.to_dense(), reference_merge(deltas, k)) < 1e-5
    assert out.rank <= k
    assert_orthonormal(out)
    assert torch.all(out.s[:-1] >= out.s[1:])


@pytest.mark.parametrize("shape", SHAPES)
def test_merge_rank_deficient_and_k_above_rank(shape):
    deltas = [random_delta(shape, seed, rank=2) for seed in range(3)]
    out = stage1.merge(deltas, 50)
    assert rel(out.to_dense(), reference_merge(deltas, 50)) < 1e-5
    assert out.rank == 6  # three rank-2 matrices in general position
    assert_orthonormal(out)


@pytest.mark.parametrize("shape", SHAPES)
def test_merge_bottom_matches_reference(shape):
    deltas = [random_delta(shape, seed, rank=min(shape) - 1) for seed in range(2)]
    out = stage1.merge(deltas, 3, strategy="bottom")
    assert rel(out.to_dense(), reference_merge(deltas, 3, pick="bottom")) < 1e-5


def test_merge_without_final_svd_keeps_selected_components():
    deltas = [random_delta((10, 6), seed) for seed in range(2)]
    out = stage1.merge(deltas, 4, final_svd=False)
    pooled = []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        pooled += [(float(s[j]), j) for j in range(len(s))]
    expected = sorted((s for s, _ in pooled), reverse=True)[:4]
    assert torch.allclose(out.s, torch.tensor(expected, dtype=torch.float64))
    assert rel(out.to_dense(), reference_merge(deltas, 4)) < 1e-10
    # the selected vectors come from different sources, so they are not orthogonal to each other
    assert not torch.allclose(out.U.T @ out.U, torch.eye(4, dtype=torch.float64), atol=1e-6)


def test_equal_top_takes_a_share_from_each_source():
    deltas = [random_delta((16, 16), seed, decay=0.5) * (10.0 if seed == 0 else 1.0) for seed in range(3)]
    k = 7
    out = stage1.merge(deltas, k, strategy="equal-top")
    ref = 0
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d)
        n = k // 3 + (i < k % 3)
        ref = ref + (u[:, :n] * s[:n]) @ vh[:n]
    assert rel(out.to_dense(), ref) < 1e-8
    # plain top would have taken everything from the loud source
    top = stage1.merge(deltas, k)
    assert rel(top.to_dense(), out.to_dense()) > 0.01


def test_average_top_is_svd_of_average_of_truncations():
    deltas = [random_delta((14, 9), seed) for seed in range(3)]
    k = 3
    avg = 0
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        avg = avg + (u[:, :k] * s[:k]) @ vh[:k] / 3
    u, s, vh = torch.linalg.svd(avg, full_matrices=False)
    ref = (u[:, :k] * s[:k]) @ vh[:k]
    out = stage1.merge(deltas, k, strategy="average-top")
    assert rel(out.to_dense(), ref) < 1e-8


def test_arbitrary_is_seeded():
    deltas = [random_delta((10, 10), seed) for seed in range(3)]
    a = stage1.merge(deltas, 4, strategy="arbitrary", seed=1)
    b = stage1.merge(deltas, 4, strategy="arbitrary", seed=1)
    c = stage1.merge(deltas, 4, strategy="arbitrary", seed=2)
    assert torch.equal(a.to_dense(), b.to_dense())
    assert not torch.allclose(a.to_dense(), c.to_dense())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 4, 100])
def test_fold_is_pairwise_merge(shape, k):
    deltas = [random_delta(shape, seed) for seed in range(5)]
    current = None
    reference = None
    for d in deltas:
        current = stage1.fold(current, d, k)
        pair = [d] if reference is None else [reference, d]
        reference = stage1.merge(pair, k).to_dense()
        assert rel(current.to_dense(), reference) < 1e-5
        assert_orthonormal(current)
        assert current.rank <= k


def test_fold_of_two_equals_global_merge_and_reports_distance_for_more():
    deltas = [random_delta((24, 16), seed, decay=0.8) for seed in range(6)]
    k = 4
    f = stage1.fold(stage1.fold(None, deltas[0], k), deltas[1], k)
    assert rel(f.to_dense(), stage1.merge(deltas[:2], k).to_dense()) < 1e-10
    for d in deltas[2:]:
        f = stage1.fold(f, d, k)
    gap = rel(f.to_dense(), stage1.merge(deltas, k).to_dense())
    print(f"streaming vs global Stage 1 over 6 sources: relative Frobenius distance {gap:.3e}")
    assert gap < 1.0


def test_fold_statistics():
    d1 = random_delta((20, 12), 0)
    d2 = 5 * random_delta((20, 12), 1)
    k = 3
    f1 = stage1.fold(None, d1, k)
    s1 = torch.linalg.svdvals(d1)
    assert f1.stats.new_kept == k
    assert f1.stats.energy_kept == pytest.approx(float((s1[:k] ** 2).sum() / (s1 ** 2).sum()), rel=1e-10)
    f2 = stage1.fold(f1, d2, k)  # the louder new matrix takes every slot
    s2 = torch.linalg.svdvals(d2)
    assert f2.stats.new_kept == k
    assert f2.stats.energy_kept == pytest.approx(float((s2[:k] ** 2).sum() / (s2 ** 2).sum()), rel=1e-10)
    f3 = stage1.fold(f2, d1 / 100, k)  # a quiet one takes none
    assert f3.stats.new_kept == 0 and f3.stats.energy_kept == 0.0
    assert f3.stats.svd_method == "exact"
    assert f3.U is f2.U and f3.s is f2.s and f3.V is f2.V  # untouched: the current factors themselves


def test_deterministic_bit_identical():
    deltas = [random_delta((40, 30), seed).float() for seed in range(3)]
    runs = []
    for _ in range(2):
        f = None
        for d in deltas:
            f = stage1.fold(f, d, 5, svd="randomized", tol=1.0)
        runs.append(f)
    assert torch.equal(runs[0].U, runs[1].U) and torch.equal(runs[0].s, runs[1].s)
    assert torch.equal(runs[0].V, runs[1].V)


def test_float32_is_default_work_dtype():
    d = random_delta((16, 16), 0).float()
    f = stage1.fold(None, d, 3)
    assert f.U.dtype == torch.float32
    assert stage1.merge([d.half()], 3).U.dtype == torch.float32


@pytest.mark.parametrize("bad, message", [
    (lambda: stage1.merge([torch.zeros(3, 3), torch.zeros(3, 4)], 1), "shape"),
    (lambda: stage1.merge([torch.full((3, 3), float("nan"))], 1), "NaN"),
    (lambda: stage1.fold(None, torch.tensor([[float("inf")]]), 1), "NaN or Inf"),
    (lambda: stage1.merge([torch.ones(3, 3)], 0), "k must be"),
    (lambda: stage1.fold(None, torch.ones(3, 3), -2), "k must be"),
    (lambda: stage1.merge([torch.ones(3)], 1), "1-D"),
    (lambda: stage1.fold(None, torch.ones(2, 3, 4), 1), "3-D"),
    (lambda: stage1.fold(stage1.fold(None, torch.eye(3), 1), torch.eye(4), 1), "expected (3, 3)"),
    (lambda: stage1.merge([torch.ones(3, 3)], 1, strategy="middle"), "unknown strategy"),
    (lambda: stage1.merge([], 1), "at least one"),
])
def test_bad_input_raises_value_error_saying_which(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bad()


def test_a_finite_matrix_whose_sum_overflows_is_accepted_and_one_nan_among_many_is_not():
    """The finite check starts from the sum: an overflowing sum of finite entries is no error."""
    huge = torch.full((8, 8), 3e38)
    assert torch.isinf(huge.sum())
    assert stage1.fold(None, huge, 1).shape == (8, 8)   # no "NaN or Inf" error
    one_nan = torch.randn(64, 32)
    one_nan[40, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        stage1.fold(None, one_nan, 2)


def test_k_for_and_gavish_donoho():
    assert stage1.k_for((768, 768)) == 76
    assert stage1.k_for((2304, 768), 0.2) == 153
    assert stage1.k_for((3072, 768), 0.4) == 307
    assert stage1.k_for((100, 3), 0.1) == 1
    assert stage1.k_for((100, 100), 0.29) == 29
    with pytest.raises(ValueError):
        stage1.k_for((10, 10), 0.0)
    g = torch.Generator().manual_seed(0)
    m, n, r = 200, 100, 5
    signal = (torch.randn(m, r, generator=g, dtype=torch.float64) * 20) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    noisy = signal + torch.randn(m, n, generator=g, dtype=torch.float64)
    assert stage1.gavish_donoho_rank(torch.linalg.svdvals(noisy), (m, n)) == r


def test_running_mean_equals_batch_mean():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 3, generator=g) for _ in range(9)]
    mean = None
    for i, x in enumerate(xs):
        mean = stage1.update_mean(mean, i, x)
    batch = torch.stack([x.double() for x in xs]).mean(0)
    assert mean.dtype == torch.float32
    assert torch.allclose(mean.double(), batch, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (2, 3, 4)])
def test_chunked_in_place_running_mean_equals_batch_mean(shape, monkeypatch):
    monkeypatch.setattr(stage1, "MEAN_CHUNK", 4)          # several chunks, the last one short
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(5)]
    mean = xs[0].clone()
    for i, x in enumerate(xs[1:], 1):
        stage1.update_mean_inplace(mean, i, x)
    assert torch.allclose(mean, torch.stack(xs).mean(0), atol=1e-12)
    stage1.update_mean_inplace(mean, 5, None)              # an all-zero delta
    assert torch.allclose(mean, torch.stack(xs).sum(0) / 6, atol=1e-12)


# --- folding a factored source (another basis) and the tree reduction ---

def rank_k_source(shape, seed, k):
    """A rank-k source as a basis holds it: orthonormal factors of a random matrix's top k."""
    return stage1.merge([random_delta(shape, seed)], k)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_fold_factors_matches_algorithm_1_on_the_dense_sources(shape, k):
    a, b = rank_k_source(shape, 1, k), rank_k_source(shape, 2, k)
    for current in (None, a):
        out = stage1.fold_factors(current, b, k)
        dense = [b.to_dense()] if current is None else [a.to_dense(), b.to_dense()]
        assert rel(out.to_dense(), reference_merge(dense, k)) < 1e-10
        assert_orthonormal(out) and out.rank <= k
        assert out.stats.svd_method == "factored" and out.stats.new_kept <= k


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 5])
def test_folding_a_rank_k_source_equals_folding_its_dense_matrix(shape, k):
    current = stage1.fold(stage1.fold(None, random_delta(shape, 3), k), random_delta(shape, 4), k)
    other = rank_k_source(shape, 5, k)
    factored = stage1.fold_factors(current, other, k)
    dense = stage1.fold(current, other.to_dense(), k)
    assert rel(factored.to_dense(), dense.to_dense()) < 1e-10
    assert factored.stats.new_kept == dense.stats.new_kept
    assert factored.stats.energy_kept == pytest.approx(dense.stats.energy_kept, rel=1e-9)
    quiet = Factors(other.U, other.s * 1e-6, other.V)  # none of it enters: current's own tensors come back
    same = stage1.fold_factors(current, quiet, k)
    assert same.U is current.U and same.stats.new_kept == 0


def test_fold_factors_rejects_factors_of_another_shape():
    with pytest.raises(ValueError, match=r"U has shape \(20, 2\), expected \(12, 2\)"):
        stage1.fold_factors(rank_k_source((12, 8), 0, 2), rank_k_source((20, 8), 1, 2), 2)


def test_tree_levels_and_tree_reduce_pair_neighbours_first():
    assert stage1.tree_levels(1) == []
    assert stage1.tree_levels(4) == [[(0, 1), (2, 3)], [(0, 2)]]
    assert stage1.tree_levels(5) == [[(0, 1), (2, 3)], [(0, 2)], [(0, 4)]]
    assert stage1.tree_reduce(list("abcde"), lambda x, y: f"({x}{y})") == "(((ab)(cd))e)"
    with pytest.raises(ValueError, match="at least one"):
        stage1.tree_reduce([], max)
    assert stage1.shards(list(range(7)), 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert stage1.shards([0], 2) == [[], [0]]


@pytest.mark.parametrize("shape", [(20, 8), (30, 17)])
def test_tree_of_streamed_shards_matches_the_dense_reference_tree(shape):
    """Shards streamed, then folded pairwise: each step equals Algorithm 1 on two dense matrices."""
    k = 3
    deltas = [random_delta(shape, seed) for seed in range(6)]
    shards = [deltas[:2], deltas[2:4], deltas[4:]]

    def stream(ds):
        f = None
        for d in ds:
            f = stage1.fold(f, d, k)
        return f

    tree = stage1.tree_reduce([stream(s) for s in shards], lambda a, b: stage1.fold_factors(a, b, k))
    dense_tree = stage1.tree_reduce([reference_merge([reference_merge(s[:1], k), s[1]], k) for s in shards],
                                    lambda a, b: reference_merge([a, b], k))
    assert rel(tree.to_dense(), dense_tree) < 1e-9


def test_weighted_running_mean_combines_two_means_by_their_counts():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(7)]
    combined = stage1.update_mean(torch.stack(xs[:3]).mean(0), 3, torch.stack(xs[3:]).mean(0), weight=4)
    assert torch.allclose(combined, torch.stack(xs).mean(0), atol=1e-12)
    m = torch.stack(xs[:3]).mean(0)
    one = stage1.update_mean(m, 3, xs[3])
    assert torch.equal(one, stage1.update_mean(m, 3, xs[3], weight=1))
