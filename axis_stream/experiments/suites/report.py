"""Markdown tables of a suite's results: per target and averaged, mean and spread over seeds.

Reads the ``results.csv`` files that ``axis-stream evaluate`` writes (one per experiment file) and
the full fine-tune references; used by ``benchmarks/suite_text.py`` and ``benchmarks/suite_vision.py``.
"""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from axis_stream.experiments.evaluate.experiment import load_experiment
from axis_stream.experiments.evaluate.plan import plan
from axis_stream.experiments.evaluate.results import KEY, RESULTS
from axis_stream.experiments.evaluate.runner import run_experiment
from axis_stream.experiments.suites.harness import SuiteHarness, make_suite, train_stage2
from axis_stream.experiments.suites.prepare import prepare
from axis_stream.experiments.suites.train import accuracy
from axis_stream.store.atomic import atomic_write_bytes

Row = Mapping[str, str]


def read_rows(path: Path, key: Sequence[str] = KEY) -> list[dict[str, str]]:
    """The rows of one ``results.csv`` (or another table with its ``key``; empty if the experiment has
    not run yet), one per key.

    Two evaluations writing to one output folder at once can both run the same key; the first row wins.
    """
    if not Path(path).exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    first: dict[tuple, dict[str, str]] = {}
    for row in rows:
        first.setdefault(tuple(row[k] for k in key), row)
    return list(first.values())


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f} (1)"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f} ({len(values)})"


def table(rows: Iterable[Row], lines: Sequence[tuple[str, dict]], targets: Sequence[str],
          extra: Mapping[str, Mapping[str, float]] | None = None) -> list[str]:
    """One markdown table: a line per ``(label, filter)``, a column per target and their mean.

    ``filter`` maps CSV columns to required values (e.g. ``{"method": "axis", "budget": "0.1"}``);
    a cell is the mean ± standard deviation of test accuracy over seeds (number of runs). The mean
    column averages the per-target means. ``extra`` adds lines of single numbers (``label -> target
    -> accuracy``), e.g. the full fine-tunes.
    """
    rows = list(rows)
    out = ["| method | trainable | " + " | ".join(targets) + " | mean |",
           "|---|---:|" + "---:|" * (len(targets) + 1)]
    for label, want in lines:
        match = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
        if not match:
            continue
        per_target = {t: [float(r["test_accuracy"]) for r in match if r["target"] == t] for t in targets}
        means = [statistics.fmean(v) for v in per_target.values() if v]
        trainable = sorted({int(r["trainable_params"]) for r in match})
        count = f"{trainable[0]:,}" if len(trainable) == 1 else f"{trainable[0]:,}-{trainable[-1]:,}"
        mean = f"{100 * statistics.fmean(means):.1f}" if len(means) == len(targets) else "-"
        out.append(f"| {label} | {count} | " + " | ".join(_cell(per_target[t]) for t in targets) + f" | {mean} |")
    for label, accs in (extra or {}).items():
        cells = [f"{100 * accs[t]:.1f}" if t in accs else "-" for t in targets]
        mean = f"{100 * statistics.fmean(accs[t] for t in targets):.1f}" if all(t in accs for t in targets) else "-"
        out.append(f"| {label} | all | " + " | ".join(cells) + f" | {mean} |")
    return out


def main_lines(budgets: Sequence[str] = ("0.1", "0.2", "0.4")) -> list[tuple[str, dict]]:
    """The main table's lines: references, then AXIS and aTLAS at each budget."""
    lines = [("base + frozen head (zero-shot)", {"method": "zeroshot"}),
             ("linear probe", {"method": "linear-probe"})]
    for b in budgets:
        lines.append((f"AXIS N={float(b):.0%}", {"method": "axis", "budget": b}))
        lines.append((f"aTLAS, matched to N={float(b):.0%}", {"method": "atlas", "budget": b}))
    return lines


ABLATION_LINES = [
    ("AXIS, streaming Stage 1 (default)", {"method": "axis", "budget": "0.1"}),
    ("AXIS, global Stage 1", {"method": "axis-global"}),
    ("AXIS, global, final SVD off", {"method": "axis-global-nosvd"}),
    ("task arithmetic + Stage 2", {"method": "ta"}),
    ("TIES + Stage 2", {"method": "ties"}),
    ("DARE + Stage 2", {"method": "dare"}),
    ("TSV-M + Stage 2", {"method": "tsvm"}),
    ("average + Stage 2", {"method": "average"}),
    ("aTLAS at N=10%", {"method": "atlas", "budget": "0.1"}),
    ("LoRA rank 1 (smallest; above budget)", {"method": "lora"}),
    ("AXIS, Stage 2 from Lambda = 0.3 s (start_scale)", {"method": "axis-start0.3"}),
    ("AXIS, Stage 2 from Lambda = 0 (start_scale)", {"method": "axis-start0"}),
]


def finetune_references(suite_name: str, root: Path | None, targets: Sequence[str]) -> dict[str, float]:
    """Test accuracy of a full fine-tune of the base on each target (the suite's cached source recipe,
    the target's whole training split, the frozen head), on the target's whole test split."""
    import torch
    from safetensors.torch import load_file
    suite = make_suite(suite_name, root)
    paths = suite.source_checkpoints(list(targets), print)
    out = {}
    for target in targets:
        task = suite.task(target)
        base = suite.base()
        head = suite.head(base, task)
        base.load_state_dict(load_file(paths[target]))
        with torch.no_grad():
            out[target] = accuracy(base.eval(), head, task.test_x, task.test_y)
    return out


