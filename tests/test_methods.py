"""The method registry (experiments/methods.py): a new baseline is one entry, and the experiment file,
the plan and the harness take everything else from it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from axis_stream.core import merges
from axis_stream.errors import ConfigError
from axis_stream.experiments.baselines.functional import Materialized
from axis_stream.experiments.evaluate.experiment import load_experiment
from axis_stream.experiments.evaluate.plan import plan
from axis_stream.experiments.evaluate.runner import run_experiment
from axis_stream.experiments.methods import METHODS, Method
from tests.test_evaluate import read_rows, write_experiment


class BiasOnly(Materialized):
    """A baseline made up for the test: an offset on each of the base's biases, which Stage 2 trains."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.names = [n for n, _ in base.named_parameters() if n.endswith("bias")]
        self.offsets = nn.ParameterList(nn.Parameter(torch.zeros_like(base.get_parameter(n))) for n in self.names)

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: self.base.get_parameter(n) + o for n, o in zip(self.names, self.offsets)}


@pytest.fixture
def bias_only(monkeypatch):
    built = []

    def build(harness, run, hp, base):
        built.append((run.method.params["note"], hp.lr))
        return BiasOnly(base)

    monkeypatch.setitem(METHODS._entries, "bias-only",
                        Method("bias-only", build, params={"note": "x"}, hp={"lr": 1e-2}, uses_sources=False))
    return built


def test_every_merge_and_reference_has_one_entry():
    assert set(merges.METHODS) | {"atlas", "lora", "zeroshot", "linear-probe"} == set(METHODS)
    assert all(METHODS[m].is_merge and METHODS[m].uses_sources and METHODS[m].trained for m in merges.METHODS)
    assert not METHODS["zeroshot"].fits and METHODS["linear-probe"].fits and not METHODS["linear-probe"].trained
    assert METHODS["lora"].check({"rank": 2}) == {"rank": 2, "alpha": 0.0}
    with pytest.raises(ValueError, match="'atlas' has no parameter.*nope"):
        METHODS["atlas"].check({"nope": 1})


def test_a_new_baseline_is_one_entry_end_to_end(tmp_path, tiny_base, bias_only):
    path = write_experiment(tmp_path, tiny_base, methods=("bias-only",), extra='note = "from the file"\n',
                            replace={"levels = []": "levels = [1]"})
    exp = load_experiment(path)
    spec = exp.methods[0]
    assert spec.params == {"note": "from the file"} and spec.hp == {"lr": 1e-2}    # the entry's defaults
    assert not spec.uses_sources and spec.trains
    runs = plan(exp)
    assert {len(r.sources) for r in runs} == {0} and len(runs) == len(exp.targets) * len(exp.budgets)
    exp.targets, exp.budgets = exp.targets[:1], exp.budgets[:1]
    torch.set_num_threads(1)
    run_experiment(exp, lambda line: None)
    rows = read_rows(exp.output_dir / "results.csv")
    assert len(rows) == 1 and rows[0]["method"] == "bias-only"
    assert int(rows[0]["trainable_params"]) == sum(
        v.numel() for k, v in tiny_base[1].items() if k.endswith("bias"))
    assert bias_only == [("from the file", 1e-2)]


def test_an_unknown_method_or_parameter_names_the_known_ones(tmp_path, tiny_base, bias_only):
    path = write_experiment(tmp_path, tiny_base, methods=("bias-only",), extra="colour = 1\n")
    with pytest.raises(ConfigError, match=r"methods\[0\]: method 'bias-only' has no parameter\(s\) colour; known: note"):
        load_experiment(path)
    (tmp_path / "b").mkdir()
    path = write_experiment(tmp_path / "b", tiny_base, methods=("nosuch",))
    with pytest.raises(ConfigError, match="'nosuch' is not one of .*bias-only"):
        load_experiment(path)
