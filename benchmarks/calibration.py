"""The calibration rules of the AXIS basis compared as multi-task models (issue 24), beside OPCM.

For each arrival order of a suite's continual experiment, the sources are folded once into the real
``Basis`` (the daemon's fold; the factors do not depend on the rule) and the merged model after each
fold is scored with every ``[basis] calibration`` rule, on every source task folded so far (the
suites' multi-task pass, ``SuiteHarness.multitask``); OPCM runs beside it as the reference peer.
Resumable: rows already in ``<out>/multitask.csv`` are skipped. Prints a table of the mean over the
orders ± their standard deviation, multi-task accuracy and backward transfer.

    python benchmarks/calibration.py                      # text suite, orders 0 1 2
    python benchmarks/calibration.py --suite vision --orders 0 1 2
    python benchmarks/calibration.py --tables-only
    python benchmarks/calibration.py --suite vision --variants --rules spectral-x0.5 spectral-sqrt-cap

``--variants`` adds rules that exist only for this study (not the product's): the spectral factor
times a constant (``spectral-x0.7``, ``-x0.5``, ``-x0.35``), and capped at 1/sqrt(t) after t sources
(``spectral-sqrt-cap``: a merged matrix no farther from the base than one source if the sources were
orthogonal) or at 2/t (``spectral-2/t-cap``: at most twice the running average's strength, about task
arithmetic's usual lambda of 0.3 for 8 unrelated tasks; 1 up to two sources).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from pathlib import Path

from axis_stream import config
from axis_stream.config import CALIBRATIONS
from axis_stream.core import calibration
from axis_stream.experiments.evaluate import multitask
from axis_stream.experiments.evaluate.experiment import load_experiment
from axis_stream.experiments.evaluate.plan import order_variants
from axis_stream.experiments.evaluate.results import Results
from axis_stream.experiments.suites.harness import SuiteHarness
from axis_stream.experiments.suites.prepare import prepare

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"text": ROOT / "config" / "suite-text-continual.toml",
           "vision": ROOT / "config" / "suite-vision-continual.toml"}
PEERS = ("opcm",)


spectral = calibration.CALIBRATIONS["spectral"]   # the product's rule, which the variants scale or cap
VARIANTS = {**{f"spectral-x{g}": (lambda st, n, s, g=g: g * spectral(st, n, s)) for g in (0.7, 0.5, 0.35)},
            "spectral-sqrt-cap": lambda st, n, s: min(spectral(st, n, s), 1 / math.sqrt(n)),
            **{f"spectral-{g}/t-cap": (lambda st, n, s, g=g: min(spectral(st, n, s), g / n)) for g in (2, 1.5, 1)}}


def add_variants() -> None:
    """Register the study's extra rules beside the product's (this process only)."""
    for name, rule in VARIANTS.items():
        calibration.CALIBRATIONS.add(name, rule)
    config.CALIBRATIONS = (*config.CALIBRATIONS, *VARIANTS)


def run(suite: str, orders: list[int], rules: list[str], tables_only: bool, k_fraction: float | None = None
        ) -> list[str]:
    exp = load_experiment(CONFIGS[suite])
    kf = exp.stage1.k_fractions[0] if k_fraction is None else k_fraction
    out = ROOT / "benchmarks" / "results" / f"suite-{suite}" / "calibration"
    exp = dataclasses.replace(exp, orders=orders, output_dir=out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / multitask.MULTITASK, multitask.KEY, multitask.COLUMNS)
    levels = [n for n in (exp.levels or range(1, len(exp.sources) + 1)) if n <= len(exp.sources)]
    axis = next(m for m in exp.methods if m.name == "axis")
    peers = [m for m in exp.methods if m.name in PEERS]
    if not tables_only:
        prepare(exp.suite, exp.data_root)
        for order, variant in order_variants(exp):
            harness = None
            for rule in rules:
                label = f"axis, calibration {rule}" + ("" if k_fraction is None else f", K = {kf:.0%}")
                method = dataclasses.replace(axis, label=label)
                todo = [dict(method=method.label, order=order, sources=t, k_fraction=kf,
                             seed=exp.seeds[0]) for t in levels]
                if all(results.has(r) for r in todo):
                    continue
                harness = harness or SuiteHarness(variant, print)
                harness.exp = dataclasses.replace(variant, stage1=dataclasses.replace(variant.stage1, calibration=rule))
                results.append([r for r in harness.multitask(method, order, kf, exp.seeds[0], levels)
                                if not results.has(r)])
            for peer in peers:
                keys = [dict(method=peer.label, order=order, sources=t, k_fraction=None, seed=exp.seeds[0])
                        for t in levels]
                if not all(results.has(r) for r in keys):
                    harness = harness or SuiteHarness(variant, print)
                    results.append([r for r in harness.multitask(peer, order, exp.stage1.k_fractions[0],
                                                                 exp.seeds[0], levels) if not results.has(r)])
    return table(results.rows(), levels)


def table(rows: list[dict[str, str]], levels: list[int]) -> list[str]:
    """Multi-task accuracy and backward transfer (%, mean ± std over the orders) per method and level."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = []
    for key, title in (("multitask_accuracy", "multi-task accuracy %"), ("backward_transfer", "BWT, points")):
        lines += [f"#### {title}", "", "| method \\ sources | " + " | ".join(map(str, levels)) + " |",
                  "|---|" + "---:|" * len(levels)]
        for m in methods:
            cells = []
            for t in levels:
                vals = [100 * float(r[key]) for r in rows if r["method"] == m and int(r["sources"]) == t]
                cells.append("-" if not vals else f"{statistics.mean(vals):.1f}" +
                             (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""))
            orders = len({r["order"] for r in rows if r["method"] == m})
            lines.append(f"| {m} ({orders} orders) | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(CONFIGS), default="text")
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rules", nargs="+", choices=(*CALIBRATIONS, *VARIANTS), default=list(CALIBRATIONS))
    parser.add_argument("--variants", action="store_true", help="add the study's extra rules (see above)")
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--k-fraction", type=float, help="K of the AXIS basis (default: the experiment's, 10 %%)")
    args = parser.parse_args()
    if args.variants:
        add_variants()
    print("\n".join(run(args.suite, args.orders, args.rules, args.tables_only, args.k_fraction)))
