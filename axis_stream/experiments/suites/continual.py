"""The streaming peers on a suite (issue 18): AXIS, OPCM, continual TA / TIES / averaging and the
batch merges, as merged models (multi-task accuracy, backward transfer, fold time, state size) and
after the same Stage 2 on held-out targets, in several arrival orders.

``run_continual`` runs one experiment file with ``multitask = true`` and several ``orders`` through
``axis-stream evaluate``'s engine (resumable): the multi-task pass only (evaluations, cheap), or with
``stage2`` the transfer runs of every order too; then it writes markdown tables. Cells are the mean
over the arrival orders ± their standard deviation (a single number: one order). The references are
the base model and each source's own fine-tune on the same source tasks.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from axis_stream.experiments.evaluate import multitask
from axis_stream.experiments.evaluate.experiment import Experiment, load_experiment
from axis_stream.experiments.evaluate.plan import order_variants, plan
from axis_stream.experiments.evaluate.results import RESULTS
from axis_stream.experiments.evaluate.runner import run_experiment
from axis_stream.experiments.suites.harness import SuiteHarness, make_suite
from axis_stream.experiments.suites.prepare import prepare
from axis_stream.experiments.suites.report import read_rows
from axis_stream.experiments.suites.sweep import _pct
from axis_stream.experiments.suites.train import accuracy
from axis_stream.store.atomic import atomic_write_bytes, atomic_write_json

LABELS = {"axis": "AXIS, streaming (Basis fold)", "opcm": "OPCM", "continual-ta": "continual task arithmetic",
          "continual-ties": "continual TIES", "running-average": "running average", "tsvm": "TSV-M (batch)",
          "ties": "TIES (batch)", "ta": "task arithmetic (batch)", "average": "average (batch)",
          "zeroshot": "base + frozen head (zero-shot)"}
REFERENCES = "references.json"


def plan_lines(exp: Experiment) -> list[str]:
    """What a run would do, without loading a model: the multi-task passes, and per order its
    sources and the runs planned per method (and how many are in its results.csv already)."""
    merges = [m.label for m in exp.methods if m.is_merge]
    lines = [f"{exp.output_dir}: {len(exp.sources)} sources, levels {exp.levels or 'all'}, orders {exp.orders}",
             f"multi-task pass: {'on' if exp.multitask else 'off'}, {len(merges)} merges x {len(exp.orders)} orders "
             f"({', '.join(merges)})"]
    for order, variant in order_variants(exp):
        runs = plan(variant)
        done = {tuple(r[k] for k in ("method", "target", "sources")) for r in read_rows(variant.output_dir / RESULTS)}
        have = sum(1 for r in runs if (r.method.label, r.target.name, str(len(r.sources))) in done)
        per = Counter(r.method.label for r in runs)
        lines.append(f"order {order} ({', '.join(s.name for s in variant.sources[:4])}, ...): {len(runs)} runs, "
                     f"{have} done: " + ", ".join(f"{m} {n}" for m, n in per.items()))
    return lines


@torch.no_grad()
def references(exp: Experiment) -> dict[str, dict[str, float]]:
    """Each source task's test accuracy with the base model and with its own fine-tune (the head its
    source was fine-tuned with), cached in ``<output_dir>/references.json``."""
    path = exp.output_dir / REFERENCES
    names = [s.name for s in exp.sources]
    if path.exists():
        cached = json.loads(path.read_text())
        if set(cached.get("base", {})) == set(names):
            return cached
    harness = SuiteHarness(exp, print)
    model = harness._base()
    out: dict[str, dict[str, float]] = {"base": {}, "own fine-tune": {}}
    for name in names:
        task = harness.suite.task(name)
        head = harness.suite.head(model, task)
        for key, state in (("base", harness.base_sd), ("own fine-tune", load_file(harness.paths[name]))):
            model.load_state_dict(state)
            out[key][name] = accuracy(model.eval(), head, task.test_x, task.test_y)
        model.load_state_dict(harness.base_sd)
    atomic_write_json(path, out)
    return out


def _by_order(rows: Sequence[Mapping[str, str]], method: str, t: int, column: str) -> list[float]:
    return [float(r[column]) for r in rows if r["method"] == method and r["sources"] == str(t) and r[column] != ""]


def _grid(title: str, methods: Sequence[str], levels: Sequence[int], cell) -> list[str]:
    """A markdown table of ``cell(method, t)``, one row per method with a value; none: no table."""
    rows = []
    for m in methods:
        cells = [cell(m, t) for t in levels]
        if any(c != "-" for c in cells):
            rows.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", title, "", "| method \\ sources | " + " | ".join(str(t) for t in levels) + " |",
            "|---|" + "---:|" * len(levels), *rows]


def tables(exp: Experiment, refs: Mapping[str, Mapping[str, float]] | None = None) -> list[str]:
    """The markdown tables of a continual experiment from its ``multitask.csv`` and each order's ``results.csv``."""
    mt = read_rows(exp.output_dir / multitask.MULTITASK, multitask.KEY)
    levels = exp.levels or list(range(1, len(exp.sources) + 1))
    merges = [m.label for m in exp.methods if m.is_merge]
    orders = ", ".join(str(k) for k in exp.orders)
    text = _grid(f"### {exp.suite}: the merged models (no Stage 2), multi-task accuracy % on the source tasks "
                 f"folded so far (mean ± std over arrival orders {orders})",
                 merges, levels, lambda m, t: _pct(_by_order(mt, m, t, "multitask_accuracy")))[1:]
    if refs:
        variants = order_variants(exp)
        for key in refs:
            per_order = {t: [statistics.fmean(refs[key][s.name] for s in v.sources[:t]) for _, v in variants]
                         for t in levels}
            text.append(f"| {key} (reference) | " + " | ".join(_pct(per_order[t]) for t in levels) + " |")
    text += _grid(f"### {exp.suite}: backward transfer of the merged models, points (mean over i < t of acc_i "
                  f"after t sources - acc_i right after source i; ± std over orders)",
                  merges, levels, lambda m, t: _pct(_by_order(mt, m, t, "backward_transfer")))
    stage2 = {k: [r for r in read_rows(v.output_dir / RESULTS) if r["patch_dropout"] == "0"]
              for k, v in order_variants(exp)}
    targets = [t.name for t in exp.targets]

    def transfer(method: str, t: int) -> str:
        per_order = []
        for rows in stage2.values():
            got = {r["target"]: float(r["test_accuracy"]) for r in rows
                   if r["method"] == method and r["sources"] in (str(t), "0")}
            if all(name in got for name in targets):
                per_order.append(statistics.fmean(got[name] for name in targets))
        return _pct(per_order)

    text += _grid(f"### {exp.suite}: transfer after the same Stage 2, test accuracy % on the held-out targets "
                  f"({', '.join(targets)}; mean over targets, ± std over the orders run; order-free merges "
                  f"and zero-shot: order 0 only)", [m.label for m in exp.methods], levels, transfer)
    costs = [f"fold s (t={t})" for t in levels] + [f"state MiB (t={levels[0]})", f"state MiB (t={levels[-1]})",
                                                   f"MiB / source (t={levels[-1]})"]
    text += ["", f"### {exp.suite}: cost of taking in one more source (fold s: the fold of source t, or a batch "
                 f"merge of all t; state: what is kept for the next source; mean over orders)", "",
             "| method | " + " | ".join(costs) + " |", "|---|" + "---:|" * len(costs)]
    for m in merges:
        folds = [_by_order(mt, m, t, "fold_seconds") for t in levels]
        first, last = (_by_order(mt, m, t, "state_bytes") for t in (levels[0], levels[-1]))
        if not first or not last:
            continue
        cells = [f"{statistics.fmean(f):.2f}" if f else "-" for f in folds]
        cells += [f"{statistics.fmean(first) / 2**20:.1f}", f"{statistics.fmean(last) / 2**20:.1f}",
                  f"{statistics.fmean(last) / 2**20 / levels[-1]:.1f}"]
        text.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return text


def run_continual(config: Path, out: Path, *, stage2: bool = False, tables_only: bool = False,
                  dry_run: bool = False) -> str:
    """Run the experiment file ``config`` (the multi-task pass; with ``stage2`` the transfer runs too;
    resumable), then write its tables to ``out``; ``dry_run``: only what would run."""
    exp = load_experiment(config)
    if dry_run:
        return "\n".join(plan_lines(exp))
    refs = None
    if not tables_only:
        suite = make_suite(exp.suite, exp.data_root)
        if not suite.data_dir.exists():
            prepare(exp.suite, suite.data_dir)
        run_experiment(exp, print, only_multitask=not stage2)
        refs = references(exp)
    elif (exp.output_dir / REFERENCES).exists():
        refs = references(exp)
    text = tables(exp, refs)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, ("\n".join(text) + "\n").encode())
    return "\n".join(text)
