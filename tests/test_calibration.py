"""The calibrated basis (core/calibration.py, its statistics in store/folding.py and store/basis.py),
against float64 references on random task matrices of several shapes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from axis_stream import config
from axis_stream.config import BasisConfig
from axis_stream.core import calibration, layout, stage1
from axis_stream.core.calibration import CALIBRATIONS, SourceStats
from axis_stream.store.basis import Basis
from axis_stream.store.folding import calibration_stats

SHAPES = [(48, 40), (40, 96), (64, 64)]
RULES = list(CALIBRATIONS)


def stream(deltas: list[torch.Tensor], k: int) -> tuple[stage1.Factors, SourceStats]:
    """The streaming fold with its statistics, as ``store.folding.Folder.matrix`` keeps them."""
    current, stats = None, SourceStats()
    for d in deltas:
        new = stage1.fold(current, d, k, svd="exact")
        held = float(current.s.double().square().sum()) if current is not None else 0.0
        kept = min(current.rank, k - new.stats.new_kept) if current is not None else 0
        e_cur = float(current.s[:kept].double().square().sum()) if current is not None else 0.0
        e_new = new.stats.energy_kept * float(torch.linalg.matrix_norm(d.double())) ** 2
        stats = stats.after(new.stats.top_sigma, float(torch.linalg.matrix_norm(d.double())),
                            e_cur / held if held else 1.0, e_new)
        current = new
    return current, stats


def orthogonal_sources(shape, count: int, rank: int, seed: int) -> list[torch.Tensor]:
    """``count`` task matrices of rank ``rank`` on mutually orthogonal row and column spaces."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    U = torch.linalg.qr(torch.randn(m, count * rank, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, count * rank, generator=g, dtype=torch.float64)).Q
    sig = 0.5 + torch.rand(count * rank, generator=g, dtype=torch.float64)
    return [(U[:, i * rank:(i + 1) * rank] * sig[i * rank:(i + 1) * rank]) @ V[:, i * rank:(i + 1) * rank].T
            for i in range(count)]


