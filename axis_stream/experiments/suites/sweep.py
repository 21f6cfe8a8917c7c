"""The sources sweep of a suite: accuracy and cost against the number of sources, and robustness at
the largest pool (paper Figures 1, 4, 20-22, Table 19).

``run_sweep`` runs a sweep experiment file (levels 1, 2, 5, ... sources of one fixed pool order,
with test-time input dropout), a robustness file at the largest pool (pruned sources) and that
file's noisy-source variants (one per noise scale, each in its own ``noise-<scale>/`` folder), all with
``axis-stream evaluate``'s engine (resumable), then writes markdown tables: test accuracy per method
and number of sources, the models' accuracy before Stage 2 (each run's ``run.json``), the cost
columns, the robustness tables and what AXIS's top-K keeps of each source.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from axis_stream.core import layout, stage1, svd
from axis_stream.experiments.evaluate.experiment import Experiment, load_experiment
from axis_stream.experiments.evaluate.plan import plan, run_dir
from axis_stream.experiments.evaluate.results import RESULTS
from axis_stream.experiments.evaluate.runner import run_experiment
from axis_stream.experiments.suites.harness import SuiteHarness, make_suite
from axis_stream.experiments.suites.prepare import prepare
from axis_stream.experiments.suites.report import read_rows
from axis_stream.store.atomic import atomic_write_bytes, atomic_write_json

NOISE_SCALES = (0.1, 0.01)
"""One noisy source's per-entry noise std, as a fraction of each task matrix's Frobenius norm: on
MiniLM's 384-wide matrices about 40x (the source is in effect replaced by noise) and 4x the
source's own change in Frobenius norm."""

LABELS = {"zeroshot": "base + frozen head (zero-shot)", "axis": "AXIS, streaming (Basis fold)",
          "axis-global": "AXIS, global Stage 1", "ta": "task arithmetic + Stage 2", "average": "average + Stage 2",
          "ties": "TIES + Stage 2", "dare": "DARE + Stage 2", "tsvm": "TSV-M + Stage 2",
          "atlas": "aTLAS, matched budget", "axis-start0.05": "AXIS, streaming, Stage 2 from Lambda = s / 20",
          "axis-start0": "AXIS, streaming, Stage 2 from Lambda = 0"}


def noise_variants(exp: Experiment, scales: Sequence[float] = NOISE_SCALES) -> list[Experiment]:
    """The robustness experiment with one corrupted source (the first of the pool) at each scale,
    unpruned and without input dropout, each in ``<output_dir>/../noise-<scale>``."""
    out = []
    for scale in scales:
        rb = dataclasses.replace(exp.robustness, corrupt=[True], corrupt_scale=scale, prune_ratios=[0.0],
                                 patch_dropout=[0.0])
        out.append(dataclasses.replace(exp, robustness=rb, output_dir=exp.output_dir.parent / f"noise-{scale:g}"))
    return out


def starts(exp: Experiment) -> dict[tuple[str, ...], float]:
    """Each finished run's test accuracy before Stage 2 (from its ``run.json``), keyed like the rows."""
    out = {}
    for run in plan(exp):
        path = run_dir(exp, run) / "run.json"
        if path.exists():
            key = (run.method.label, run.target.name, str(len(run.sources)), f"{run.prune_ratio:g}", str(run.seed))
            out[key] = json.loads(path.read_text())["start_test_accuracy"]
    return out


