"""The plan: which runs an experiment makes, in which order, and where each one's files go."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised only on Python 3.10
    pass







from axis_stream.config import AdaptConfig
from axis_stream.experiments.evaluate.experiment import Experiment, MethodSpec, SourceSpec, TargetSpec
from axis_stream.experiments.evaluate.merged import order_free


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
                 "stage1": [exp.stage1.matrix_patterns, exp.stage1.conv_as_matrix]
                 + ([exp.stage1.calibration] if self.method.name == "axis" else [])}  # only streaming AXIS reads it
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{self.target.name}-{self.method.label}-s{len(self.sources)}-n{self.budget:g}-seed{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.+\-=]", "_", name) + "-" + digest


def arrival(sources: Sequence[SourceSpec], order: int) -> list[SourceSpec]:
    """The sources in arrival order ``order``: 0 is the file's order, ``k >= 1`` the seeded permutation
    ``random.Random(k).sample(sources, len(sources))``."""
    return list(sources) if order == 0 else random.Random(order).sample(list(sources), len(sources))


def order_variants(exp: Experiment) -> list[tuple[int, Experiment]]:
    """One experiment per arrival order of ``exp.orders``: its sources in that order, its files in
    ``<output_dir>/order-<k>/`` (a single order 0: ``exp`` itself, as before orders existed).

    With order 0 among several, a merge whose result does not depend on the order (``merged.order_free``)
    is trained with Stage 2 in order 0 only: at all sources it would give the same rows, and at fewer
    the order only picks another subset; a method without sources (zero-shot, linear probe, LoRA) runs
    in order 0 only. Runs without Stage 2 are cheap and stay in every order."""
    if exp.orders == [0]:
        return [(0, exp)]
    out = []
    for k in exp.orders:
        methods = [m for m in exp.methods if k == 0 or 0 not in exp.orders or m.merged_only
                   or (m.uses_sources and not (m.is_merge and order_free(m.name)))]
        out.append((k, dataclasses.replace(exp, orders=[k], sources=arrival(exp.sources, k), methods=methods,
                                           output_dir=exp.output_dir / f"order-{k}")))
    return out


def plan(exp: Experiment) -> list[Run]:
    """Every run of the experiment, grouped so that runs sharing a merged basis are adjacent (also
    across targets whose pools are the same), so each basis is built once."""
    runs = []
    rb = exp.robustness
    for target in exp.targets:
        pool = tuple(s for s in exp.sources if s.name != target.name)
        levels = [n for n in (exp.levels or range(1, len(pool) + 1)) if n <= len(pool)]
        for method in exp.methods:
            uses = method.uses_sources
            fits = method.fits
            for level in (levels if uses else [0]):
                for k in (exp.stage1.k_fractions if method.is_merge else [None]):
                    for corrupt in (rb.corrupt if uses else [False]):
                        for prune in (rb.prune_ratios if uses else [0.0]):
                            for seed in (exp.seeds if fits or method.is_merge else exp.seeds[:1]):
                                for frac in (rb.train_fractions if fits else [1.0]):
                                    for budget in (exp.budgets if method.trains else [0.0]):
                                        runs.append(Run(method, target, pool[:level], budget, seed, k,
                                                        corrupt, prune, frac))
    first: dict[tuple, int] = {}
    for r in runs:
        first.setdefault(r.basis_key(), len(first))
    return sorted(runs, key=lambda r: first[r.basis_key()])


def run_dir(exp: Experiment, run: Run) -> Path:
    """Where a run's Stage 2 files go (and a stopped run resumes from)."""
    return exp.output_dir / "runs" / run.folder(exp)


def run_title(i: int, n: int, run: Run) -> str:
    """The line announcing run ``i`` of ``n``."""
    return (f"[{i}/{n}] {run.method.label} -> {run.target.name}: {len(run.sources)} sources, "
            f"N={run.budget:g}, seed {run.seed}" + _variant(run))


def _variant(run: Run) -> str:
    parts = [f"K={run.k_fraction:g}" if run.k_fraction is not None else "",
             "corrupted" if run.corrupt else "", f"pruned {run.prune_ratio:g}" if run.prune_ratio else "",
             f"{run.train_fraction:.0%} data" if run.train_fraction < 1 else ""]
    return "".join(f", {p}" for p in parts if p)
