"""``axis-stream evaluate``: the paper's comparisons, run on your own models with one harness.

An experiment file names a base, a pool of source checkpoints (in the fixed order they are added),
targets, methods, trainable-parameter budgets N, seeds, and optional ablations and robustness
settings. For every target, its own source (same name) is left out of the pool and the first 1, 2,
... of the remaining sources are aggregated (leave-one-out, paper section 4.1). Every method is
trained with Stage 2's own recipe, head and data (``adapt.recipe``); budgets are matched to AXIS's
Stage 2 count at N (aTLAS through P, LoRA through its rank). Each finished run appends its rows to
``<output_dir>/results.csv`` at once (fsynced); a restarted evaluation skips the rows already there,
and a run stopped mid-training continues from its last finished epoch. At the end it prints a
summary table and draws PNG plots from the whole CSV.

Method names: the Stage 1 merges of ``baselines.merges`` (``axis``, ``axis-global``, ``ta``,
``average``, ``ties``, ``dare``, ``tsvm``), each followed by Stage 2, and ``atlas``, ``zeroshot``,
``linear-probe``, ``lora``. The experiment file is parsed here (not in ``config``): it is not the
daemon's configuration.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from axis_stream import atomic, config, executors, ingest, models, stage1
from axis_stream.atomic import atomic_write, atomic_write_bytes
from axis_stream.baselines import atlas, merges, references
from axis_stream.baselines.memory import step_peak_bytes
from axis_stream.config import AdaptConfig, BaseConfig, ConfigError, RayConfig, VIT_BLOCK_MATRICES
from axis_stream.errors import AxisError

Echo = Callable[[str], None]

SOURCE_FREE = ("zeroshot", "linear-probe", "lora")
METHOD_PARAMS = {"atlas": {"partitions": 0, "scope": "visual."}, "lora": {"rank": 0, "alpha": 0.0},
                 "zeroshot": {}, "linear-probe": {}}
"""Parameters of the methods that are not Stage 1 merges (0 = matched to the budget, alpha 0 = rank)."""
HP_KEYS = ("lr", "epochs", "weight_decay", "batch_size", "grad_clip", "start_scale")
MERGE_ONLY_HP = ("start_scale",)
"""Stage 2 settings of a merged basis (Lambda's start): a method without one (aTLAS, LoRA, ...) refuses them."""
HP_DEFAULTS = {"lora": {"lr": 1e-3}, "linear-probe": {"lr": 1e-3}}
"""Per-method learning rates: Stage 2's 1e-1 is for singular values and aTLAS's coefficients, not for
LoRA factors or a head. A method's own ``lr`` in the experiment file wins."""

KEY = ("method", "target", "sources", "budget", "seed", "k_fraction", "corrupt", "prune_ratio",
       "train_fraction", "patch_dropout")
COLUMNS = KEY + ("source_names", "trainable_params", "val_accuracy", "test_accuracy", "peak_memory_mb",
                 "step_seconds", "seconds")
RESULTS = "results.csv"
LOCK = ".lock"
"""Held (flock) by the evaluation writing an output folder."""


# --- the experiment file ---

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

    @property
    def is_merge(self) -> bool:
        return self.name in merges.METHODS

    @property
    def uses_sources(self) -> bool:
        return self.name not in SOURCE_FREE


@dataclass
class Experiment:
    output_dir: Path = Path("evaluation")
    data_root: Path | None = None
    budgets: list[float] = field(default_factory=lambda: [0.10, 0.20, 0.40])
    seeds: list[int] = field(default_factory=lambda: [0])
    levels: list[int] = field(default_factory=list)                    # empty: 1 .. pool size
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    suite: str = ""                      # a real offline suite (axis_stream.suites): its own model and data
    executor: str = "local"              # local: runs here, one after another | ray: tasks on a Ray cluster
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
    known = sorted(merges.METHODS) + list(METHOD_PARAMS)
    if name not in known:
        raise ConfigError(f"{where}.name: {name!r} is not one of {', '.join(known)}")
    label = table.pop("label", name)
    if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9_.+\-=\[\],]+", label):
        raise ConfigError(f"{where}.label: {label!r} must be a short name without spaces")
    hints = get_type_hints(AdaptConfig)
    hp = {**HP_DEFAULTS.get(name, {}),
          **{k: config.convert_value(hints[k], table.pop(k), f"{where}.{k}") for k in HP_KEYS if k in table}}
    for key in MERGE_ONLY_HP:
        if key in hp and name not in merges.METHODS:
            raise ConfigError(f"{where}.{key}: applies only to a Stage 1 merge followed by Stage 2 "
                              f"({', '.join(sorted(merges.METHODS))}), not to {name!r}")
    try:
        dataclasses.replace(AdaptConfig(), **hp).validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        if name in merges.METHODS:
            params = merges.METHODS[name].check(table)
        else:
            unknown = sorted(set(table) - set(METHOD_PARAMS[name]))
            if unknown:
                raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)}")
            params = {**METHOD_PARAMS[name], **table}
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return MethodSpec(name, label, params, hp)


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
    exp.adapt.validate()
    config._choice("executor", exp.executor, config.EXECUTORS)
    exp.ray.validate("ray")


