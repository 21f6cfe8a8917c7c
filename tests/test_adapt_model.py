"""Stage 2's SVD-parametrised model: initial weights, what trains, completion, counts, bad input."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from axis_stream import config
from axis_stream.adapt.model import AdaptError, SVDAdapted, complete_orthonormal
from axis_stream.core import layout, stage1
from axis_stream.store import models
from axis_stream.testing import finetuned_like


def snapshot_from_sources(base: dict[str, torch.Tensor], seeds=(0, 1, 2), k_fraction: float = 0.10,
                          patterns=config.VIT_BLOCK_MATRICES) -> SimpleNamespace:
    """What a basis holds after folding ``finetuned_like`` checkpoints: streaming factors, running means."""
    names = set(layout.matrix_names(base, patterns))
    factors, means = {}, {}
    for count, seed in enumerate(seeds):
        for name, t in finetuned_like(base, seed).items():
            delta = t - base[name]
            if name in names:
                k = stage1.k_for(layout.as_matrix(base[name]).shape, k_fraction)
                factors[name] = stage1.fold(factors.get(name), layout.as_matrix(delta), k)
            elif name.startswith("visual."):
                means[name] = stage1.update_mean(means.get(name), count, delta)
    return SimpleNamespace(version=len(seeds), factors=factors, means=means, calibration={})


@pytest.fixture(scope="module")
def snapshot(tiny_base):
    return snapshot_from_sources(tiny_base[1])


@pytest.fixture(scope="module")
def tiny_module(tiny_base):
    return models.create_base(tiny_base[0])


def fresh(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


@pytest.mark.parametrize("n_fraction", [0.05, 0.10, 0.40, 1.0])
def test_initial_weights_are_base_plus_merged_task_vector(tiny_base, tiny_module, snapshot, n_fraction):
    base = tiny_base[1]
    model = SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, n_fraction)
    weights = model.weights()
    for name, f in snapshot.factors.items():
        ref = base[name].double() + (f.U.double() * f.s.double()) @ f.V.double().T
        torch.testing.assert_close(weights[name].double(), ref, rtol=0, atol=1e-6)
    state = model.base.state_dict()
    for name, mean in snapshot.means.items():
        torch.testing.assert_close(state[name].double(), base[name].double() + mean.double(), rtol=0, atol=1e-6)
    untouched = [n for n in base if n not in snapshot.factors and n not in snapshot.means]
    assert untouched and all(torch.equal(state[n], base[n]) for n in untouched)


def test_initial_lambda_is_the_top_n_stored_values_then_zeros(tiny_module, snapshot):
    model = SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, 0.40)
    for name, sp in zip(model.names, model.spectra):
        s = snapshot.factors[name].s
        n = stage1.k_for(snapshot.factors[name].shape, 0.40)
        assert sp.lam.numel() == n > s.numel()
        assert torch.equal(sp.lam.detach()[: s.numel()], s)
        assert torch.equal(sp.lam.detach()[s.numel():], torch.zeros(n - s.numel()))


def test_only_lambda_trains_and_everything_frozen_stays_bit_identical(tiny_module, snapshot):
    model = SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, 0.20)
    assert [p for p in model.parameters() if p.requires_grad] == [sp.lam for sp in model.spectra]
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".lam")}
    lam0 = [sp.lam.detach().clone() for sp in model.spectra]
    opt = torch.optim.AdamW([sp.lam for sp in model.spectra], lr=0.1, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        images = torch.randn(4, 3, 32, 32, generator=g)
        loss = model.call("encode_image", images).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.base.parameters())
        assert all(sp.lam.grad is not None and sp.lam.grad.abs().sum() > 0 for sp in model.spectra)
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(sp.lam.detach(), l0) for sp, l0 in zip(model.spectra, lam0))


def test_completion_is_orthonormal_keeps_the_stored_vectors_and_is_seeded(tiny_module, snapshot):
    a = SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, 1.0, seed=0)
    b = SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, 1.0, seed=0)
    c = SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, 1.0, seed=1)
    for i, name in enumerate(a.names):
        f, sp = snapshot.factors[name], a.spectra[i]
        for full, stored in ((sp.U, f.U), (sp.V, f.V)):
            eye = torch.eye(full.shape[1], dtype=torch.float64)
            torch.testing.assert_close(full.double().T @ full.double(), eye, rtol=0, atol=1e-5)
            assert torch.equal(full[:, : f.rank], stored)
        assert torch.equal(sp.U, b.spectra[i].U) and torch.equal(sp.V, b.spectra[i].V)
        assert not torch.allclose(sp.U[:, f.rank:], c.spectra[i].U[:, f.rank:])


def test_complete_orthonormal_from_nothing_and_from_a_full_set():
    g = torch.Generator().manual_seed(0)
    q = complete_orthonormal(torch.zeros(5, 0), 3, g)
    torch.testing.assert_close(q.T @ q, torch.eye(3), rtol=0, atol=1e-6)
    full = torch.linalg.qr(torch.randn(4, 4, generator=g)).Q
    assert torch.equal(complete_orthonormal(full, 2, g), full[:, :2])


def test_rank_zero_factors_train_from_zero(tiny_base, tiny_module):
    base = tiny_base[1]
    names = layout.matrix_names(base, config.VIT_BLOCK_MATRICES)
    empty = {n: stage1.Factors(torch.zeros(base[n].shape[0], 0), torch.zeros(0), torch.zeros(base[n].shape[1], 0))
             for n in names}
    model = SVDAdapted(fresh(tiny_module), empty, {}, 0.10)
    assert all(torch.equal(w, base[n]) for n, w in model.weights().items())
    assert all(torch.equal(sp.lam.detach(), torch.zeros_like(sp.lam)) for sp in model.spectra)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True, "0.1", None])
def test_n_fraction_out_of_range_is_a_clear_error(tiny_module, snapshot, bad):
    with pytest.raises(AdaptError, match=r"n_fraction must be a number in \(0, 1\]"):
        SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, bad)


def test_a_basis_of_a_different_base_model_is_a_clear_error(tiny_module, snapshot):
    name = next(iter(snapshot.factors))
    wrong = dict(snapshot.factors)
    f = wrong[name]
    wrong[name] = stage1.Factors(torch.cat([f.U, f.U]), f.s, f.V)  # twice as many rows
    with pytest.raises(AdaptError, match="different base model"):
        SVDAdapted(fresh(tiny_module), wrong, snapshot.means, 0.1)
    with pytest.raises(AdaptError, match="not a parameter of the base model"):
        SVDAdapted(fresh(tiny_module), {"visual.nope.weight": f}, {}, 0.1)
    mean_name = next(iter(snapshot.means))
    with pytest.raises(AdaptError, match="different base model"):
        SVDAdapted(fresh(tiny_module), snapshot.factors, {mean_name: torch.zeros(3, 3, 3)}, 0.1)
    with pytest.raises(AdaptError, match="no matrices"):
        SVDAdapted(fresh(tiny_module), {}, {}, 0.1)


def test_lambda_round_trip_and_mismatch(tiny_module, snapshot):
    a = SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, 0.2)
    with torch.no_grad():
        for sp in a.spectra:
            sp.lam.mul_(1.5)
    b = SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, 0.2)
    b.load_lambdas(a.lambdas())
    assert all(torch.equal(a.merged_state_dict()[k], v) for k, v in b.merged_state_dict().items())
    c = SVDAdapted(fresh(tiny_module), snapshot.factors, snapshot.means, 0.4)
    with pytest.raises(AdaptError, match="another n_fraction"):
        c.load_lambdas(a.lambdas())


def test_any_module_with_pattern_named_matrices_including_a_flattened_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    names = layout.matrix_names(base, ["0.weight", "3.weight"], conv_as_matrix=True)
    assert names == ["0.weight", "3.weight"]
    g = torch.Generator().manual_seed(1)
    factors = {n: stage1.merge([torch.randn(layout.as_matrix(base[n]).shape, generator=g)], 3) for n in names}
    means = {"3.bias": torch.randn(5, generator=g)}
    model = SVDAdapted(net, factors, means, 0.5)
    assert model.trainable_count() == stage1.k_for((8, 27), 0.5) + stage1.k_for((5, 128), 0.5)
    for n in names:
        ref = base[n].double() + factors[n].to_dense().double().reshape(base[n].shape)
        torch.testing.assert_close(model.weights()[n].double(), ref, rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 6, 6, generator=g)
    expected = torch.func.functional_call(net, model.merged_state_dict(), (x,))
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    assert all(p.grad is None for p in net.parameters()) and all(sp.lam.grad is not None for sp in model.spectra)


class ThreeShapes(nn.Module):
    """Matrices of three shapes (one a conv flattened to a matrix), a bias that gets a mean, one untouched."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(10, 6)       # (6, 10)
        self.tall = nn.Linear(6, 12)       # (12, 6)
        self.conv = nn.Conv2d(3, 4, 2)     # (4, 3, 2, 2) -> (4, 12)


