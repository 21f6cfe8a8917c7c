"""Continual merges (``core.continual``) against plain float64 references written from FusionBench's rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from axis_stream.core import continual, merges, stage1

SHAPES = [(6, 6), (9, 4), (4, 11)]


def sources(shape: tuple[int, int], count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` task vectors of a model with one matrix ``w`` and one vector ``b``, in float64."""
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(shape, generator=g, dtype=torch.float64),
             "b": torch.randn(shape[0], generator=g, dtype=torch.float64)} for _ in range(count)]


def ref_ties_sum(a: np.ndarray, b: np.ndarray, density: float) -> np.ndarray:
    """TIES with a disjoint sum over two task vectors, entry by entry."""
    def trim(x):
        keep = int(density * x.size + 1e-9)
        out = np.zeros_like(x)
        idx = np.argsort(-np.abs(x).ravel(), kind="stable")[:keep]
        out.ravel()[idx] = x.ravel()[idx]
        return out

    ta, tb = trim(a), trim(b)
    sign = np.sign(ta + tb)
    majority = np.sign(sign.sum()) or 1.0
    sign[sign == 0] = majority
    total = np.zeros_like(a)
    for t in (ta, tb):
        total += np.where(np.sign(t) == sign, t, 0.0) * (t != 0)
    return total


def ref_opcm(tvs: list[dict[str, np.ndarray]], alpha: float) -> dict[str, np.ndarray]:
    """OPCM exactly as FusionBench's ``OPCMForCLIP.run`` writes it: a normalised merged task vector and lambda."""
    def norm(tv):
        return np.sqrt(sum(float((x ** 2).sum()) for x in tv.values()))

    merged = {k: v.copy() for k, v in tvs[0].items()}
    norms, prev_lambda = [norm(tvs[0])], 1.0
    for tv in tvs[1:]:
        norms.append(norm(tv))
        avg = float(np.mean(norms))
        new = {}
        for k, tau in tv.items():
            if tau.ndim == 2:
                u, s, vh = np.linalg.svd(merged[k], full_matrices=True)
                split = int(np.argmax(np.cumsum(s) / s.sum() > alpha))
                p = u.T @ tau @ vh.T
                np.fill_diagonal(p, 0.0)
                p[:split, :split] = 0.0
                new[k] = prev_lambda * merged[k] + u @ p @ vh
            else:
                new[k] = prev_lambda * merged[k] + tau
        n = norm(new)
        prev_lambda = n / avg
        merged = {k: v * (avg / n) for k, v in new.items()}
    return merged


def as_numpy(tvs):
    return [{k: v.numpy() for k, v in tv.items()} for tv in tvs]


def close(a: torch.Tensor, b: np.ndarray, tol: float = 1e-10) -> bool:
    return float(np.abs(a.numpy() - b).max()) <= tol * max(1.0, float(np.abs(b).max()))


@pytest.mark.parametrize("shape", SHAPES)
def test_continual_task_arithmetic_and_running_average_are_the_batch_rules(shape):
    tvs = sources(shape, 5)
    ta = continual.merge_stream("continual-ta", tvs, {"w"}, lam=0.3)
    avg = continual.merge_stream("running-average", tvs, {"w"})
    for k in ("w", "b"):
        stacked = np.stack([tv[k].numpy() for tv in tvs])
        assert close(ta[k], 0.3 * stacked.sum(0))
        assert close(avg[k], stacked.mean(0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_continual_ties_folds_pairwise_with_a_disjoint_sum(shape, density):
    tvs = sources(shape, 4, seed=1)
    got = continual.merge_stream("continual-ties", tvs, {"w"}, density=density, lam=0.5)
    for k in ("w", "b"):
        ref = 0.5 * tvs[0][k].numpy()
        for tv in tvs[1:]:
            ref = ref + 0.5 * ref_ties_sum(ref, tv[k].numpy(), density)
        assert close(got[k], ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9])
def test_opcm_matches_fusionbench_formulation(shape, alpha):
    tvs = sources(shape, 5, seed=2)
    got = continual.merge_stream("opcm", tvs, {"w"}, alpha=alpha)
    ref = ref_opcm(as_numpy(tvs), alpha)
    for k in ("w", "b"):
        assert close(got[k], ref[k], 1e-9)


def test_opcm_removes_what_lies_along_the_merged_directions():
    """A new source equal to the merged matrix's top direction is projected away (zeroed diagonal)."""
    running = torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[0, 0] = 2.0
    delta[2, 1] = 1.0                                   # off the diagonal, outside the split block
    cleaned = continual.opcm_clean(running, delta, alpha=0.5)
    assert abs(float(cleaned[0, 0])) < 1e-12
    assert abs(float(cleaned[2, 1]) - 1.0) < 1e-12


def test_the_state_stays_bounded_and_counts_the_sources():
    tvs = sources((7, 5), 12, seed=3)
    state = None
    for tv in tvs:
        state = continual.fold(state, tv, {"w"}, "opcm")
    assert state.count == 12
    assert {k: tuple(t.shape) for k, t in state.tensors.items()} == {"w": (7, 5), "b": (7,)}
    norms = [float(np.sqrt(sum((x ** 2).sum() for x in tv.values()))) for tv in as_numpy(tvs)]
    assert abs(state.mean_norm - float(np.mean(norms))) < 1e-9


def test_unknown_rule_and_parameter_are_clear_errors():
    tvs = sources((4, 4), 2)
    with pytest.raises(ValueError, match="unknown continual merge 'nope'"):
        continual.merge_stream("nope", tvs, {"w"})
    with pytest.raises(ValueError, match="'opcm' has no parameter"):
        continual.merge_stream("opcm", tvs, {"w"}, lam=1.0)


def test_build_basis_offers_the_continual_merges_as_stage1_bases():
    tvs = sources((10, 8), 4, seed=4)
    merged = continual.merge_stream("opcm", tvs, {"w"})
    factors, means = merges.build_basis("opcm", tvs, ["w"], k_fraction=0.5)
    k = stage1.k_for((10, 8), 0.5)
    f = factors["w"]
    dense = f.U @ torch.diag(f.s) @ f.V.mT
    u, s, vh = np.linalg.svd(merged["w"].numpy())
    assert close(dense, (u[:, :k] * s[:k]) @ vh[:k], 1e-9)
    assert close(means["b"], merged["b"].numpy())
    assert {"opcm", "continual-ta", "continual-ties", "running-average"} <= set(merges.METHODS)