def _pct(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _target_mean(rows: Sequence[Mapping[str, str]], targets: Sequence[str], value: Callable[[Mapping], float]
                 ) -> list[float]:
    """Per seed, the mean over targets (only seeds with every target); a list over seeds."""
    by_seed: dict[str, dict[str, float]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["target"]] = value(r)
    return [statistics.fmean(d[t] for t in targets) for d in by_seed.values() if all(t in d for t in targets)]


def grid(rows: Sequence[Mapping[str, str]], column: str, values: Sequence[str], targets: Sequence[str],
         value: Callable[[Mapping], float | None] = lambda r: float(r["test_accuracy"]),
         methods: Sequence[str] | None = None, costs: str | None = None) -> list[str]:
    """A markdown table: one line per method, one column per value of ``column`` (cells: the mean over
    targets, ± the spread over seeds where there are several); ``costs``: the ``column`` value whose
    peak memory and step time are added."""
    methods = methods or list(dict.fromkeys(r["method"] for r in rows))
    head = f"| method \\ {column.replace('_', ' ')} | {' | '.join(values)} |" + (" peak MiB | step s |" if costs else "")
    out = [head, "|---|" + "---:|" * (len(values) + (2 if costs else 0))]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        cells = []
        for v in values:
            sel = [r for r in mine if r[column] == v and value(r) is not None]
            sel = [dict(r, _v=value(r)) for r in sel]
            cells.append(_pct(_target_mean(sel, targets, lambda r: r["_v"])))
        line = f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |"
        if costs:
            at = [r for r in mine if r[column] == costs]
            mem = [float(r["peak_memory_mb"]) for r in at]
            step = [float(r["step_seconds"]) for r in at if r["step_seconds"]]
            line += f" {statistics.fmean(mem):.0f} |" if mem else " - |"
            line += f" {statistics.median(step):.2f} |" if step else " - |"
        out.append(line)
    return out


@torch.no_grad()
def global_selection(harness: SuiteHarness, names: Sequence[str], k_fraction: float = 0.10) -> dict[str, Any]:
    """What Algorithm 1's top-K keeps when all of ``names`` are merged at once: per source, how many of
    the kept components of all matrices are its own, and the share of the sources' energy kept."""
    counts = {n: 0 for n in names}
    kept = total = 0.0
    for m in harness.matrices:
        mats = [layout.as_matrix(harness.task_vectors[n][m]).double() for n in names]
        k = stage1.k_for(mats[0].shape, k_fraction)
        parts = [svd.exact_svd(d) for d in mats]
        s = torch.cat([p[1] for p in parts])
        src = torch.cat([torch.full((p[1].numel(),), i) for i, p in enumerate(parts)])
        top = torch.sort(s, descending=True, stable=True).indices[:k]
        for i in src[top].tolist():
            counts[names[i]] += 1
        kept += float(s[top].square().sum())
        total += float(s.square().sum())
    return {"components": counts, "energy_kept": kept / total}


def run_sweep(sweep_config: Path, robust_config: Path | None, out: Path, tables_only: bool = False,
              noise_scales: Sequence[float] = NOISE_SCALES, selection: bool = True,
              more: Sequence[Path] = ()) -> str:
    """Run the sweep, the robustness file and its noise variants (resumable), then write the tables;
    ``more``: experiment files on the same pool (other methods or starts at some levels) whose rows
    join the sweep's tables; ``selection``: add what AXIS global's top-K keeps of each source at the
    largest pool."""
    sweep = load_experiment(sweep_config)
    extra = [load_experiment(p) for p in more]
    robust = load_experiment(robust_config) if robust_config else None
    noisy = noise_variants(robust, noise_scales) if robust else []
    suite = make_suite(sweep.suite, sweep.data_root)
    exps = [sweep] + extra + ([robust] if robust else []) + noisy
    if not tables_only:
        if not suite.data_dir.exists():
            prepare(sweep.suite, suite.data_dir)
        for exp in exps:
            run_experiment(exp, print)
    targets = [t.name for t in sweep.targets]
    levels = [str(n) for n in sweep.levels]
    rows = read_rows(sweep.output_dir / RESULTS) + [r for e in extra for r in read_rows(e.output_dir / RESULTS)]
    clean = [r for r in rows if r["patch_dropout"] == "0"]
    zero = [dict(r, sources=v) for r in clean if r["method"] == "zeroshot" for v in levels]
    seeds = sorted({r["seed"] for r in clean if r["method"] != "zeroshot"})
    text = [f"### {sweep.suite}: test accuracy % against the number of sources (mean over "
            f"{', '.join(targets)}; seeds {', '.join(seeds)}; cost columns at {levels[-1]} sources)", ""]
    text += grid(zero + [r for r in clean if r["method"] != "zeroshot"], "sources", levels, targets,
                 costs=levels[-1])
    start = {k: v for e in [sweep] + extra for k, v in starts(e).items()}

    def before(r: Mapping[str, str]) -> float | None:
        return start.get((r["method"], r["target"], r["sources"], r["prune_ratio"], r["seed"]))

    text += ["", f"### {sweep.suite}: the same models before Stage 2 (test accuracy %; a merge: the merged model)", ""]
    text += grid([r for r in clean if r["method"] not in ("zeroshot",)], "sources", levels, targets, before)
    for t in targets:
        text += ["", f"#### {t}: test accuracy % against the number of sources", ""]
        text += grid([r for r in zero + clean if r["target"] == t], "sources", levels, [t])
    largest = [r for r in rows if r["sources"] == levels[-1] or r["method"] == "zeroshot"]
    drops = sorted({r["patch_dropout"] for r in largest}, key=float)
    if len(drops) > 1:
        text += ["", f"### {sweep.suite}: test-time token dropout at {levels[-1]} sources (dropout; test %)", ""]
        text += grid(largest, "patch_dropout", drops, targets)
    clean = [r for r in largest if r["patch_dropout"] == "0" and r["method"] != "zeroshot"]
    if robust:
        rrows = [r for r in read_rows(robust.output_dir / RESULTS) if r["patch_dropout"] == "0"]
        prunes = ["0"] + [f"{p:g}" for p in robust.robustness.prune_ratios if p]
        text += ["", f"### {sweep.suite}: all {levels[-1]} sources magnitude-pruned (prune ratio; test %)", ""]
        text += grid(clean + rrows, "prune_ratio", prunes, targets)
        noise_rows = [dict(r, corrupt="clean") for r in clean]
        for exp in noisy:
            noise_rows += [dict(r, corrupt=f"{exp.robustness.corrupt_scale:g}")
                           for r in read_rows(exp.output_dir / RESULTS)]
        text += ["", f"### {sweep.suite}: one noisy source (the first) among {levels[-1]} (noise scale; test %)", ""]
        text += grid(noise_rows, "corrupt", ["clean"] + [f"{s:g}" for s in noise_scales], targets)
    text += ["", *kept_lines(sweep)]
    if selection:
        names = [s.name for s in sweep.sources][:int(levels[-1])]
        cache = sweep.output_dir / "selection.json"
        sel = json.loads(cache.read_text()) if cache.exists() else {}
        if list(sel.get("components", {})) != names:
            sel = global_selection(SuiteHarness(sweep, lambda line: None), names)
            atomic_write_json(cache, sel)
        counts = sel["components"]
        text += [f"### AXIS global at {len(names)} sources: components of each source among the top-K of all "
                 f"matrices ({sum(counts.values())} kept; "
                 f"{100 * sel['energy_kept']:.1f} % of the sources' energy)", "",
                 "| " + " | ".join(counts) + " |", "|" + "---:|" * len(counts),
                 "| " + " | ".join(str(c) for c in counts.values()) + " |"]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, ("\n".join(text) + "\n").encode())
    return "\n".join(text)


def kept_lines(exp: Experiment) -> list[str]:
    """What the streaming basis kept of each source as it arrived (its ``folds.json``)."""
    out = []
    for log in sorted((exp.output_dir / "bases").glob("*/folds.json")):
        folds = json.loads(log.read_text())
        if not folds:
            continue
        out += [f"### streaming AXIS ({log.parent.name}): components of each new source entering the top-K, "
                f"and the energy of the source they carry", "",
                "| fold | source | components kept (of all matrices) | energy kept |", "|---:|---|---:|---:|"]
        out += [f"| {f['version']} | {f['source']} | {f['new_kept_total']} | {100 * f['energy_kept']:.1f} % |"
                for f in folds]
        out.append("")
    return out
