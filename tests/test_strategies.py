"""Fold strategies (``core.strategies``): each one's per-tensor fold against the whole-model rules it
reuses and plain float64 references, then through the real ``Basis`` (store, rollback, reopen, Stage 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_continual import as_numpy, ref_opcm

from axis_stream import config
from axis_stream.core import continual, merges, stage1
from axis_stream.core.strategies import FOLD_STRATEGIES, Scalars

CONTINUAL = ("opcm", "continual-ta", "continual-ties", "running-average")
SHAPES = [(8, 8), (12, 5), (5, 13)]


def sources(shape: tuple[int, int], count: int, seed: int = 0, skip: int | None = None) -> list[dict]:
    """Task vectors of a model with a matrix ``w``, a second matrix ``w2`` and a vector ``b`` (float64);
    source ``skip`` leaves ``w2`` unchanged (an all-zero task matrix)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        tv = {"w": torch.randn(shape, generator=g, dtype=torch.float64),
              "w2": torch.randn(shape[::-1], generator=g, dtype=torch.float64),
              "b": torch.randn(shape[0], generator=g, dtype=torch.float64)}
        if i == skip:
            tv["w2"] = torch.zeros_like(tv["w2"])
        out.append(tv)
    return out


def fold_all(name: str, tvs: list[dict], ks: dict[str, int], params: dict | None = None):
    """Fold ``tvs`` tensor by tensor with the strategy's own interface (an all-zero delta passed as None)."""
    strategy, params = FOLD_STRATEGIES[name], params or {}
    states: dict = {}
    scalars = Scalars()
    for tv in tvs:
        for key, d in tv.items():
            d = d if bool(d.any()) else None
            if key in ks:
                states[key] = strategy.fold(states.get(key), d, ks[key], scalars.count, params, svd="exact")
            else:
                states[key] = strategy.fold_vector(states.get(key), d, scalars.count, tuple(tv[key].shape), params)
        scalars = scalars.after(math.sqrt(sum(float(t.square().sum()) for t in tv.values())))
    return strategy, states, scalars


def test_config_offers_exactly_the_registered_strategies():
    assert config.FOLD_STRATEGIES == tuple(FOLD_STRATEGIES)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CONTINUAL)
def test_continual_strategies_fold_per_tensor_as_the_whole_model_rule(name, shape):
    tvs = sources(shape, 4, seed=3, skip=2)
    ks = {"w": stage1.k_for(shape, 0.25), "w2": stage1.k_for(shape, 0.25)}
    strategy, states, scalars = fold_all(name, tvs, ks)
    assert scalars.count == 4
    want = continual.merge_stream(name, tvs, {"w", "w2"})
    got = strategy.merged(states, scalars, strategy.check({}))
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-12, atol=1e-12), key
    # Stage 2 gets what merges.build_basis gives for the same continual merge: top-K SVDs and the merged rest
    factors, means = strategy.stage2(states, scalars, ks, strategy.check({}))
    ref_factors, ref_means = merges.build_basis(name, tvs, ks, k_fraction=0.25)
    for key, k in ks.items():
        assert factors[key].rank == k
        assert torch.allclose(factors[key].to_dense(), ref_factors[key].to_dense(), atol=1e-10)
    assert torch.allclose(means["b"], ref_means["b"], atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_opcm_and_ta_against_plain_float64_references(shape):
    tvs = sources(shape, 5, seed=4)
    ks = {"w": 2, "w2": 2}
    strategy, states, scalars = fold_all("opcm", tvs, ks, {"alpha": 0.6})
    got = strategy.merged(states, scalars, strategy.check({"alpha": 0.6}))
    ref = ref_opcm(as_numpy(tvs), 0.6)
    for key in ref:
        assert float(np.abs(got[key].numpy() - ref[key]).max()) < 1e-9 * max(1.0, float(np.abs(ref[key]).max()))
    strategy, states, scalars = fold_all("continual-ta", tvs, ks, {"lam": 0.4})
    got = strategy.merged(states, scalars, strategy.check({"lam": 0.4}))
    for key in ref:
        plain = 0.4 * np.sum([tv[key].numpy() for tv in tvs], axis=0)
        assert float(np.abs(got[key].numpy() - plain).max()) < 1e-12


def test_axis_strategy_is_the_streaming_stage1_fold():
    tvs = sources((10, 7), 4, seed=5)
    ks = {"w": 3, "w2": 3}
    strategy, states, scalars = fold_all("axis", tvs, ks)
    for key in ks:
        ref = merges.axis_stream([tv[key] for tv in tvs], ks[key])
        assert torch.allclose(states[key].to_dense(), ref.to_dense(), atol=1e-10)
    assert torch.allclose(states["b"], torch.stack([tv["b"] for tv in tvs]).mean(0), atol=1e-12)
    factors, means = strategy.stage2(states, scalars, ks, {})
    assert factors["w"] is states["w"] and means["b"] is states["b"]


def test_state_size_per_matrix_is_bounded_by_the_shape_and_k():
    # a ViT-B-32 attention projection, 768 x 768 with K = 76: AXIS keeps (m + n + 1) K floats, the others m n
    assert FOLD_STRATEGIES["axis"].state_bytes((768, 768), 76) == 4 * 1537 * 76 == 467_248
    for name in CONTINUAL:
        assert FOLD_STRATEGIES[name].state_bytes((768, 768), 76) == 4 * 768 * 768 == 2_359_296
    # and the state really does not grow with the sources
    _, states, _ = fold_all("opcm", sources((6, 4), 9, seed=6), {"w": 2, "w2": 2})
    assert states["w"].numel() * 4 == FOLD_STRATEGIES["opcm"].state_bytes((6, 4), 2)


def test_unknown_strategy_and_parameter_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown fold strategy 'opcn'; expected one of axis, "):
        FOLD_STRATEGIES["opcn"]
    with pytest.raises(ValueError, match="fold strategy 'opcm' has no parameter.s. lam; known: alpha"):
        FOLD_STRATEGIES["opcm"].check({"lam": 0.3})
    with pytest.raises(ValueError, match="fold strategy 'axis' has no parameter.s. alpha; known: none"):
        FOLD_STRATEGIES["axis"].check({"alpha": 0.3})
