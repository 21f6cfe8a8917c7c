"""``adapt.start_scale = "auto"``: the candidate starts, the tie rule, where Lambda is set, and what reports it."""

from __future__ import annotations

import copy

import torch
from test_adapt_model import three_shapes_basis
from torch import nn

from axis_stream import render
from axis_stream.adapt import start
from axis_stream.adapt.device import Amp, Runtime
from axis_stream.adapt.loop import Loop
from axis_stream.adapt.model import SVDAdapted
from axis_stream.config import AdaptConfig
from axis_stream.core import stage1
from axis_stream.service.metrics import Metrics, start_scale_of

CPU = Runtime(torch.device("cpu"), Amp(torch.device("cpu"), None), None)


def test_ties_go_to_the_larger_scale_within_one_standard_error_and_a_clearly_better_start_wins():
    # SE of 0.82 on 100 samples is 0.038: 0.80 (merged, the largest scale) is within it
    assert start.choose([0.80, 0.82, 0.50, 0.10], n=100) == 0
    # ... and on 100,000 samples it is not: the calibrated start is better beyond noise
    assert start.choose([0.80, 0.82, 0.50, 0.10], n=100_000) == 1
    # a clearly better smaller start wins; equal scores go to the first (largest scale)
    assert start.choose([0.50, 0.55, 0.60, 0.90], n=100) == 3
    assert start.choose([0.70, 0.70, 0.70], n=50) == 0
    assert start.choose([1.0, 1.0, 0.99], n=10) == 0 and start.choose([0.99, 1.0], n=10_000) == 1
    assert start.choose([0.0, 0.0], n=0) == 0  # no validation samples: the merged start


def test_candidates_are_largest_scale_first_and_equal_ones_are_dropped():
    names = ["a", "b"]
    assert [c.name for c in start.candidates(names, {})] == ["merged", "half", "zero"]  # calibrated == merged
    got = start.candidates(names, {"a": 0.4, "other": 0.1})
    assert [c.name for c in got] == ["merged", "calibrated", "half", "zero"]
    assert got[1].scales == {"a": 0.4, "b": 1.0} and got[2].scales == {"a": 0.2, "b": 0.5}
    assert [c.mean_scale for c in got] == [1.0, 0.7, 0.35, 0.0]


def test_set_start_scales_lambda_per_matrix_and_a_fixed_number_is_todays_lambda_bit_for_bit():
    net, base, factors, means = three_shapes_basis()
    calibration = {"wide.weight": 0.25, "tall.weight": 0.5}           # conv.weight missing: 1.0
    model = SVDAdapted(copy.deepcopy(net), factors, means, 0.5, start_scale="auto", calibration=calibration)
    assert model.calibration == {"wide.weight": 0.25, "tall.weight": 0.5, "conv.weight": 1.0}
    merged = model.lambdas()
    model.set_start(model.calibration)
    for name, lam in model.lambdas().items():
        assert torch.equal(lam, merged[name] * model.calibration[name])
        n = lam.numel()
        top = torch.sort(factors[name].s, descending=True).values[:n]
        assert torch.equal(lam, torch.cat([top * model.calibration[name], torch.zeros(n - top.numel())]))
    assert any(lam.numel() > factors[name].rank for name, lam in merged.items())  # completed directions stay 0
    frozen = {k: v for k, v in model.merged_state_dict().items() if k not in model.names}
    assert all(torch.equal(v, SVDAdapted(copy.deepcopy(net), factors, means, 0.5).merged_state_dict()[k])
               for k, v in frozen.items())
    for c in (0.3, 0.0, 1.0):  # a number: Lambda = s[:n] * c, exactly as before "auto" existed
        fixed = SVDAdapted(copy.deepcopy(net), factors, means, 0.5, start_scale=c)
        for name, sp in zip(fixed.names, fixed.spectra):
            n = sp.lam.numel()
            s = torch.sort(factors[name].s, descending=True, stable=True).values
            assert torch.equal(sp.lam.detach(), torch.cat([s[:n] * c, s.new_zeros(max(0, n - factors[name].rank))]))
        model.set_start(c)
        assert all(torch.equal(v, fixed.lambdas()[k]) for k, v in model.lambdas().items())


# --- auto on a tiny model: the loop scores the candidates on validation ---

