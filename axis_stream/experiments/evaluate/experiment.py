"""The experiment file of ``axis-stream evaluate``: sources, targets, methods, budgets, seeds, ablations."""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


from axis_stream import config
from axis_stream.config import VIT_BLOCK_MATRICES, AdaptConfig, BaseConfig, ConfigError, RayConfig
from axis_stream.core import merges
from axis_stream.experiments.methods import METHODS, Method

Echo = Callable[[str], None]
"""Where progress lines go (``print``, or a CLI's echo)."""

HP_KEYS = ("lr", "epochs", "weight_decay", "batch_size", "grad_clip", "start_scale")
MERGE_ONLY_HP = ("start_scale",)
"""Stage 2 settings of a merged basis (Lambda's start): a method without one (aTLAS, LoRA, ...) refuses them."""


@dataclass
class SourceSpec:
    name: str = ""
    path: Path = Path()


@dataclass
class TargetSpec:
    name: str = ""                       # a source of the same name is left out of this target's pool
    dataset: str = ""                    # what `adapt --target` takes: a dataset name or imagefolder:PATH
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)


@dataclass
class Stage1Options:
    matrix_patterns: list[str] = field(default_factory=lambda: list(VIT_BLOCK_MATRICES))
    conv_as_matrix: bool = False
    k_fractions: list[float] = field(default_factory=lambda: [0.10])   # K sweep (paper Figure 6)
    calibration: str = config.BasisConfig.calibration  # streaming AXIS's basis.calibration (the daemon's default)


@dataclass
class Robustness:
    corrupt: list[bool] = field(default_factory=lambda: [False])       # one corrupted source (Figure 4)
    corrupt_scale: float = 0.5           # noise std = scale * ||Delta||_F of each task matrix
    corrupt_index: int = 0               # which source of an aggregation is corrupted (0 = the first added)
    prune_ratios: list[float] = field(default_factory=lambda: [0.0])   # magnitude pruning of all sources
    patch_dropout: list[float] = field(default_factory=lambda: [0.0])  # test-time patch dropout
    train_fractions: list[float] = field(default_factory=lambda: [1.0])  # limited target training data


@dataclass
class MethodSpec:
    name: str
    label: str
    params: dict[str, Any]
    hp: dict[str, Any]
    stage2: bool = True                  # False (a merge only): the merged model itself is measured, nothing trains

    @property
    def entry(self) -> Method:
        """The registry's entry (``experiments.methods``): defaults, what it needs, how it is built."""
        return METHODS[self.name]

    @property
    def is_merge(self) -> bool:
        return self.entry.is_merge

    @property
    def merged_only(self) -> bool:
        """A merge measured as it is: base + the merged delta, the target's frozen head, no Stage 2."""
        return self.is_merge and not self.stage2

    @property
    def trains(self) -> bool:
        """Stage 2's loop trains the run's model (not a zero-shot, a linear probe or a merge measured as is)."""
        return self.entry.trained and not self.merged_only

    @property
    def fits(self) -> bool:
        """The run learns from the target's train split (its seeds and train fractions matter)."""
        return self.entry.fits and not self.merged_only

    @property
    def uses_sources(self) -> bool:
        return self.entry.uses_sources