def three_shapes_basis(seed: int = 0):
    """The module, a copy of its weights, and rank-K factors with exact orthonormal U, V and s in shuffled order."""
    torch.manual_seed(seed)
    net = ThreeShapes()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    factors = {}
    for name, rank in (("wide.weight", 5), ("tall.weight", 2), ("conv.weight", 4)):
        m, n = layout.as_matrix(base[name]).shape
        U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
        s = torch.linspace(2.0, 0.5, rank, dtype=torch.float64)[torch.randperm(rank, generator=g)]
        factors[name] = stage1.Factors(U.float(), s.float(), V.float())
    means = {"tall.bias": torch.randn(12, generator=g)}
    return net, base, factors, means


def scaled_reference(base: torch.Tensor, f: stage1.Factors, n: int, c: float) -> torch.Tensor:
    """float64 ``base + U diag(c * s_top, s_tail) V^T``, the top N by value, built densely."""
    s = f.s.double()
    top = torch.zeros_like(s, dtype=torch.bool)
    top[torch.argsort(s, descending=True)[:n]] = True
    scaled = torch.where(top, c * s, s)
    delta = (f.U.double() * scaled) @ f.V.double().T
    return base.double() + delta.reshape(base.shape)


@pytest.mark.parametrize("n_fraction", [0.5, 1.0])
@pytest.mark.parametrize("c", [0.0, 0.3, 1.0])
def test_start_scale_scales_only_the_trainable_top_n(n_fraction, c):
    net, base, factors, means = three_shapes_basis()
    model = SVDAdapted(net, factors, means, n_fraction, start_scale=c)
    weights = model.weights()
    tails = 0
    for name, f in factors.items():
        n = stage1.k_for(layout.as_matrix(base[name]).shape, n_fraction)
        tails += max(0, f.rank - n)
        torch.testing.assert_close(weights[name].double(), scaled_reference(base[name], f, n, c), rtol=0, atol=1e-5)
        lam = model.spectra[model.names.index(name)].lam.detach()
        top = torch.sort(f.s, descending=True).values[:n]
        torch.testing.assert_close(lam, torch.cat([c * top, torch.zeros(n - top.numel())]), rtol=0, atol=1e-7)
    assert tails == (4 if n_fraction == 0.5 else 0)  # at N = 50 % a frozen tail exists and must keep s
    state = model.base.state_dict()
    torch.testing.assert_close(state["tall.bias"], base["tall.bias"] + means["tall.bias"], rtol=0, atol=1e-6)
    assert torch.equal(state["wide.bias"], base["wide.bias"])