def run_benchmark(suite_name: str, configs: Sequence[Path], out: Path, tables_only: bool = False) -> str:
    """Run each experiment file with ``axis-stream evaluate``'s engine (resumable), then write the tables."""
    exps = [load_experiment(c) for c in configs]
    suite = make_suite(suite_name, exps[0].data_root)
    if not tables_only:
        if not suite.data_dir.exists():
            prepare(suite_name, suite.data_dir)
        for exp in exps:
            run_experiment(exp, print)
    main, *others = exps
    targets = [t.name for t in main.targets]
    rows = {exp.output_dir.name: read_rows(exp.output_dir / RESULTS) for exp in exps}
    done = [t for t in targets if any(r["target"] == t for r in rows["main"])]  # no fine-tune for targets not run
    refs = {"full fine-tune (reference)": finetune_references(suite_name, main.data_root, done)}
    text = [f"### {suite_name}: AXIS against aTLAS and the references (test accuracy %, mean ± std (runs))", ""]
    text += table(rows["main"], main_lines([f"{b:g}" for b in main.budgets]), done, refs)
    if "fewshot" in rows:
        few = next(e for e in exps if e.output_dir.name == "fewshot")
        frac = few.robustness.train_fractions[0]
        text += ["", f"### {suite_name}: few-shot ({frac:.0%} of the training images)", ""]
        text += table(rows["fewshot"], [(label, dict(want, train_fraction=f"{frac:g}")) for label, want in
                                        main_lines([f"{b:g}" for b in few.budgets])], [t.name for t in few.targets])
    if "ablations" in rows:
        abl = next(e for e in exps if e.output_dir.name == "ablations")
        text += ["", f"### {suite_name}: other Stage 1 merges + Stage 2, global vs streaming, final SVD (N=10%)", ""]
        text += table(rows["ablations"] + [r for r in rows["main"] if r["target"] in {t.name for t in abl.targets}],
                      ABLATION_LINES, [t.name for t in abl.targets])
    if "noisy" in rows:
        noisy = next(e for e in exps if e.output_dir.name == "noisy")
        names = [t.name for t in noisy.targets]
        clean = [r for r in rows["main"] if r["budget"] == "0.1" and r["target"] in names]
        text += ["", f"### {suite_name}: one noisy source (N=10%, noise scale {noisy.robustness.corrupt_scale:g})", ""]
        text += table(clean + rows["noisy"],
                      [("AXIS, clean sources", {"method": "axis", "corrupt": "no"}),
                       ("AXIS, one noisy source", {"method": "axis", "corrupt": "yes"}),
                       ("aTLAS, clean sources", {"method": "atlas", "corrupt": "no"}),
                       ("aTLAS, one noisy source", {"method": "atlas", "corrupt": "yes"})], names)
    if "long" in rows:
        long = next(e for e in exps if e.output_dir.name == "long")
        text += ["", f"### {suite_name}: a longer Stage 2 ({long.adapt.epochs} epochs of {long.max_train_samples} "
                     f"examples, {long.max_eval_samples} test examples; N=10%)", ""]
        text += table(rows["long"], main_lines(["0.1"])[:3] + [
            ("AXIS N=10%, from Lambda = 0.3 s (start_scale)", {"method": "axis-start0.3"}),
            ("aTLAS, matched to N=10%", {"method": "atlas", "budget": "0.1"})], [t.name for t in long.targets], refs)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, ("\n".join(text) + "\n").encode())
    return "\n".join(text)


def start_scale_study(config: Path, targets: Sequence[str], scales: Sequence[float | str] = (1.0, 0.3, 0.0, "auto"),
                      budget: float = 0.1) -> list[str]:
    """AXIS at N = ``budget`` from its merged start (Lambda = s), from scaled starts (Lambda = c * s) and
    from the start ``auto`` chooses on validation (the default; the row says which it chose, per run).

    Each start is Stage 2's ``start_scale`` option (``adapt.start_scale = c``); same splits, head and
    recipe as the experiment's runs. A markdown table of test accuracy before and after Stage 2, per
    target, averaged over the experiment's seeds. It shows how much of Stage 2 goes into undoing the
    interference of the merged start.
    """
    import dataclasses

    import torch

    exp = load_experiment(config)
    harness = SuiteHarness(exp, lambda line: None)
    runs = [r for r in plan(exp) if r.method.name == "axis" and r.budget == budget
            and r.target.name in targets and not r.corrupt]
    acc: dict[tuple[str, float | str], list[tuple[float, float]]] = {}
    chosen: dict[float | str, list[str]] = {}
    for run in runs:
        for c in scales:
            hp = dataclasses.replace(run.settings(exp.adapt), start_scale=c)
            torch.manual_seed(hp.seed)
            base = harness._base()
            train, val, test = harness.splits(run, hp)
            head = harness.suite.head(base, train) * harness.suite.source_recipe.scale
            model = harness.build(run, hp, base)
            result = train_stage2(model, head, train, val, test, hp, lambda line: None)
            acc.setdefault((run.target.name, c), []).append((result.initial_test, result.test))
            if result.start and result.start["candidates"]:
                chosen.setdefault(c, []).append(result.start["chosen"])
    out = ["| start | " + " | ".join(f"{t}: before → after Stage 2" for t in targets) + " |",
           "|---|" + "---|" * len(targets)]
    for c in scales:
        cells = []
        for t in targets:
            pairs = acc.get((t, c), [])
            before = 100 * statistics.fmean(p[0] for p in pairs) if pairs else float("nan")
            after = 100 * statistics.fmean(p[1] for p in pairs) if pairs else float("nan")
            cells.append(f"{before:.1f} → {after:.1f} ({len(pairs)})")
        picks = ", ".join(f"{name} {n}x" for name, n in Counter(chosen.get(c, [])).items())
        label = (f"auto (chose {picks})" if isinstance(c, str) else
                 "Lambda = s (merged)" if c == 1 else f"Lambda = {c:g} s")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out
