"""Each merge method against a plain float64 dense reference written here, on small random tensors."""

import pytest
import torch

from axis_stream.core import elementwise, merges, stage1

SHAPES = [(12, 12), (20, 8), (8, 30)]


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def ref_trim(x, density):
    """Keep the int(density * numel) largest |x| by sorting, one entry at a time."""
    flat = x.flatten().tolist()
    keep = int(density * len(flat) + 1e-9)
    order = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:keep]
    out = [0.0] * len(flat)
    for i in order:
        out[i] = flat[i]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def ref_ties(deltas, density, lam):
    trimmed = [ref_trim(d, density).flatten().tolist() for d in deltas]
    out = []
    for j in range(len(trimmed[0])):
        vals = [t[j] for t in trimmed]
        total = sum(vals)
        sign = 1.0 if total > 0 else -1.0
        agree = [v for v in vals if v * sign > 0]
        out.append(lam * sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(deltas[0].shape)


@pytest.mark.parametrize("shape", SHAPES + [(7,)])
def test_task_arithmetic_and_average(shape):
    deltas = [rand(shape, s) for s in range(4)]
    dense = deltas[0] + deltas[1] + deltas[2] + deltas[3]
    assert rel(elementwise.task_arithmetic(deltas, lam=0.3), 0.3 * dense) < 1e-12
    assert rel(elementwise.average(deltas), dense / 4) < 1e-12


@pytest.mark.parametrize("shape", SHAPES + [(9,)])
@pytest.mark.parametrize("density,lam", [(0.2, 1.0), (0.5, 0.7), (1.0, 1.0)])
def test_ties_matches_reference(shape, density, lam):
    deltas = [rand(shape, s) for s in range(3)]
    assert rel(elementwise.ties(deltas, density, lam), ref_ties(deltas, density, lam)) < 1e-12


def test_ties_trim_keeps_exact_count_and_disjoint_mean_by_hand():
    a = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    b = torch.tensor([-1.0, -2.0, 4.0, 0.1], dtype=torch.float64)
    # density 0.5 keeps two entries each: a -> [3, 0, 0, 2], b -> [0, -2, 4, 0]
    out = elementwise.ties([a, b], density=0.5, lam=1.0)
    assert torch.equal(out, torch.tensor([3.0, -2.0, 4.0, 2.0], dtype=torch.float64))
    c = torch.tensor([-5.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    out = elementwise.ties([a, c], density=0.5, lam=2.0)  # c -> [-5, 0, 1, 0]: entry 0 elects "-"
    assert torch.equal(out, torch.tensor([-10.0, 0.0, 2.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_dare_with_fixed_seed_matches_reference(shape, p):
    deltas = [rand(shape, s) for s in range(3)]
    gen = torch.Generator().manual_seed(123)
    dropped = []
    for d in deltas:
        keep = torch.rand(shape, generator=gen, dtype=torch.float64) >= p
        dropped.append(d * keep / (1 - p))
    out = elementwise.dare(deltas, p=p, combine="average", seed=123)
    assert rel(out, sum(dropped) / 3) < 1e-12
    out_ties = elementwise.dare(deltas, p=p, combine="ties", seed=123, density=0.5, lam=0.8)
    assert rel(out_ties, ref_ties(dropped, 0.5, 0.8)) < 1e-12
    assert torch.equal(elementwise.dare(deltas, p=p, seed=123), out)  # same seed, same draw
    if p > 0:
        assert not torch.equal(elementwise.dare(deltas, p=p, seed=124), out)


def test_dare_drops_about_p_and_rescales_kept_entries():
    d = torch.ones(200, 200, dtype=torch.float64)
    (out,) = elementwise.dare_drop([d], p=0.3, seed=0)
    kept = out != 0
    assert abs(float(kept.double().mean()) - 0.7) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))


def polar_reference(x):
    """The nearest orthonormal-column matrix written as X (X^T X)^(-1/2), via an eigendecomposition."""
    w, q = torch.linalg.eigh(x.T @ x)
    return x @ (q * w.rsqrt()) @ q.T


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tasks", [1, 2, 3])
def test_tsvm_matches_reference(shape, tasks):
    deltas = [rand(shape, s) for s in range(tasks)]
    k = int(min(shape) / tasks)
    U, s, V = merges.tsvm_factors(deltas, alpha=1.0)
    assert U.shape == (shape[0], tasks * k) and V.shape == (shape[1], tasks * k) and s.shape == (tasks * k,)
    eye = torch.eye(tasks * k, dtype=torch.float64)
    assert torch.allclose(U.T @ U, eye, atol=1e-10)
    assert torch.allclose(V.T @ V, eye, atol=1e-10)
    blocks_u, blocks_s, blocks_v = [], [], []
    for d in deltas:
        u, sv, vh = torch.linalg.svd(d)
        blocks_u.append(u[:, :k])
        blocks_s.append(sv[:k])
        blocks_v.append(vh[:k].T)
    ref = (polar_reference(torch.cat(blocks_u, 1)) * torch.cat(blocks_s)) @ polar_reference(torch.cat(blocks_v, 1)).T
    assert rel((U * s) @ V.T, ref) < 1e-8
    assert torch.allclose(s, torch.cat(blocks_s))
    U2, s2, V2 = merges.tsvm_factors(deltas, alpha=0.5)
    assert rel((U2 * s2) @ V2.T, 0.5 * ref) < 1e-8


def test_tsvm_rejects_more_tasks_than_rank():
    with pytest.raises(ValueError, match="TSV-M needs"):
        merges.tsvm_factors([rand((3, 5), s) for s in range(4)])


def best_rank_k(dense, k):
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def random_state(seed):
    return {
        "blk.0.attn.in_proj_weight": rand((24, 8), seed),
        "blk.0.mlp.c_fc.weight": rand((16, 8), seed + 100),
        "blk.0.mlp.c_fc.bias": rand((16,), seed + 200),
        "ln.weight": rand((8,), seed + 300),
        "frozen.weight": torch.zeros(8, 8, dtype=torch.float64),
        "counter": torch.tensor(3),
    }


MATS = ["blk.0.attn.in_proj_weight", "blk.0.mlp.c_fc.weight"]


@pytest.mark.parametrize("method,dense_rule", [
    ("ta", lambda ds, seed: elementwise.task_arithmetic(ds, 0.3)),
    ("average", lambda ds, seed: elementwise.average(ds)),
    ("ties", lambda ds, seed: ref_ties(ds, 0.2, 1.0)),
    ("dare", lambda ds, seed: elementwise.dare(ds, 0.5, seed=seed)),
])
def test_build_basis_dense_methods_keep_top_k_of_the_merge(method, dense_rule):
    tvs = [random_state(s) for s in range(3)]
    factors, means = merges.build_basis(method, tvs, MATS, k_fraction=0.5, seed=7)
    assert set(factors) == set(MATS)
    for name in MATS:
        f = factors[name]
        k = stage1.k_for(tvs[0][name].shape, 0.5)
        assert f.rank == k
        dense = dense_rule([tv[name] for tv in tvs], merges.tensor_seed(7, name))
        assert rel(f.to_dense(), best_rank_k(dense, k)) < 1e-8
        assert torch.allclose(f.U.T @ f.U, torch.eye(k, dtype=f.U.dtype), atol=1e-10)
    assert set(means) == {"blk.0.mlp.c_fc.bias", "ln.weight"}  # zero merges and integer tensors left out
    for name, value in means.items():
        assert rel(value, dense_rule([tv[name] for tv in tvs], merges.tensor_seed(7, name))) < 1e-12


def test_build_basis_axis_methods_are_stage1():
    tvs = [random_state(s) for s in range(3)]
    name = MATS[0]
    deltas = [tv[name] for tv in tvs]
    k = stage1.k_for(deltas[0].shape, 0.25)
    factors, means = merges.build_basis("axis-global", tvs, MATS, k_fraction=0.25,
                                        params={"strategy": "bottom", "final_svd": False})
    assert rel(factors[name].to_dense(), stage1.merge(deltas, k, strategy="bottom", final_svd=False).to_dense()) < 1e-12
    assert rel(means["ln.weight"], sum(tv["ln.weight"] for tv in tvs) / 3) < 1e-12
    streamed, _ = merges.build_basis("axis", tvs, MATS, k_fraction=0.25)
    ref = None
    for d in deltas:
        ref = stage1.fold(ref, d, k)
    assert rel(streamed[name].to_dense(), ref.to_dense()) < 1e-12
    tsvm, _ = merges.build_basis("tsvm", tvs, MATS, k_fraction=0.25)
    U, s, V = merges.tsvm_factors(deltas)
    assert rel(tsvm[name].to_dense(), best_rank_k((U * s) @ V.T, k)) < 1e-8


def test_axis_tree_with_one_shard_is_streaming_and_with_more_the_tree_of_the_streamed_shards():
    tvs = [random_state(s) for s in range(5)]
    name = MATS[0]
    deltas = [tv[name] for tv in tvs]
    k = stage1.k_for(deltas[0].shape, 0.25)
    streamed, streamed_means = merges.build_basis("axis", tvs, MATS, k_fraction=0.25)
    one, one_means = merges.build_basis("axis-tree", tvs, MATS, k_fraction=0.25, params={"shards": 1})
    assert all(torch.equal(getattr(one[n], p), getattr(streamed[n], p)) for n in MATS for p in "UsV")
    assert all(torch.equal(one_means[n], streamed_means[n]) for n in streamed_means)
    tree, _ = merges.build_basis("axis-tree", tvs, MATS, k_fraction=0.25, params={"shards": 3})
    parts = [merges.axis_stream(deltas[a:b], k) for a, b in ((0, 1), (1, 3), (3, 5))]
    want = stage1.fold_factors(stage1.fold_factors(parts[0], parts[1], k), parts[2], k)
    assert rel(tree[name].to_dense(), want.to_dense()) < 1e-12
    assert rel(tree[name].to_dense(), streamed[name].to_dense()) > 1e-6       # a tree is not the stream
    with pytest.raises(ValueError, match="shards must be an integer >= 1"):
        merges.build_basis("axis-tree", tvs, MATS, params={"shards": 0})


def test_build_basis_rejects_unknown_method_and_parameter():
    tvs = [random_state(0)]
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        merges.build_basis("nope", tvs, MATS)
    with pytest.raises(ValueError, match="no parameter\\(s\\) lamda"):
        merges.build_basis("ta", tvs, MATS, params={"lamda": 1.0})


def test_registry_names_every_method_with_a_paper():
    assert {"axis", "axis-global", "axis-tree", "ta", "average", "ties", "dare", "tsvm"} <= set(merges.METHODS)
    assert all(m.paper for m in merges.METHODS.values())
    with pytest.raises(ValueError, match="already registered"):
        merges.register(merges.METHODS["ta"])


def test_corrupt_noise_std_is_half_the_frobenius_norm():
    d = rand((60, 50), 0)
    noisy = merges.corrupt(d, seed=1, scale=0.5)
    noise = noisy - d
    expected = 0.5 * float(torch.linalg.matrix_norm(d))
    assert abs(float(noise.std()) / expected - 1) < 0.03
    assert abs(float(noise.mean())) < 0.05 * expected
    assert torch.equal(merges.corrupt(d, seed=1), noisy)


def test_magnitude_prune_zeroes_the_smallest_entries():
    d = torch.tensor([[0.1, -4.0, 2.0], [0.3, -0.2, 5.0]], dtype=torch.float64)
    out = merges.magnitude_prune(d, 0.5)
    assert torch.equal(out, torch.tensor([[0.0, -4.0, 2.0], [0.0, 0.0, 5.0]], dtype=torch.float64))
    assert torch.equal(merges.magnitude_prune(d, 0.0), d)
    assert not merges.magnitude_prune(d, 1.0).any()
