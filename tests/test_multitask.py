"""The merged model without Stage 2 and the multi-task metric (``evaluate.merged``, ``evaluate.multitask``,
arrival orders in ``evaluate.plan``), against plain float64 references on random task vectors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from axis_stream.config import ConfigError
from axis_stream.core import continual, stage1
from axis_stream.experiments.evaluate import merged
from axis_stream.experiments.evaluate.experiment import load_experiment
from axis_stream.experiments.evaluate.multitask import backward_transfer
from axis_stream.experiments.evaluate.plan import arrival, order_variants, plan

SHAPES = [(6, 6), (9, 4), (4, 11)]


def sources(shape: tuple[int, int], count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` task vectors of a model with one matrix ``w`` and one vector ``b``, in float64."""
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(shape, generator=g, dtype=torch.float64),
             "b": torch.randn(shape[0], generator=g, dtype=torch.float64)} for _ in range(count)]


def ref_tsvm(mats: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M's merged matrix as its paper writes it: per task the top min(m, n) / T components, the
    stacked U and V each replaced by their polar factor, recombined with the stacked singular values."""
    k = min(mats[0].shape) // len(mats)
    parts = [torch.linalg.svd(m, full_matrices=False) for m in mats]
    u = torch.cat([p[0][:, :k] for p in parts], 1)
    v = torch.cat([p[2][:k].T for p in parts], 1)
    s = torch.cat([p[1][:k] for p in parts])

    def polar(x):
        a, _, b = torch.linalg.svd(x, full_matrices=False)
        return a @ b
    return polar(u) @ torch.diag(s) @ polar(v).T


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_merged_deltas_are_the_full_merges_and_axis_its_top_k(shape):
    tvs = sources(shape, 3)
    ws = [tv["w"] for tv in tvs]
    mean_b = sum(tv["b"] for tv in tvs) / 3

    def delta(method, **params):
        return merged.merged_delta(method, tvs, {"w"}, params=params, k_fraction=0.5, seed=0)

    ta = delta("ta", lam=0.4)
    assert torch.allclose(ta["w"], 0.4 * sum(ws), atol=1e-10) and torch.allclose(ta["b"], 0.4 * sum(t["b"] for t in tvs))
    avg = delta("average")
    assert torch.allclose(avg["w"], sum(ws) / 3, atol=1e-10) and torch.allclose(avg["b"], mean_b)
    tsvm = delta("tsvm")
    assert torch.allclose(tsvm["w"], ref_tsvm(ws), atol=1e-9) and torch.allclose(tsvm["b"], mean_b)
    # AXIS: the streaming fold's top-K as stored (K = floor(0.5 * min(m, n))), not the full sum: each
    # fold keeps the K largest of the rank-one components of the basis so far and of the new matrix
    axis = delta("axis")
    k = stage1.k_for(shape, 0.5)
    current = torch.zeros(shape, dtype=torch.float64)
    for w in ws:
        pool = []
        for m in (current, w):
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            pool += [(float(s[j]), torch.outer(u[:, j] * s[j], vh[j])) for j in range(k)]
        current = sum(c for _, c in sorted(pool, key=lambda p: -p[0])[:k])
    assert torch.linalg.matrix_rank(axis["w"]) == k
    assert torch.allclose(axis["w"], current, atol=1e-9) and torch.allclose(axis["b"], mean_b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", list(continual.RULES))
def test_one_pass_over_a_stream_gives_each_prefix_merge(shape, rule):
    """Step t of one pass is the rule's merge of the first t sources folded from scratch; the state stays one tensor each."""
    tvs = sources(shape, 4, seed=1)
    steps = list(merged.stream(rule, tvs, {"w"}, params={}))
    assert [s.count for s in steps] == [1, 2, 3, 4]
    for step in steps:
        ref = continual.merge_stream(rule, tvs[:step.count], {"w"})
        for name in ("w", "b"):
            assert torch.allclose(step.delta[name], ref[name], atol=1e-10), (rule, step.count, name)
        assert step.state_bytes == 8 * (shape[0] * shape[1] + shape[0])
    assert merged.merged_delta(rule, tvs, {"w"}, params={}, k_fraction=0.1, seed=0)["w"].equal(steps[-1].delta["w"])


def test_a_batch_stream_keeps_its_sources_and_merges_each_prefix():
    tvs = sources((5, 3), 3, seed=2)
    steps = list(merged.stream("ta", tvs, {"w"}, params={"lam": 1.0}))
    for step in steps:
        assert torch.allclose(step.delta["w"], sum(tv["w"] for tv in tvs[:step.count]), atol=1e-10)
        assert step.state_bytes == step.count * 8 * (15 + 5)


def test_backward_transfer_and_with_base():
    assert backward_transfer([0.8], [0.8]) == 0.0
    assert backward_transfer([0.5, 0.6, 0.9], [0.7, 0.8, 0.9]) == pytest.approx(-0.2)
    assert backward_transfer([0.9, 0.7], [0.6, 0.7]) == pytest.approx(0.3)
    base = {"w": torch.ones(2, 2, dtype=torch.float16), "n": torch.tensor([3])}
    out = merged.with_base(base, {"w": torch.full((2, 2), 0.5)})
    assert out["w"].dtype == torch.float16 and out["w"].eq(1.5).all() and out["n"] is base["n"]


def test_order_free_merges():
    assert not merged.order_free("axis") and not merged.order_free("opcm") and not merged.order_free("continual-ties")
    assert all(merged.order_free(m) for m in ("ta", "ties", "tsvm", "axis-global", "continual-ta", "running-average"))


EXPERIMENT = """suite = "text"
levels = [1, 2]
orders = [0, 1, 2]
multitask = true
[[sources]]
name = "s{0}"
[[sources]]
name = "s{1}"
[[sources]]
name = "s{2}"
[[sources]]
name = "s{3}"
[[targets]]
name = "t"
dataset = "living"
[[methods]]
name = "axis"
[[methods]]
name = "ta"
[[methods]]
name = "ta"
label = "ta-merged"
stage2 = false
[[methods]]
name = "zeroshot"
"""


def test_orders_variants_and_the_merged_only_plan(tmp_path: Path):
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT.format(0, 1, 2, 3))
    exp = load_experiment(path)
    names = [s.name for s in exp.sources]
    assert [s.name for s in arrival(exp.sources, 0)] == names
    assert [s.name for s in arrival(exp.sources, 2)] == random.Random(2).sample(names, 4) != names
    variants = order_variants(exp)
    assert [k for k, _ in variants] == [0, 1, 2]
    for k, v in variants:
        assert v.output_dir == exp.output_dir / f"order-{k}" and v.orders == [k]
        assert [s.name for s in v.sources] == [s.name for s in arrival(exp.sources, k)]
    # order-free ta and the source-free zero-shot are trained in order 0 only; the merged-only ta stays
    assert [m.label for m in variants[0][1].methods] == ["axis", "ta", "ta-merged", "zeroshot"]
    assert [m.label for m in variants[1][1].methods] == ["axis", "ta-merged"]
    runs = plan(variants[0][1])
    mine = [r for r in runs if r.method.label == "ta-merged"]
    assert [(len(r.sources), r.budget) for r in mine] == [(1, 0.0), (2, 0.0)]
    assert {r.budget for r in runs if r.method.label == "ta"} == {0.1, 0.2, 0.4}
    single = tmp_path / "one.toml"
    single.write_text(EXPERIMENT.format(0, 1, 2, 3).replace("orders = [0, 1, 2]", "orders = [0]"))
    one = load_experiment(single)
    assert order_variants(one) == [(0, one)]


@pytest.mark.parametrize("old,new,message", [
    ('label = "ta-merged"\n', 'label = "ta-merged"\nlr = 0.1\n', r"methods\[2\].lr: a merge with stage2 = false"),
    ('name = "zeroshot"\n', 'name = "zeroshot"\nstage2 = false\n', r"methods\[3\].stage2: only a Stage 1 merge"),
    ("stage2 = false", 'stage2 = "no"', r"methods\[2\].stage2: expected true or false"),
    ("orders = [0, 1, 2]", "orders = [0, 1, 1]", "orders: expected distinct"),
    ('suite = "text"\n', "", "multitask: needs a suite"),
])
def test_bad_continual_settings_name_the_file_and_the_key(tmp_path: Path, old, new, message):
    path = tmp_path / "exp.toml"
    text = EXPERIMENT.format(0, 1, 2, 3)
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(path)
    assert str(path) in str(info.value)