@dataclass
class Experiment:
    output_dir: Path = Path("evaluation")
    data_root: Path | None = None
    budgets: list[float] = field(default_factory=lambda: [0.10, 0.20, 0.40])
    seeds: list[int] = field(default_factory=lambda: [0])
    levels: list[int] = field(default_factory=list)                    # empty: 1 .. pool size
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    suite: str = ""                      # a real offline suite (axis_stream.experiments.suites): its own model and data
    executor: str = "local"              # local: runs here, one after another | ray: tasks on a Ray cluster
    orders: list[int] = field(default_factory=lambda: [0])             # arrival orders of the sources (plan.arrival)
    multitask: bool = False              # a suite's merged models on every source task folded so far (multitask.py)
    ray: RayConfig = field(default_factory=RayConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    stage1: Stage1Options = field(default_factory=Stage1Options)
    robustness: Robustness = field(default_factory=Robustness)
    sources: list[SourceSpec] = field(default_factory=list)
    targets: list[TargetSpec] = field(default_factory=list)
    methods: list[MethodSpec] = field(default_factory=list)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment TOML; relative paths are relative to the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read experiment: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    raw_methods = data.pop("methods", None)
    try:
        exp = config.build_dataclass(Experiment, data, "")
        exp.methods = [_method(m, i) for i, m in enumerate(_table_list(raw_methods, "methods"))]
        _resolve_paths(exp, path.resolve().parent)
        _validate(exp)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return exp


def _table_list(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{key}: expected one or more [[{key}]] tables")
    return value


def _method(table: dict, index: int) -> MethodSpec:
    where = f"methods[{index}]"
    table = dict(table)
    name = table.pop("name", None)
    if name not in METHODS:
        raise ConfigError(f"{where}.name: {name!r} is not one of {', '.join(METHODS)}")
    method = METHODS[name]
    label = table.pop("label", name)
    stage2 = table.pop("stage2", True)
    if not isinstance(stage2, bool):
        raise ConfigError(f"{where}.stage2: expected true or false, got {stage2!r}")
    if not stage2 and not method.is_merge:
        raise ConfigError(f"{where}.stage2: only a Stage 1 merge ({', '.join(sorted(merges.METHODS))}) can be "
                          f"measured without Stage 2, not {name!r}")
    trained = [k for k in HP_KEYS if k in table]
    if not stage2 and trained:
        raise ConfigError(f"{where}.{trained[0]}: a merge with stage2 = false trains nothing")
    if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9_.+\-=\[\],]+", label):
        raise ConfigError(f"{where}.label: {label!r} must be a short name without spaces")
    hints = get_type_hints(AdaptConfig)
    hp = {**method.hp,
          **{k: config.convert_value(hints[k], table.pop(k), f"{where}.{k}") for k in HP_KEYS if k in table}}
    for key in MERGE_ONLY_HP:
        if key in hp and not method.is_merge:
            raise ConfigError(f"{where}.{key}: applies only to a Stage 1 merge followed by Stage 2 "
                              f"({', '.join(sorted(merges.METHODS))}), not to {name!r}")
    try:
        dataclasses.replace(AdaptConfig(), **hp).validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        params = method.check(table)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return MethodSpec(name, label, params, hp, stage2)


def _resolve_paths(exp: Experiment, root: Path) -> None:
    exp.output_dir = root / exp.output_dir
    if exp.data_root is not None:
        exp.data_root = root / exp.data_root
    for s in exp.sources:
        s.path = root / s.path
    for t in exp.targets:
        if t.dataset.startswith("imagefolder:"):
            t.dataset = "imagefolder:" + str(root / Path(t.dataset.split(":", 1)[1]).expanduser())
    if exp.base.model_config is not None:
        exp.base.model_config = root / exp.base.model_config
    if exp.base.pretrained and (root / exp.base.pretrained).is_file():
        exp.base.pretrained = str(root / exp.base.pretrained)


def _validate(exp: Experiment) -> None:
    if not exp.targets:
        raise ConfigError("targets: expected one or more [[targets]] tables")
    for kind, names in (("sources", [s.name for s in exp.sources]), ("targets", [t.name for t in exp.targets]),
                        ("methods", [m.label for m in exp.methods])):
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"{kind}: every entry needs a name (methods: a label) and no two may share one")
    for t in exp.targets:
        if not t.dataset:
            raise ConfigError(f"targets.{t.name}.dataset: required (a dataset name or imagefolder:PATH)")
    if any(m.uses_sources for m in exp.methods) and not exp.sources:
        raise ConfigError("sources: methods that merge sources need one or more [[sources]] tables")
    checks = [("budgets", exp.budgets, 0.0, 1.0, True), ("stage1.k_fractions", exp.stage1.k_fractions, 0.0, 1.0, True),
              ("robustness.prune_ratios", exp.robustness.prune_ratios, 0.0, 1.0, False),
              ("robustness.train_fractions", exp.robustness.train_fractions, 0.0, 1.0, True),
              ("robustness.patch_dropout", exp.robustness.patch_dropout, 0.0, 0.99, False)]
    for key, values, low, high, low_open in checks:
        if not values or any(v < low or (low_open and v == low) or v > high for v in values):
            raise ConfigError(f"{key}: expected values in {'(' if low_open else '['}{low}, {high}], got {values!r}")
    if not exp.seeds or any(level < 1 for level in exp.levels) or not exp.robustness.corrupt:
        raise ConfigError("seeds and robustness.corrupt need one or more values; levels must be >= 1")
    if not exp.orders or len(set(exp.orders)) != len(exp.orders) or min(exp.orders) < 0:
        raise ConfigError(f"orders: expected distinct numbers >= 0 (0 = the file's order), got {exp.orders!r}")
    if exp.multitask and not (exp.suite and any(m.is_merge for m in exp.methods)):
        raise ConfigError("multitask: needs a suite (suite = ...), whose sources are its tasks, and one or more "
                          "Stage 1 merges among the methods")
    exp.adapt.validate()
    config._choice("stage1.calibration", exp.stage1.calibration, config.CALIBRATIONS)
    config._choice("executor", exp.executor, config.EXECUTORS)
    exp.ray.validate("ray")