class Vectors:
    """``loop.Data`` of plain vectors: features are the module's output, logits are the features themselves."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_val: int):
        self.x, self.y, self.n_val = x, y, n_val
        self.train_size, self.val_size = len(y) - n_val, n_val

    def train_batches(self, order, seed):
        for idx in order.split(16):
            yield self.x[self.n_val:][idx], self.y[self.n_val:][idx]

    def eval_batches(self, split):
        part = slice(0, self.n_val) if split == "val" else slice(self.n_val, None)
        yield self.x[part], self.y[part]

    def logits(self, model, inputs, weights=None):
        return model.call("forward", inputs, weights=weights)


def _tiny(delta_scale: float, merged_is_target: bool, calibration=None):
    """A linear 'classifier' ``x -> W x``; labels from ``W* x``. The basis holds ``delta = W* - W0``
    (``merged_is_target``: the merged model is W*, the base is noise) or a huge random delta on a base
    that is W* already."""
    g = torch.Generator().manual_seed(0)
    d, k = 12, 4
    w_star = torch.randn(k, d, generator=g)
    x = torch.randn(400, d, generator=g)
    y = (x @ w_star.T).argmax(-1)
    net = nn.Sequential(nn.Linear(d, k, bias=False))
    if merged_is_target:
        w0 = 3 * torch.randn(k, d, generator=g)
        delta = w_star - w0
    else:
        w0 = w_star.clone()
        delta = torch.randn(k, d, generator=g) * delta_scale
    with torch.no_grad():
        net[0].weight.copy_(w0)
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)
    factors = {"0.weight": stage1.Factors(U, s, Vh.mT.contiguous())}
    model = SVDAdapted(net, factors, {}, 1.0, start_scale="auto", calibration=calibration)
    return model, Vectors(x, y, n_val=100)


def _setup(model, data, scale="auto"):
    events = []
    loop = Loop(model, data, AdaptConfig(start_scale=scale, epochs=1, batch_size=16), CPU, events.append)
    return loop.setup(), events


def test_auto_starts_from_zero_when_the_merged_start_wrecks_the_model_and_from_merged_when_it_helps():
    model, data = _tiny(1e4, merged_is_target=False)
    state, events = _setup(model, data)
    assert state["start"]["chosen"] == "zero"
    by_name = {c["name"]: c for c in state["start"]["candidates"]}
    assert list(by_name) == ["merged", "half", "zero"] and by_name["zero"]["val_accuracy"] == 1.0
    assert by_name["merged"]["val_accuracy"] < 0.8 and by_name["merged"]["n"] == 100
    assert state["initial_val"] == 1.0 and all(v.abs().max() == 0 for v in model.lambdas().values())
    assert events[0] == {"phase": "start", **state["start"]} and events[1]["phase"] == "validate"

    model, data = _tiny(1.0, merged_is_target=True)
    state, _ = _setup(model, data)
    assert state["start"]["chosen"] == "merged" and state["start"]["scale"] == 1.0
    assert state["initial_val"] == 1.0 > max(c["val_accuracy"] for c in state["start"]["candidates"][1:])
    # a fixed number is not scored: the start is the model's own
    model, data = _tiny(1e4, merged_is_target=False)
    state, events = _setup(model, data, scale=1.0)
    assert state["start"] == {"chosen": "fixed", "scale": 1.0, "candidates": []} and state["initial_val"] < 0.8
    assert [e["phase"] for e in events] == ["validate"]


def test_the_calibrated_start_uses_the_basis_factors_and_wins_a_tie_with_zero():
    model, data = _tiny(1e4, merged_is_target=False, calibration={"0.weight": 1e-7})
    state, _ = _setup(model, data)
    names = [c["name"] for c in state["start"]["candidates"]]
    assert names == ["merged", "calibrated", "half", "zero"]
    assert state["start"]["chosen"] == "calibrated" and state["start"]["scale"] == 1e-7  # ties: the larger scale
    s = model.spectra[0].s
    assert torch.equal(model.lambdas()["0.weight"], s * 1e-7)


def test_the_choice_reaches_jobs_show_and_the_gauge():
    choice = {"chosen": "half", "scale": 0.25, "candidates": [
        {"name": "merged", "scale": 1.0, "val_accuracy": 0.31, "n": 200},
        {"name": "calibrated", "scale": 0.5, "val_accuracy": 0.55, "n": 200},
        {"name": "half", "scale": 0.25, "val_accuracy": 0.6, "n": 200},
        {"name": "zero", "scale": 0.0, "val_accuracy": 0.58, "n": 200}]}
    record = {"id": "j1", "kind": "adapt", "target": "dtd", "state": "succeeded", "origin": "cli", "basis_version": 3,
              "created_at": 0.0, "started_at": 1.0, "finished_at": 2.0, "params": {"target": "dtd"},
              "progress": None, "error": None, "result": {"test_accuracy": 0.6, "start": choice}, "log_path": "x"}
    lines = render.describe(record)
    line = next(x for x in lines if x.strip().startswith("start:"))
    assert "half (mean scale 0.25)" in line and "merged 31.0 %" not in line and "merged 31.0%" in line
    assert "zero 58.0%" in line and "200 samples" in line
    metrics = Metrics()
    metrics.job_finished(1.0, "dtd", 0.6, start_scale=start_scale_of(record["result"]))
    assert 'axis_stream_adapt_start_scale{target="dtd"} 0.25' in metrics.exposition().decode()
    assert start_scale_of({"test_accuracy": 0.5}) is None and start_scale_of({"start": None}) is None