def test_start_scale_default_is_exactly_the_merged_start_and_changes_only_lambda():
    net, base, factors, means = three_shapes_basis()
    default = SVDAdapted(copy.deepcopy(net), factors, means, 0.5)
    explicit = SVDAdapted(copy.deepcopy(net), factors, means, 0.5, start_scale=1.0)
    scaled = SVDAdapted(copy.deepcopy(net), factors, means, 0.5, start_scale=0.3)
    assert default.start_scale == 1.0
    for name, sp in zip(default.names, default.spectra):  # the paper's start: Lambda is s itself, bit for bit
        n = sp.lam.numel()
        top = torch.sort(factors[name].s, descending=True).values[:n]
        assert torch.equal(sp.lam.detach(), torch.cat([top, torch.zeros(n - top.numel())]))
    ref = default.merged_state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in explicit.merged_state_dict().items())
    assert any(not torch.equal(v, ref[k]) for k, v in scaled.merged_state_dict().items())
    scaled.load_lambdas(default.lambdas())  # everything but Lambda is the same model
    assert all(torch.equal(v, ref[k]) for k, v in scaled.merged_state_dict().items())


@pytest.mark.parametrize("bad", [-0.1, -1, float("nan"), float("inf"), True, "0.3", None])
def test_start_scale_must_be_a_finite_number_at_least_zero(bad):
    net, _, factors, means = three_shapes_basis()
    with pytest.raises(AdaptError, match=r"start_scale must be a finite number >= 0"):
        SVDAdapted(net, factors, means, 0.5, start_scale=bad)


def test_vit_b32_trainable_counts_match_the_paper():
    base_model = models.create_base(config.BaseConfig(model="ViT-B-32", pretrained=""))
    params = dict(base_model.named_parameters())
    names = layout.matrix_names(params, config.VIT_BLOCK_MATRICES)
    assert len(names) == 48
    factors = {}  # rank K = 76 per matrix, as ViT-B-32's default K; any orthonormal U, V will do
    for name in names:
        m, n = params[name].shape
        factors[name] = stage1.Factors(torch.eye(m, 76), torch.linspace(1.0, 0.1, 76), torch.eye(n, 76))
    counts = {}
    for n_fraction in (0.10, 0.20, 0.40):
        module = base_model if n_fraction == 0.40 else fresh(base_model)
        counts[n_fraction] = SVDAdapted(module, factors, {}, n_fraction).trainable_count()
    assert counts == {0.10: 3648, 0.20: 7344, 0.40: 14736}
