"""Fold strategies (``core.strategies``): each one's per-tensor fold against the whole-model rules it
reuses and plain float64 references, then through the real ``Basis`` (store, rollback, reopen, Stage 2)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_continual import as_numpy, ref_opcm
from test_daemon import drop, metric_samples, read_ledger, read_log, start, stop, wait_for, wait_ready, write_config

from axis_stream import config, errors
from axis_stream.adapt.model import SVDAdapted
from axis_stream.cli import main
from axis_stream.config import BasisConfig
from axis_stream.core import continual, layout, merges, stage1
from axis_stream.core.strategies import DENSE, FOLD_STRATEGIES, Scalars
from axis_stream.render import basis_summary_lines
from axis_stream.store import models
from axis_stream.store.basis import Basis
from axis_stream.testing import finetuned_like

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
    assert tuple(FOLD_STRATEGIES) == config.FOLD_STRATEGIES


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


# One matrix's fold as store.folding runs it (the second source into a one-matrix basis), in a fresh
# process with one torch thread: the peak RSS over the resting RSS (VmHWM reset to VmRSS just before,
# by writing 5 to /proc/self/clear_refs), plus the task matrix read before it, per entry of the matrix.
_FOLD_PEAK = """
import sys, tempfile, torch
from pathlib import Path
from safetensors.torch import save_file
from axis_stream.config import BasisConfig
from axis_stream.store.basis import Basis

name, shape = sys.argv[1], (int(sys.argv[2]), int(sys.argv[3]))
torch.set_num_threads(1)
KEY = "blocks.0.weight"

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

def second_fold(root, shape):
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    basis = Basis.create(root / "basis", {KEY: torch.zeros(shape)}, BasisConfig(strategy=name, matrix_patterns=[KEY]))
    save_file({KEY: torch.randn(shape, generator=g)}, str(root / "first.safetensors"))
    basis.fold_checkpoint(root / "first.safetensors")
    state, delta = basis._state(), torch.randn(shape, generator=g)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    resting = kib("VmRSS")
    basis._folder.matrix(state.manifest["matrices"][KEY], state.matrices[KEY], delta, state.version + 1,
                         state.scalars.count)
    return (kib("VmHWM") - resting) * 1024 + delta.numel() * 4

with tempfile.TemporaryDirectory() as d:
    second_fold(Path(d) / "warm-up", (64, 96))   # the code paths paged in
    print(second_fold(Path(d) / "measured", shape) / (shape[0] * shape[1]))