def aligned_sources(shape, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` task matrices sharing one strong direction, each with its own weak noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape[0], 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, shape[1], generator=g, dtype=torch.float64)
    shared = u @ v / (u.norm() * v.norm())
    return [(1 + torch.rand(1, generator=g, dtype=torch.float64)) * shared
            + 0.01 * torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(count)]


def calibrated(factors: stage1.Factors, stats: SourceStats, count: int, rule: str) -> float:
    c = calibration.factor(rule, stats, count, factors.s)
    assert c is not None and 0 < c <= 1
    return c


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", RULES)
def test_one_source_is_never_calibrated(shape, rule):
    d = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    factors, stats = stream([d], stage1.k_for(shape))
    assert calibrated(factors, stats, 1, rule) == 1.0
    assert stats.sigma_max == pytest.approx(float(torch.linalg.svdvals(d)[0]), rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", ["spectral", "interference", "none"])
def test_twenty_orthogonal_sources_keep_their_strength(shape, rule):
    deltas = orthogonal_sources(shape, 20, 2, seed=1)
    factors, stats = stream(deltas, 40)
    assert calibrated(factors, stats, 20, rule) >= 0.8


def test_the_norm_rule_scales_orthogonal_sources_down_to_the_mean_norm():
    deltas = orthogonal_sources((64, 64), 20, 2, seed=2)
    factors, stats = stream(deltas, 40)
    merged = torch.linalg.matrix_norm(sum(deltas))
    mean = sum(float(torch.linalg.matrix_norm(d)) for d in deltas) / 20
    assert calibrated(factors, stats, 20, "norm") == pytest.approx(mean / float(merged), rel=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", ["spectral", "interference", "norm"])
def test_twenty_aligned_sources_are_no_stronger_than_the_strongest(shape, rule):
    deltas = aligned_sources(shape, 20, seed=3)
    k = stage1.k_for(shape)
    factors, stats = stream(deltas, k)
    strongest = max(float(torch.linalg.svdvals(d)[0]) for d in deltas)
    assert float(factors.s.max()) > 5 * strongest          # uncalibrated: the sum piles up
    c = calibrated(factors, stats, 20, rule)
    assert c * float(factors.s.max()) <= strongest * (1 + 1e-9)
    if rule == "spectral":
        assert c * float(factors.s.max()) == pytest.approx(strongest, rel=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", RULES)
def test_streaming_and_global_give_the_same_factor(shape, rule):
    # low-rank sources that all fit in K: the streaming fold and Algorithm 1 keep the same sum
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(shape[0], 2, generator=g, dtype=torch.float64)
              @ torch.randn(2, shape[1], generator=g, dtype=torch.float64) for _ in range(3)]
    k = 8
    streamed, stats = stream(deltas, k)
    merged = stage1.merge(deltas, k)
    reference = calibration.global_stats(deltas, k)
    for key in ("sigma_max", "norm_sum", "selected_energy"):
        assert getattr(stats, key) == pytest.approx(getattr(reference, key), rel=1e-9), key
    assert calibrated(streamed, stats, 3, rule) == pytest.approx(calibrated(merged, reference, 3, rule), abs=1e-6)


def test_unknown_statistics_give_no_factor_and_an_empty_matrix_gives_one():
    s = torch.tensor([3.0, 1.0])
    assert calibration.factor("spectral", None, 4, s) is None
    assert calibration.factor("none", None, 4, s) == 1.0
    assert calibration.factor("spectral", SourceStats(), 4, torch.zeros(0)) == 1.0
    assert calibration_stats({"sigma_max": 1.0, "norm_sum": 2.0}) is None
    assert calibration_stats({"sigma_max": 1.0, "norm_sum": 2.0, "selected_energy": 3.0}) == SourceStats(1.0, 2.0, 3.0)


def test_config_names_every_rule():
    assert tuple(CALIBRATIONS) == config.CALIBRATIONS
    with pytest.raises(config.ConfigError, match="basis.calibration"):
        BasisConfig(calibration="cap").validate()


# --- the basis on disk ---

def low_rank_checkpoints(base, names, count, tmp_path, aligned=False):
    """Checkpoints whose matrices change by one rank-one term each (aligned: the same term, other strengths)."""
    g = torch.Generator().manual_seed(5)
    shared = {n: (torch.randn(layout.as_matrix(base[n]).shape[0], 1, generator=g),
                  torch.randn(1, layout.as_matrix(base[n]).shape[1], generator=g)) for n in names}
    paths, deltas = [], []
    for i in range(count):
        sd, tv = {k: v.clone() for k, v in base.items()}, {}
        for n in names:
            m, k = layout.as_matrix(base[n]).shape
            u, v = shared[n] if aligned else (torch.randn(m, 1, generator=g), torch.randn(1, k, generator=g))
            tv[n] = 0.05 * (1 + i / count) * (u @ v) / (u.norm() * v.norm())
            sd[n] = base[n] + tv[n].reshape(base[n].shape)
        paths.append(tmp_path / f"src-{i}.safetensors")
        save_file(sd, paths[-1])
        deltas.append({n: layout.as_matrix(sd[n].double() - base[n].double()) for n in names})
    return paths, deltas


def make_basis(tiny_base, tmp_path, name, **kw):
    _, base = tiny_base
    settings = BasisConfig(matrix_patterns=["visual.transformer.resblocks.*.attn.in_proj_weight",
                                            "visual.transformer.resblocks.*.mlp.c_fc.weight"], svd="exact", **kw)
    return Basis.create(tmp_path / name, base, settings, {"name": "axis-tiny"})


def test_the_basis_keeps_the_global_statistics_and_calibrates_what_it_materializes(tiny_base, tmp_path):
    _, base = tiny_base
    basis = make_basis(tiny_base, tmp_path, "b")
    names = list(basis.manifest["matrices"])
    paths, deltas = low_rank_checkpoints(base, names, 4, tmp_path, aligned=True)
    for p in paths:
        record = basis.fold_checkpoint(p)
    snap = basis.load()
    dense = basis.materialize()
    for n in names:
        info, k = snap.manifest["matrices"][n], snap.manifest["matrices"][n]["k"]
        want = calibration.global_stats([d[n] for d in deltas], k)
        assert calibration_stats(info).sigma_max == pytest.approx(want.sigma_max, rel=1e-5)
        assert calibration_stats(info).norm_sum == pytest.approx(want.norm_sum, rel=1e-5)
        assert calibration_stats(info).selected_energy == pytest.approx(want.selected_energy, rel=1e-4)
        c = snap.calibration[n]
        assert c == pytest.approx(want.sigma_max / float(snap.factors[n].s.max()), rel=1e-5) and c < 0.5
        assert record.matrices[n]["calibration"] == pytest.approx(c, rel=1e-9)
        assert torch.allclose(dense[n].double(), (c * snap.factors[n].to_dense().double()).reshape(base[n].shape),
                              atol=1e-7)
    assert record.calibration == pytest.approx(min(snap.calibration.values()))
    assert f"calibrated down to {record.calibration:.3f}" in record.line()
    summary = basis.calibration_summary()
    assert summary["rule"] == "spectral" and summary["max"] < 0.5
    assert summary["factors"] == pytest.approx({n: snap.calibration[n] for n in names})


def test_calibration_none_is_the_papers_sum_bit_for_bit(tiny_base, tmp_path):
    _, base = tiny_base
    plain, capped = make_basis(tiny_base, tmp_path, "plain", calibration="none"), make_basis(tiny_base, tmp_path, "cap")
    paths, _ = low_rank_checkpoints(base, list(plain.manifest["matrices"]), 3, tmp_path, aligned=True)
    for p in paths:
        plain.fold_checkpoint(p)
        capped.fold_checkpoint(p)
    a, b = plain.load(), capped.load()
    assert a.calibration == {} and b.calibration
    for n, f in a.factors.items():
        assert all(torch.equal(getattr(f, x), getattr(b.factors[n], x)) for x in "UsV")
        assert torch.equal(plain.materialize()[n], f.to_dense().reshape(base[n].shape))
    # the rule is not fixed at creation: the same basis opened with another rule calibrates
    reopened = Basis.open(tmp_path / "plain", base, settings=BasisConfig(**{**a.manifest["settings"],
                                                                          "calibration": "spectral"}))
    assert reopened.load().calibration == pytest.approx(b.calibration)


def test_folding_a_basis_joins_the_statistics(tiny_base, tmp_path):
    _, base = tiny_base
    left, right, whole = (make_basis(tiny_base, tmp_path, n) for n in ("left", "right", "whole"))
    paths, deltas = low_rank_checkpoints(base, list(left.manifest["matrices"]), 4, tmp_path)
    for i, p in enumerate(paths):
        (left if i < 2 else right).fold_checkpoint(p)
        whole.fold_checkpoint(p)
    left.fold_basis(right)
    for n, info in left.manifest["matrices"].items():
        got, want = calibration_stats(info), calibration_stats(whole.manifest["matrices"][n])
        assert got.sigma_max == pytest.approx(want.sigma_max, rel=1e-6)
        assert got.norm_sum == pytest.approx(want.norm_sum, rel=1e-6)
        assert got.selected_energy == pytest.approx(want.selected_energy, rel=1e-4)
        assert math.isclose(left.load().calibration.get(n, 1.0), whole.load().calibration.get(n, 1.0), rel_tol=1e-4)


def test_a_basis_folded_before_calibration_keeps_factor_one_and_says_so(tiny_base, tmp_path):
    import json

    from axis_stream import render
    from axis_stream.store import versions

    _, base = tiny_base
    basis = make_basis(tiny_base, tmp_path, "old")
    paths, _ = low_rank_checkpoints(base, list(basis.manifest["matrices"]), 3, tmp_path, aligned=True)
    basis.fold_checkpoint(paths[0])
    # what an older axis-stream wrote: no statistics in the manifest
    path = versions.vdir(tmp_path / "old", basis.version) / versions.MANIFEST
    manifest = json.loads(path.read_text())
    for info in manifest["matrices"].values():
        for key in ("sigma_max", "norm_sum", "selected_energy"):
            del info[key]
    path.write_text(json.dumps(manifest))
    old = Basis.open(tmp_path / "old", base)
    for p in paths[1:]:
        old.fold_checkpoint(p)     # its earlier source is gone: the statistics stay unknown
    assert old.load().calibration == {}
    summary = old.calibration_summary()
    assert set(summary["factors"].values()) == {None}
    assert all(info["sigma_max"] is None for info in old.manifest["matrices"].values())
    text = "\n".join(render.basis_summary_lines(old))
    assert "folded before calibration existed keep 1" in text
