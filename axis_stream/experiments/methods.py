"""The methods an evaluation compares, one ``Method`` each in one registry, and the ``Harness``
protocol both harnesses (CLIP experiments and the offline suites) implement.

A method says what it needs (sources or not), whether Stage 2's loop trains its model, its own
parameters with their defaults and Stage 2 settings, and how to build its trainable model around a
base. Adding a baseline is one ``METHODS.add`` here; the experiment file, the plan and both
harnesses read everything else from the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

from axis_stream.adapt.model import SVDAdapted
from axis_stream.adapt.recipe import Snapshot as StartBasis
from axis_stream.config import AdaptConfig
from axis_stream.core import merges, stage1
from axis_stream.core.registry import Registry, with_defaults
from axis_stream.experiments.baselines import atlas, references

if TYPE_CHECKING:
    from axis_stream.experiments.evaluate.plan import Run


@dataclass
class Snapshot:
    """A merged basis as Stage 2 starts from it: per-matrix factors, the merged means of the other
    parameters and the calibration factors (none: every factor 1); ``version`` 0 when not on disk."""

    version: int
    factors: dict[str, stage1.Factors]
    means: dict[str, Tensor]
    calibration: dict[str, float] = field(default_factory=dict)


class Harness(Protocol):
    """What a method's ``build`` may ask of the harness running it."""

    matrices: list[str]
    shapes: list[tuple[int, ...]]

    def prepared(self, run: Run) -> list[dict[str, Tensor]]:
        """The run's source task vectors after its robustness treatment."""

    def basis(self, run: Run) -> StartBasis:
        """The run's merged basis (a Stage 1 merge of its sources)."""

    def budget_count(self, n_fraction: float) -> int:
        """AXIS's Stage 2 trainable count at N, to which the other methods are matched."""

    def execute(self, run: Run, out_dir: Any) -> list[dict[str, Any]]:
        """Train and evaluate one run; its result rows."""


Build = Callable[[Harness, "Run", AdaptConfig, nn.Module], nn.Module]
"""A method's trainable model around ``base`` (consumed) for one run."""


@dataclass(frozen=True)
class Method:
    """One evaluated method: its name, its parameters' defaults, its own Stage 2 defaults, whether
    it merges sources, whether Stage 2's loop trains it (else only a head is fitted on frozen
    features, or with ``fits`` False nothing), and how its model is built."""

    name: str
    build: Build
    params: Mapping[str, Any] = field(default_factory=dict)
    hp: Mapping[str, Any] = field(default_factory=dict)
    uses_sources: bool = True
    trained: bool = True         # Stage 2's loop trains its model (at the run's budget N)
    fits: bool = True            # learns anything from the target's train split (False: zero-shot)

    @property
    def is_merge(self) -> bool:
        return self.name in merges.METHODS

    def check(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` over the defaults (a merge: its own ``MergeMethod.check``); unknown names are a
        ValueError naming them."""
        if self.is_merge:
            return merges.METHODS[self.name].check(params)
        return with_defaults("method", self.name, self.params, params)


def _merged(harness: Harness, run: Run, hp: AdaptConfig, base: nn.Module) -> nn.Module:
    snap = harness.basis(run)
    return SVDAdapted(base, snap.factors, snap.means, hp.n_fraction, seed=hp.seed, start_scale=hp.start_scale,
                      calibration=snap.calibration)


def _atlas(harness: Harness, run: Run, hp: AdaptConfig, base: nn.Module) -> nn.Module:
    params, tvs = run.method.params, harness.prepared(run)
    n_2d, n_other = (len(x) for x in atlas.scaled_tensors(base, tvs, params["scope"]))
    p = params["partitions"] or atlas.p_for_budget(harness.budget_count(run.budget), len(tvs), max(n_2d, 1), n_other)
    return atlas.ATLAS(base, tvs, p, scope=params["scope"], seed=hp.seed)


def _lora(harness: Harness, run: Run, hp: AdaptConfig, base: nn.Module) -> nn.Module:
    params = run.method.params
    rank = params["rank"] or references.lora_rank_for_budget(harness.budget_count(run.budget), harness.shapes)
    return references.LoRA(base, harness.matrices, rank, alpha=params["alpha"] or None, seed=hp.seed)


def _frozen(harness: Harness, run: Run, hp: AdaptConfig, base: nn.Module) -> nn.Module:
    return references.Frozen(base)


HEAD_LR = {"lr": 1e-3}
"""Stage 2's lr of 1e-1 is for singular values and aTLAS's coefficients, not for LoRA factors or a head."""

METHODS: Registry[Method] = Registry("method")
for _name in merges.METHODS:
    METHODS.add(_name, Method(_name, _merged))
METHODS.add("atlas", Method("atlas", _atlas, params={"partitions": 0, "scope": "visual."}))  # 0: matched to N
METHODS.add("lora", Method("lora", _lora, params={"rank": 0, "alpha": 0.0}, hp=HEAD_LR,     # alpha 0: the rank
                           uses_sources=False))
METHODS.add("zeroshot", Method("zeroshot", _frozen, uses_sources=False, trained=False, fits=False))
METHODS.add("linear-probe", Method("linear-probe", _frozen, hp=HEAD_LR, uses_sources=False, trained=False))