"""


def fold_peak_bytes_per_entry(strategy: str, shape: tuple[int, int]) -> float:
    """The measured working memory of one ``shape`` matrix's fold with ``strategy``, bytes per entry."""
    out = subprocess.run([sys.executable, "-c", _FOLD_PEAK, strategy, *map(str, shape)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("name", list(FOLD_STRATEGIES))
def test_a_matrix_folds_within_its_strategys_memory_estimate(name):
    # the memory budget of parallel folds counts each matrix at fold_bytes_per_entry: an estimate under
    # the real use lets backfill --workers overrun --memory-budget (OPCM's full SVD used 2.5x the old 16)
    assert 0 < fold_peak_bytes_per_entry(name, (512, 2048)) <= FOLD_STRATEGIES[name].fold_bytes_per_entry


def test_unknown_strategy_and_parameter_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown fold strategy 'opcn'; expected one of axis, "):
        FOLD_STRATEGIES["opcn"]
    with pytest.raises(ValueError, match="fold strategy 'opcm' has no parameter.s. lam; known: alpha"):
        FOLD_STRATEGIES["opcm"].check({"lam": 0.3})
    with pytest.raises(ValueError, match="fold strategy 'axis' has no parameter.s. alpha; known: none"):
        FOLD_STRATEGIES["axis"].check({"alpha": 0.3})


# --- through the real basis ---

IDENTITY = {"name": "axis-tiny", "pretrained": "test"}
PREFIXES = ("visual.", "", "visual.", "visual.")   # the second changes the text tower too: the others leave it


def fold_checkpoints(base, make_checkpoint, directory, strategy: str, seeds=(301, 302, 303, 304), **params):
    """A basis of ``strategy`` with the checkpoints of ``seeds`` folded, and their task vectors in
    float32 (what the fold reads: matrices in matrix form, every float parameter, zeros where unchanged)."""
    basis = Basis.create(directory, base, BasisConfig(svd="exact", strategy=strategy, strategy_params=params),
                         IDENTITY)
    matrices = set(basis.manifest["matrices"])
    tvs = []
    for seed, prefix in zip(seeds, PREFIXES):
        basis.fold_checkpoint(make_checkpoint(seed, prefix=prefix))
        sd = finetuned_like(base, seed, prefix=prefix)
        tvs.append({n: layout.as_matrix(d) if n in matrices else d for n, b in base.items() if b.is_floating_point()
                    for d in [sd[n].float() - b.float()]})
    return basis, tvs


def dense_of(basis: Basis, tvs: list[dict], version: int | None = None) -> dict[str, torch.Tensor]:
    """``materialize`` in matrix form, with the all-zero deltas it leaves out as zeros."""
    got = basis.materialize(version)
    return {n: got[n].reshape(t.shape) if n in got else torch.zeros_like(t) for n, t in tvs[0].items()}


def rel_err(got: torch.Tensor, want) -> float:
    want = torch.as_tensor(want, dtype=torch.float64)
    return float((got.double() - want).abs().max()) / max(float(want.abs().max()), 1e-30)


@pytest.mark.parametrize("name", CONTINUAL)
def test_a_basis_of_each_strategy_materializes_the_stream_rule_and_hands_stage2_its_top_k(
        tiny_base, make_checkpoint, tmp_path, name):
    _, base = tiny_base
    basis, tvs = fold_checkpoints(base, make_checkpoint, tmp_path / "basis", name)
    matrices = set(basis.manifest["matrices"])
    got = dense_of(basis, tvs)
    same_dtype = continual.merge_stream(name, tvs, matrices)        # the rule on the same float32 deltas
    float64 = continual.merge_stream(name, [{n: t.double() for n, t in tv.items()} for tv in tvs], matrices)
    # the state is float32: the elementwise rules agree with float64 to float32 rounding; OPCM to ~2e-4,
    # as its projection zeroes entries along individual singular vectors of the float32 running sum
    tol = 1e-3 if name == "opcm" else 1e-6
    for n, want in same_dtype.items():
        assert rel_err(got[n], want) < 1e-6, n
        assert rel_err(got[n], float64[n]) < tol, n
    snap = basis.load()
    factors, means = merges.build_basis(name, tvs, matrices, k_fraction=0.10)
    assert snap.count == 4 and snap.factors.keys() == matrices
    for n, f in factors.items():
        assert snap.factors[n].rank == f.rank == basis.manifest["matrices"][n]["k"]
        assert rel_err(snap.factors[n].to_dense(), f.to_dense()) < 1e-5, n
    assert snap.means.keys() == means.keys() and all(rel_err(snap.means[n], means[n]) < 1e-6 for n in means)
    basis.verify()


def test_opcm_and_ta_bases_against_plain_float64_references(tiny_base, make_checkpoint, tmp_path):
    _, base = tiny_base
    basis, tvs = fold_checkpoints(base, make_checkpoint, tmp_path / "opcm", "opcm", alpha=0.6)
    matrices = basis.manifest["matrices"]
    # the reference projects every 2-D tensor: the basis's non-matrix ones go in flattened (added as they are)
    tvs64 = [{n: t.double() if n in matrices else t.double().flatten() for n, t in tv.items()} for tv in tvs]
    ref = ref_opcm(as_numpy(tvs64), 0.6)
    got = dense_of(basis, tvs)
    assert max(rel_err(got[n].flatten() if n not in matrices else got[n], ref[n]) for n in ref) < 1e-3  # see above
    basis, tvs = fold_checkpoints(base, make_checkpoint, tmp_path / "ta", "continual-ta", lam=0.4)
    got = dense_of(basis, tvs)
    for n in tvs[0]:
        assert rel_err(got[n], 0.4 * np.sum([tv[n].double().numpy() for tv in tvs], axis=0)) < 1e-6, n


def test_a_dense_basis_records_neutral_fold_statistics_and_shows_its_state_size(tiny_base, make_checkpoint, tmp_path):
    _, base = tiny_base
    basis, _ = fold_checkpoints(base, make_checkpoint, tmp_path / "basis", "opcm", seeds=(311, 312))
    records, shares = basis.shares()
    assert [(r.new_kept_total, r.energy_kept) for r in records] == [(0, 0.0), (0, 0.0)]
    assert all(s["svd_method"] == DENSE and s["new_kept"] == 0 for r in records for s in r.matrices.values())
    assert all(x == 0.0 for share in shares.values() for x in share)
    assert "dense state" in records[0].line()
    infos = basis.manifest["matrices"]
    per_matrix = {n: 4 * math.prod(info["shape"]) for n, info in infos.items()}
    text = "\n".join(basis_summary_lines(basis))
    assert "strategy opcm (alpha=0.5): state per matrix a dense float32 tensor" in text
    assert f"{sum(per_matrix.values()) / 2**20:.2f} MiB at most for the {len(infos)} matrices" in text
    name = next(iter(infos))
    assert f"{per_matrix[name] / 1024:,.1f} KiB" in next(line for line in text.splitlines() if line.startswith(name))
    axis = Basis.create(tmp_path / "axis", base, BasisConfig(svd="exact"), IDENTITY)
    assert "strategy axis: state per matrix U, s, V of rank <= k" in "\n".join(basis_summary_lines(axis))


def test_rollback_refold_and_reopening_with_another_strategy(tiny_base, make_checkpoint, tmp_path):
    _, base = tiny_base
    basis, tvs = fold_checkpoints(base, make_checkpoint, tmp_path / "basis", "continual-ties", seeds=(321, 322, 323),
                                  density=0.4)
    at = {v: dense_of(basis, tvs, v) for v in (2, 3)}
    assert basis.rollback(2) == 4 and basis.count == 2
    assert all(torch.equal(dense_of(basis, tvs)[n], at[2][n]) for n in at[2])
    basis.fold_checkpoint(make_checkpoint(323, prefix=PREFIXES[2]))     # out of the ledger: folds again
    assert all(torch.equal(dense_of(basis, tvs)[n], at[3][n]) for n in at[3])
    with pytest.raises(errors.BasisError) as info:
        Basis.open(basis.directory, base, settings=BasisConfig(svd="exact"))
    assert str(info.value) == (f"{basis.directory}: built with basis.strategy = 'continual-ties', the config says "
                               f"'axis'; use a new basis directory for new settings")
    with pytest.raises(errors.BasisError, match="built with basis.strategy_params = .*'density': 0.4"):
        Basis.open(basis.directory, base, settings=BasisConfig(strategy="continual-ties"))
    same = BasisConfig(strategy="continual-ties", strategy_params={"density": 0.4, "lam": 0.5})   # lam: the default
    assert Basis.open(basis.directory, base, settings=same).version == 5
    with pytest.raises(errors.BasisError, match="fold strategy 'opcm' has no parameter.s. lam; known: alpha"):
        Basis.create(tmp_path / "other", base, BasisConfig(strategy="opcm", strategy_params={"lam": 1.0}))


def test_stage2_builds_from_a_continual_basis(tiny_base, make_checkpoint, tmp_path):
    base_cfg, base = tiny_base
    basis, tvs = fold_checkpoints(base, make_checkpoint, tmp_path / "basis", "opcm", seeds=(331, 332, 333))
    snap = basis.load()
    model = SVDAdapted(models.create_base(base_cfg), snap.factors, snap.means, 0.10)
    assert model.trainable_count() > 0
    merged = model.merged_state_dict()
    for n, b in base.items():
        want = b.float() + (snap.factors[n].to_dense().reshape(b.shape) if n in snap.factors
                            else snap.means.get(n, torch.zeros_like(b, dtype=torch.float32)))
        assert torch.allclose(merged[n].float(), want, atol=1e-5), n


def test_the_daemon_folds_with_the_configured_strategy(tiny_base, tmp_path):
    base_cfg, base = tiny_base
    path = write_config(tmp_path, base_cfg)
    path.write_text(path.read_text().replace("[basis]\n", '[basis]\nstrategy = "opcm"\n', 1))
    cfg = config.load(path, env={})
    staging = tmp_path / "staging"
    staging.mkdir()
    seeds = (341, 342)
    for seed in seeds:
        save_file(finetuned_like(base, seed), staging / f"{seed}.safetensors")
    proc = start(path)
    try:
        wait_ready(proc, cfg)
        for seed in seeds:
            drop(staging / f"{seed}.safetensors", cfg.paths.watch_dir)
        wait_for(lambda: len(read_ledger(cfg)) == 2, 60, "two folds", proc)
        wait_for(lambda: metric_samples(cfg).get(("axis_stream_folds_total", (("result", "folded"),))) == 2, 10,
                 "the fold metric", proc)
        assert math.isnan(metric_samples(cfg)[("axis_stream_last_fold_energy_kept_ratio", ())])   # not "low"
    finally:
        assert stop(proc) == 0, read_log(proc)
    assert re.search(r"folded 342.safetensors into v2 in [0-9.]+ s \(dense state\)", read_log(proc)), read_log(proc)
    basis = Basis.open(cfg.paths.basis_dir, base)
    assert basis.manifest["settings"]["strategy"] == "opcm" and basis.count == 2
    matrices = set(basis.manifest["matrices"])
    tvs = [{n: layout.as_matrix(d) if n in matrices else d for n, b in base.items() if b.is_floating_point()
            for d in [sd[n].float() - b.float()]} for sd in (finetuned_like(base, seed) for seed in seeds)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the daemon ran (start(): OMP_NUM_THREADS=1): float32 SVDs differ in the last bits
    try:
        want = continual.merge_stream("opcm", tvs, matrices)
    finally:
        torch.set_num_threads(threads)
    got = dense_of(basis, tvs)
    assert max(rel_err(got[n], want[n]) for n in want) < 1e-6


def test_cli_fold_show_and_export_merged_with_a_configured_strategy(tiny_base, make_checkpoint, tmp_path):
    base_cfg, base = tiny_base
    cfg = tmp_path / "axis.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[base]\nmodel = "axis-tiny"\npretrained = "{base_cfg.pretrained}"\n'
                   f'model_config = "{base_cfg.model_config}"\n'
                   '[basis]\nstrategy = "continual-ta"\n[basis.strategy_params]\nlam = 0.5\n')
    runner = CliRunner()
    seeds = (351, 352, 353)
    res = runner.invoke(main, ["fold", *(str(make_checkpoint(s)) for s in seeds), "--config", str(cfg)])
    assert res.exit_code == 0 and "-> version 3: dense state" in res.output, res.output
    res = runner.invoke(main, ["basis", "show", "--config", str(cfg)])
    assert res.exit_code == 0 and "strategy continual-ta (lam=0.5): state per matrix a dense" in res.output
    res = runner.invoke(main, ["basis", "history", "--config", str(cfg)])
    assert res.exit_code == 0 and res.output.count("MiB  dense state, |tau|/|base|") == 3, res.output
    out = tmp_path / "merged.safetensors"
    res = runner.invoke(main, ["export", "--merged", "--config", str(cfg), "--out", str(out)])
    assert res.exit_code == 0, res.output
    weights = load_file(str(out))
    sds = [finetuned_like(base, s) for s in seeds]
    for n, b in base.items():   # base + lam * the sum of the task vectors (float64; the file is float32, as the base)
        want = 0.5 * sum(sd[n].double() - b.double() for sd in sds)
        assert float((weights[n].double() - b.double() - want).abs().max()) < 1e-6 * max(1.0, float(b.abs().max())), n
    assert any(bool((weights[n] != base[n]).any()) for n in base)