# --- the results file: one row per (method, target, sources, budget, seed, variant), appended durably ---

class Results:
    """``results.csv``: rows appended and fsynced one run at a time; the keys already there are skipped."""

    def __init__(self, path: Path):
        self.path = path
        self.done: set[tuple[str, ...]] = set()
        if not path.exists():
            atomic_write_bytes(path, _csv_line(COLUMNS).encode())
            return
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a crash in the middle of an append: drop the partial line
            raw = raw[: raw.rfind(b"\n") + 1]
            atomic_write_bytes(path, raw)
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise AxisError(f"{path}: its columns are not this version's ({', '.join(COLUMNS)}); "
                            f"use another output_dir or move the file away")
        for row in reader:
            self.done.add(tuple(row[k] for k in KEY))

    def has(self, row: Mapping[str, Any]) -> bool:
        return _key(row) in self.done

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8", newline="") as fh:
            fh.write("".join(_csv_line([_cell(r.get(c, "")) for c in COLUMNS]) for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
        self.done.update(_key(r) for r in rows)

    def rows(self) -> list[dict[str, str]]:
        with open(self.path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(_cell(row[k]) for k in KEY)


def _csv_line(cells: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


# --- the plan: which runs, in which order ---

@dataclass(frozen=True)
class Run:
    """One training (or, for zero-shot, one evaluation); it yields one row per patch-dropout level."""

    method: MethodSpec
    target: TargetSpec
    sources: tuple[SourceSpec, ...]
    budget: float
    seed: int
    k_fraction: float | None
    corrupt: bool
    prune_ratio: float
    train_fraction: float

    def rows(self, patch_dropout: Sequence[float]) -> list[dict[str, Any]]:
        base = {"method": self.method.label, "target": self.target.name, "sources": len(self.sources),
                "budget": self.budget, "seed": self.seed, "k_fraction": self.k_fraction, "corrupt": self.corrupt,
                "prune_ratio": self.prune_ratio, "train_fraction": self.train_fraction,
                "source_names": "+".join(s.name for s in self.sources)}
        return [dict(base, patch_dropout=p) for p in patch_dropout]

    def settings(self, adapt: AdaptConfig) -> AdaptConfig:
        """The run's Stage 2 settings: the experiment's ``adapt``, the method's own, the run's seed and budget."""
        hp = dataclasses.replace(adapt, seed=self.seed, **self.method.hp,
                                 n_fraction=self.budget if self.budget > 0 else adapt.n_fraction)
        hp.validate()
        return hp

    def basis_key(self) -> tuple:
        """What the merged basis depends on (not the budget or the amount of target data)."""
        return (self.method.label, tuple(s.name for s in self.sources), self.k_fraction, self.corrupt,
                self.prune_ratio, self.seed)

    def folder(self, exp: Experiment) -> str:
        """A stable folder name for this run's Stage 2 files (settings hashed, so a changed run gets a new one)."""
        ident = {"method": [self.method.name, self.method.params, self.method.hp],
                 "sources": [[s.name, str(s.path)] for s in self.sources], "target": dataclasses.asdict(self.target),
                 "budget": self.budget, "seed": self.seed, "k": self.k_fraction, "corrupt": self.corrupt,
                 "corrupt_setup": [exp.robustness.corrupt_scale, exp.robustness.corrupt_index],
                 "prune": self.prune_ratio, "train_fraction": self.train_fraction,
                 "stage1": [exp.stage1.matrix_patterns, exp.stage1.conv_as_matrix]}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{self.target.name}-{self.method.label}-s{len(self.sources)}-n{self.budget:g}-seed{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.+\-=]", "_", name) + "-" + digest


def plan(exp: Experiment) -> list[Run]:
    """Every run of the experiment, grouped so that runs sharing a merged basis are adjacent."""
    runs = []
    rb = exp.robustness
    for target in exp.targets:
        pool = tuple(s for s in exp.sources if s.name != target.name)
        levels = [n for n in (exp.levels or range(1, len(pool) + 1)) if n <= len(pool)]
        for method in exp.methods:
            uses = method.uses_sources
            trained = method.name != "zeroshot"
            for level in (levels if uses else [0]):
                for k in (exp.stage1.k_fractions if method.is_merge else [None]):
                    for corrupt in (rb.corrupt if uses else [False]):
                        for prune in (rb.prune_ratios if uses else [0.0]):
                            for seed in (exp.seeds if trained else exp.seeds[:1]):
                                for frac in (rb.train_fractions if trained else [1.0]):
                                    for budget in (exp.budgets if method.name not in ("zeroshot", "linear-probe")
                                                   else [0.0]):
                                        runs.append(Run(method, target, pool[:level], budget, seed, k,
                                                        corrupt, prune, frac))
    return runs


# --- running ---

@dataclass
class _Snapshot:
    """The ``adapt.recipe.Snapshot`` an alternative basis hands Stage 2 (no basis version on disk: 0)."""

    version: int
    factors: dict[str, stage1.Factors]
    means: dict[str, Tensor]


@dataclass
class Outcome:
    """What one run measured, and the trained model and head (kept for the test-time studies)."""

    model: nn.Module
    head: Tensor
    trainable: int
    val_accuracy: float
    test_accuracy: float
    step_seconds: float | None


def treated(run: Run, task_vectors: Sequence[dict[str, Tensor]], rb: Robustness,
            matrices: Collection[str]) -> list[dict[str, Tensor]]:
    """The run's task vectors (one per source, in order) after its robustness treatment: magnitude
    pruning of every tensor, and Gaussian noise on the matrices of the one corrupted source."""
    out = []
    for i, tv in enumerate(task_vectors):
        if run.prune_ratio > 0:
            tv = {n: merges.magnitude_prune(d, run.prune_ratio) for n, d in tv.items()}
        if run.corrupt and i == min(rb.corrupt_index, len(task_vectors) - 1):
            tv = {n: merges.corrupt(d, merges.tensor_seed(0, n), rb.corrupt_scale) if n in matrices else d
                  for n, d in tv.items()}
        out.append(tv)
    return out


class _Harness:
    """The state shared by the runs of one evaluation: the base's names, the loaded task vectors, caches."""

    def __init__(self, exp: Experiment, echo: Echo):
        from axis_stream.adapt.recipe import pick_device

        self.exp = exp
        self.echo = echo
        self.device = pick_device(exp.adapt.device)
        base_sd = models.create_base(exp.base).state_dict()
        self.base_sd = {k: v.detach() for k, v in base_sd.items()}
        self.matrices = models.matrix_names(self.base_sd, exp.stage1.matrix_patterns, exp.stage1.conv_as_matrix)
        if not self.matrices:
            raise ConfigError(f"stage1.matrix_patterns: no parameter of {exp.base.model} matches "
                              f"{exp.stage1.matrix_patterns}")
        self.shapes = [tuple(models.as_matrix(self.base_sd[n]).shape) for n in self.matrices]
        self._task_vectors: dict[str, dict[str, Tensor]] = {}
        self._basis: tuple[tuple, _Snapshot] | None = None
        self._train_sizes: dict[str, int] = {}

    def task_vector(self, source: SourceSpec) -> dict[str, Tensor]:
        """``theta_i - theta_pre`` of one source, read and validated once (lazily, tensor by tensor)."""
        if source.name not in self._task_vectors:
            with ingest.read_checkpoint(source.path, self.base_sd, required=self.matrices) as ckpt:
                tv = {n: d for n in ckpt.names if (d := ckpt.delta(n)) is not None}
                ckpt.finish()
            self._task_vectors[source.name] = tv
        return self._task_vectors[source.name]

    def prepared(self, run: Run) -> list[dict[str, Tensor]]:
        """The run's source task vectors after the robustness treatment (corruption, pruning)."""
        return treated(run, [self.task_vector(s) for s in run.sources], self.exp.robustness, self.matrices)

    def basis(self, run: Run) -> _Snapshot:
        """The run's merged basis, built once for all the budgets and data fractions that share it."""
        key = run.basis_key()
        if self._basis is None or self._basis[0] != key:
            factors, means = merges.build_basis(run.method.name, self.prepared(run), self.matrices,
                                                k_fraction=run.k_fraction, seed=run.seed, params=run.method.params)
            self._basis = (key, _Snapshot(0, factors, means))
        return self._basis[1]

    def budget_count(self, n_fraction: float) -> int:
        """AXIS's Stage 2 trainable count at N: the top ``k_for(shape, N)`` values of every matrix."""
        return sum(stage1.k_for(shape, n_fraction) for shape in self.shapes)

    # --- one run ---

    def max_train(self, run: Run, hp: AdaptConfig, base: nn.Module) -> int | None:
        """The train-split cap for the run's data fraction (of the split the experiment otherwise uses)."""
        if run.train_fraction >= 1:
            return self.exp.max_train_samples
        name = run.target.name
        if name not in self._train_sizes:
            self._train_sizes[name] = len(self.splits(run, hp, self.exp.max_train_samples, base).train)
        return max(1, int(run.train_fraction * self._train_sizes[name]))

    def target(self, run: Run):
        from axis_stream.adapt.data import resolve_target

        t = run.target
        return resolve_target(t.dataset, self.exp.data_root, t.classnames or None, t.templates or None)

    def splits(self, run: Run, hp: AdaptConfig, max_train: int | None, base: nn.Module):
        from axis_stream.adapt.data import make_splits, transforms_for

        return make_splits(self.target(run), *transforms_for(base), val_fraction=hp.val_fraction,
                           val_max=hp.val_max, max_train=max_train, max_eval=self.exp.max_eval_samples)

    def execute(self, run: Run, out_dir: Path) -> list[dict[str, Any]]:
        """Train and evaluate one run; returns its rows (one per test-time patch-dropout level)."""
        from axis_stream.adapt.recipe import Amp, evaluate

        started = time.monotonic()
        hp = run.settings(self.exp.adapt)
        base = models.create_base(self.exp.base).to(self.device)
        max_train = self.max_train(run, hp, base)
        if run.method.name in ("zeroshot", "linear-probe"):
            outcome = self._reference(run, hp, max_train, base)
        else:
            outcome = self._stage2(run, hp, max_train, base, out_dir)
        splits = self.splits(run, hp, max_train, outcome.model.base)
        peak = self._peak_memory(outcome, splits.train, hp.batch_size)
        rows = []
        for row in run.rows(self.exp.robustness.patch_dropout):
            if row["patch_dropout"] == 0:
                test = outcome.test_accuracy
            else:
                with references.patch_dropout(outcome.model.base, row["patch_dropout"], seed=0):
                    test = evaluate(outcome.model, outcome.head, splits.test, hp, self.device, Amp(self.device, hp.amp))
            rows.append(dict(row, trainable_params=outcome.trainable, val_accuracy=outcome.val_accuracy,
                             test_accuracy=test, peak_memory_mb=peak / 2**20, step_seconds=outcome.step_seconds,
                             seconds=time.monotonic() - started))
        return rows

    def _stage2(self, run: Run, hp: AdaptConfig, max_train: int | None, base: nn.Module, out_dir: Path) -> Outcome:
        """Stage 2's recipe, unchanged, on the run's model: a merged basis, aTLAS, or LoRA."""
        from safetensors.torch import load_file

        from axis_stream.adapt.model import SVDAdapted
        from axis_stream.adapt.recipe import HEAD_FILE, JobSettings, adapt

        built: list[nn.Module] = []
        snapshot = self.basis(run) if run.method.is_merge else _Snapshot(0, {}, {})
        budget = self.budget_count(run.budget)
        params = run.method.params

        def build(base: nn.Module, hp: AdaptConfig) -> nn.Module:
            if run.method.is_merge:
                model = SVDAdapted(base, snapshot.factors, snapshot.means, hp.n_fraction, seed=hp.seed,
                                   start_scale=hp.start_scale)
            elif run.method.name == "atlas":
                tvs = self.prepared(run)
                n_2d, n_other = (len(x) for x in atlas.scaled_tensors(base, tvs, params["scope"]))
                p = params["partitions"] or atlas.p_for_budget(budget, len(tvs), max(n_2d, 1), n_other)
                model = atlas.ATLAS(base, tvs, p, scope=params["scope"], seed=hp.seed)
            else:
                rank = params["rank"] or references.lora_rank_for_budget(budget, self.shapes)
                model = references.LoRA(base, self.matrices, rank, alpha=params["alpha"] or None, seed=hp.seed)
            built.append(model)
            return model

        t = run.target
        job = JobSettings(t.dataset, hp, self.exp.data_root, t.classnames or None, t.templates or None,
                          max_train_samples=max_train, max_eval_samples=self.exp.max_eval_samples)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = adapt(base, self.exp.base, snapshot, job, out_dir, self._progress(run), build=build)
        head = load_file(str(out_dir / HEAD_FILE))["head"].to(self.device)
        return Outcome(built[0], head, report["trainable_params"], report["val_accuracy"], report["test_accuracy"],
                       report.get("step_seconds"))

    def _reference(self, run: Run, hp: AdaptConfig, max_train: int | None, base: nn.Module) -> Outcome:
        """Zero-shot (evaluation only) and the linear probe (the head trained on frozen features)."""
        import open_clip

        from axis_stream.adapt.head import zero_shot_head
        from axis_stream.adapt.recipe import Amp, evaluate

        target = self.target(run)
        head = zero_shot_head(base, open_clip.get_tokenizer(self.exp.base.model), target.classnames,
                              target.templates, device=self.device)
        model = references.Frozen(base)
        splits = self.splits(run, hp, max_train, base)
        if run.method.name == "zeroshot":
            amp = Amp(self.device, hp.amp)
            val = evaluate(model, head, splits.val, hp, self.device, amp)
            test = evaluate(model, head, splits.test, hp, self.device, amp)
            return Outcome(model, head, 0, val, test, None)
        feats = {name: references.features(model, getattr(splits, name), hp.batch_size, self.device, hp.num_workers)
                 for name in ("train", "val", "test")}
        tic = time.perf_counter()
        head, val = references.linear_probe(feats["train"], feats["val"], head, epochs=hp.epochs, lr=hp.lr,
                                            weight_decay=hp.weight_decay, batch_size=hp.batch_size,
                                            grad_clip=hp.grad_clip, seed=hp.seed)
        steps = hp.epochs * math.ceil(len(feats["train"][1]) / hp.batch_size)
        test = references.accuracy(*feats["test"], head)
        return Outcome(model, head, head.numel(), val, test, (time.perf_counter() - tic) / max(steps, 1))

    def _peak_memory(self, outcome: Outcome, train: Any, batch_size: int) -> int:
        """Peak memory of one training step of the run's model on one batch (``baselines.memory``)."""
        from axis_stream.adapt.head import logits

        images, labels = next(iter(torch.utils.data.DataLoader(train, batch_size=batch_size)))
        images, labels = images.to(self.device), labels.to(self.device)
        model = outcome.model
        model.train()

        def step() -> None:
            loss = F.cross_entropy(logits(model.call("encode_image", images), outcome.head), labels)
            if loss.requires_grad:
                loss.backward()

        peak = step_peak_bytes(model, step, self.device)
        model.zero_grad(set_to_none=True)
        return peak

    def _progress(self, run: Run) -> Callable[[dict[str, Any]], None]:
        def progress(event: dict[str, Any]) -> None:
            if event.get("phase") == "validate":
                self.echo(f"    epoch {event['epoch']}/{event['epochs']}: val {event['val_accuracy']:.2%}")
        return progress


RUN_ERRORS = (AxisError, ValueError, RuntimeError)
"""What a failing run raises (bad data, a method that cannot apply): reported and left out, retried by a restart."""


def run_experiment(exp: Experiment, echo: Echo = print) -> list[dict[str, str]]:
    """Run every row not yet in ``<output_dir>/results.csv``, then summarise and plot; returns all rows.

    A run that fails (bad data, a method that cannot apply) is reported and left out, so a restart
    retries it; the experiment goes on with the other runs. Raises ``AxisError`` at the end if any failed.
    Runs execute here one after another, or with ``executor = "ray"`` as tasks on a Ray cluster
    (``executors.evaluate_on_ray``); either way only this process appends rows, each once, and a
    second evaluation on the same ``output_dir`` is refused while this one runs.
    """
    exp.output_dir.mkdir(parents=True, exist_ok=True)
    with atomic.file_lock(exp.output_dir / LOCK, blocking=False) as got:
        if not got:
            raise AxisError(f"{exp.output_dir}: another axis-stream evaluate is running on this output_dir; "
                            "wait for it to finish (a re-run then resumes) or choose another output_dir")
        return _run_locked(exp, echo)


def _run_locked(exp: Experiment, echo: Echo) -> list[dict[str, str]]:
    """``run_experiment`` once this process holds the output folder."""
    results = Results(exp.output_dir / RESULTS)
    runs = plan(exp)
    todo = [r for r in runs if not all(results.has(row) for row in r.rows(exp.robustness.patch_dropout))]
    echo(f"{len(runs)} runs planned, {len(runs) - len(todo)} already in {results.path}, {len(todo)} to go")
    outcomes = (executors.evaluate_on_ray(exp, todo, echo) if exp.executor == "ray" and todo
                else _run_here(exp, todo, echo))
    failed = []
    for run, rows in outcomes:
        if isinstance(rows, Exception):
            failed.append(run)
            echo(f"    FAILED: {str(rows).splitlines()[0] if str(rows) else type(rows).__name__}")
            continue
        results.append(rows)
        echo(f"    test {rows[0]['test_accuracy']:.2%}, {rows[0]['trainable_params']} trainable, "
             f"peak {rows[0]['peak_memory_mb']:.1f} MiB")
    rows = results.rows()
    for line in summary(rows):
        echo(line)
    for path in plot(rows, exp.output_dir / "plots"):
        echo(f"plot: {path}")
    if failed:
        raise AxisError(f"{len(failed)} of {len(todo)} runs failed (see above); run again to retry them")
    return rows


def _run_here(exp: Experiment, todo: Sequence[Run], echo: Echo):
    """The local executor: each run in this process, one after another; yields (run, rows or its error)."""
    harness = make_harness(exp, echo) if todo else None
    for i, run in enumerate(todo, 1):
        echo(run_title(i, len(todo), run))
        try:
            rows = harness.execute(run, run_dir(exp, run))
        except RUN_ERRORS as exc:
            yield run, exc
            continue
        yield run, rows


def make_harness(exp: Experiment, echo: Echo):
    """The harness that executes runs: the generic one, or a real offline suite's."""
    return _Harness(exp, echo) if not exp.suite else _suite_harness(exp, echo)


def run_dir(exp: Experiment, run: Run) -> Path:
    """Where a run's Stage 2 files go (and a stopped run resumes from)."""
    return exp.output_dir / "runs" / run.folder(exp)


def run_title(i: int, n: int, run: Run) -> str:
    """The line announcing run ``i`` of ``n``."""
    return (f"[{i}/{n}] {run.method.label} -> {run.target.name}: {len(run.sources)} sources, "
            f"N={run.budget:g}, seed {run.seed}" + _variant(run))


def _suite_harness(exp: Experiment, echo: Echo):
    """The harness for a real offline suite: same plan and results, the suite's model, data and head."""
    from axis_stream.suites.harness import SuiteHarness

    return SuiteHarness(exp, echo)


def _variant(run: Run) -> str:
    parts = [f"K={run.k_fraction:g}" if run.k_fraction is not None else "",
             "corrupted" if run.corrupt else "", f"pruned {run.prune_ratio:g}" if run.prune_ratio else "",
             f"{run.train_fraction:.0%} data" if run.train_fraction < 1 else ""]
    return "".join(f", {p}" for p in parts if p)


# --- the summary table and the plots ---

DEFAULTS = {"corrupt": "no", "prune_ratio": "0", "train_fraction": "1", "patch_dropout": "0"}
SWEEPS = ("k_fraction", "corrupt", "prune_ratio", "train_fraction", "patch_dropout")


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _default_rows(rows: Sequence[Mapping[str, str]], but: str | None = None) -> list[Mapping[str, str]]:
    """Rows at the default robustness settings and the first K (except along the ``but`` axis)."""
    ks = sorted({r["k_fraction"] for r in rows if r["k_fraction"]}, key=float)
    default_k = "0.1" if "0.1" in ks else (ks[0] if ks else "")
    return [r for r in rows
            if all(r[k] == v for k, v in DEFAULTS.items() if k != but)
            and (but == "k_fraction" or r["k_fraction"] in ("", default_k))]


def summary(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Mean test accuracy per method and budget over targets, aggregation levels and seeds (default settings)."""
    rows = _default_rows(rows)
    if not rows:
        return ["no results yet"]
    budgets = sorted({r["budget"] for r in rows}, key=float)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = ["method"] + [("N=" + b if float(b) > 0 else "no budget") for b in budgets] + ["params (max)"]
    table = [head]
    for m in methods:
        line = [m]
        for b in budgets:
            acc = [float(r["test_accuracy"]) for r in rows if r["method"] == m and r["budget"] == b]
            line.append(f"{_mean(acc):.2%} ({len(acc)})" if acc else "-")
        line.append(str(max(int(r["trainable_params"]) for r in rows if r["method"] == m)))
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["mean test accuracy (number of rows) at default settings:"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return lines


def plot(rows: Sequence[Mapping[str, str]], out_dir: Path) -> list[Path]:
    """PNG plots: accuracy vs number of sources and vs trainable parameters, and one per swept setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
        written.append(path)

    base = _default_rows(rows)
    if not base:
        return written
    groups = _group(base, ("method", "budget"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ((method, budget), grp) in enumerate(groups.items()):
        label = method + (f" N={budget}" if float(budget) > 0 else "")
        by_level = _group(grp, ("sources",))
        xs = sorted(int(k[0]) for k in by_level)
        ys = [_mean([float(r["test_accuracy"]) for r in by_level[(str(x),)]]) for x in xs]
        if xs == [0]:  # a reference that uses no sources: a level line
            ax.axhline(ys[0], linestyle="--", linewidth=1, label=label, color=f"C{i % 10}")
        else:
            ax.plot(xs, ys, marker="o", label=label, color=f"C{i % 10}")
    ax.set_xlabel("number of source models")
    ax.set_ylabel("mean test accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_sources.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method,), grp in _group(base, ("method",)).items():
        pts = sorted((_mean([float(r["trainable_params"]) for r in g]), _mean([float(r["test_accuracy"]) for r in g]))
                     for g in _group(grp, ("budget",)).values())
        ax.plot([max(p[0], 1) for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (zero-shot drawn at 1)")
    ax.set_ylabel("mean test accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_params.png")

    for axis in SWEEPS:
        swept = _default_rows(rows, but=axis)
        values = {r[axis] for r in swept if r[axis] != ""}
        if len(values) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (method, budget), grp in _group(swept, ("method", "budget")).items():
            by_value = _group([r for r in grp if r[axis] != ""], (axis,))
            if len(by_value) < 2:
                continue
            xs = sorted(by_value, key=lambda k: _numeric(k[0]))
            ax.plot([_numeric(x[0]) for x in xs], [_mean([float(r["test_accuracy"]) for r in by_value[x]]) for x in xs],
                    marker="o", label=method + (f" N={budget}" if float(budget) > 0 else ""))
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("mean test accuracy")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, f"accuracy_vs_{axis}.png")
    return written


def _numeric(value: str) -> float:
    return {"yes": 1.0, "no": 0.0}[value] if value in ("yes", "no") else float(value)


def _group(rows: Sequence[Mapping[str, str]], keys: Sequence[str]) -> dict[tuple[str, ...], list[Mapping[str, str]]]:
    out: dict[tuple[str, ...], list[Mapping[str, str]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out
