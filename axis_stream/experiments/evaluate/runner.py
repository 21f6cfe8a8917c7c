"""Running an experiment: every row not yet in the results file, here or on a Ray cluster."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised only on Python 3.10
    pass



from axis_stream.cluster import connect
from axis_stream.errors import AxisError, first_line
from axis_stream.experiments.evaluate import merged, multitask
from axis_stream.experiments.evaluate.experiment import Echo, Experiment, MethodSpec
from axis_stream.experiments.evaluate.harness import RUN_ERRORS, Harness
from axis_stream.experiments.evaluate.multitask import MULTITASK
from axis_stream.experiments.evaluate.plan import Run, order_variants, plan, run_dir, run_title
from axis_stream.experiments.evaluate.report import multitask_summary, plot, plot_multitask, summary
from axis_stream.experiments.evaluate.results import RESULTS, Results
from axis_stream.experiments.suites.harness import SuiteHarness
from axis_stream.store import atomic

LOCK = ".lock"


def run_experiment(exp: Experiment, echo: Echo = print, only_multitask: bool = False) -> list[dict[str, str]]:
    """Run every row not yet in ``<output_dir>/results.csv``, then summarise and plot; returns all rows.

    A run that fails (bad data, a method that cannot apply) is reported and left out, so a restart
    retries it; the experiment goes on with the other runs. Raises ``AxisError`` at the end if any failed.
    Runs execute here one after another, or with ``executor = "ray"`` as tasks on a Ray cluster
    (``evaluate_on_ray``); either way only this process appends rows, each once, and a
    second evaluation on the same ``output_dir`` is refused while this one runs. With several
    ``orders`` each order is its own experiment in ``<output_dir>/order-<k>/`` (``plan.order_variants``).
    With ``multitask = true`` the multi-task pass comes first (``<output_dir>/multitask.csv``);
    ``only_multitask``: nothing else runs.
    """
    exp.output_dir.mkdir(parents=True, exist_ok=True)
    with atomic.file_lock(exp.output_dir / LOCK, blocking=False) as got:
        if not got:
            raise AxisError(f"{exp.output_dir}: another axis-stream evaluate is running on this output_dir; "
                            "wait for it to finish (a re-run then resumes) or choose another output_dir")
        variants = order_variants(exp)
        if exp.multitask:
            run_multitask(exp, variants, echo)
        if only_multitask:
            return []
        rows, failed = [], 0
        for _, variant in variants:
            done, bad = _run_locked(variant, echo)
            rows += done
            failed += bad
        if failed:
            raise AxisError(f"{failed} runs failed (see above); run again to retry them")
        return rows


def _run_locked(exp: Experiment, echo: Echo) -> tuple[list[dict[str, str]], int]:
    """The runs of one order once this process holds the output folder: (all its rows, runs failed)."""
    results = Results(exp.output_dir / RESULTS)
    runs = plan(exp)
    todo = [r for r in runs if not all(results.has(row) for row in r.rows(exp.robustness.patch_dropout))]
    echo(f"{len(runs)} runs planned, {len(runs) - len(todo)} already in {results.path}, {len(todo)} to go")
    outcomes = (evaluate_on_ray(exp, todo, echo) if exp.executor == "ray" and todo
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
    return rows, len(failed)


def run_multitask(exp: Experiment, variants: Sequence[tuple[int, Experiment]], echo: Echo) -> list[dict[str, str]]:
    """The multi-task pass (``evaluate.multitask``) of every merge of ``exp`` in every arrival order,
    one pass over the stream each; passes whose rows are all in ``multitask.csv`` are skipped."""
    results = Results(exp.output_dir / MULTITASK, multitask.KEY, multitask.COLUMNS)
    levels = [n for n in (exp.levels or range(1, len(exp.sources) + 1)) if n <= len(exp.sources)]
    seed = exp.seeds[0]
    for order, variant in variants:
        passes = [(m, k) for m in exp.methods if m.is_merge
                  for k in (exp.stage1.k_fractions if m.name in merged.TOP_K_MODELS else exp.stage1.k_fractions[:1])]
        todo = [(m, k) for m, k in passes if not all(results.has(r) for r in _multitask_keys(m, order, k, seed, levels))]
        echo(f"multi-task, order {order}: {len(passes)} passes, {len(passes) - len(todo)} done, {len(todo)} to go")
        if not todo:
            continue
        harness = SuiteHarness(variant, echo)
        for method, k in todo:
            rows = harness.multitask(method, order, k, seed, levels)
            results.append([r for r in rows if not results.has(r)])
        del harness  # its task vectors, before the next order's harness loads them again
    rows = results.rows()
    for line in multitask_summary(rows):
        echo(line)
    for path in plot_multitask(rows, exp.output_dir / "plots"):
        echo(f"plot: {path}")
    return rows


def _multitask_keys(method: MethodSpec, order: int, k: float, seed: int, levels: Sequence[int]) -> list[dict]:
    kf = k if method.name in merged.TOP_K_MODELS else None
    return [{"method": method.label, "order": order, "sources": t, "k_fraction": kf, "seed": seed} for t in levels]


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
    return SuiteHarness(exp, echo) if exp.suite else Harness(exp, echo)


def evaluate_on_ray(exp: Experiment, runs: Sequence[Run], echo: Callable[[str], None]
                    ) -> Iterator[tuple[Run, list[dict[str, Any]] | AxisError]]:
    """Submit every run as a Ray task at once; yield ``(run, rows)`` or ``(run, error)`` as each finishes.

    A worker or node lost is retried ``exp.ray.max_retries`` times; the rows reach the CSV only here,
    once. Sources, data and ``output_dir`` must be at the same paths on every worker (shared storage).
    """
    ray = connect(exp.ray, "executor")
    task = ray.remote(num_gpus=exp.ray.num_gpus, num_cpus=exp.ray.num_cpus, max_retries=exp.ray.max_retries,
                      retry_exceptions=False)(_run_evaluation)
    exp_ref = ray.put(exp)
    pending = {task.options(name=f"axis-eval-{run.folder(exp)}").remote(exp_ref, run): run for run in runs}
    echo(f"submitted {len(pending)} runs to the Ray cluster ({exp.ray.num_gpus:g} GPU(s) each)")
    for i in range(1, len(pending) + 1):
        ready, _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(ready[0])
        echo(run_title(i, len(runs), run))
        try:
            kind, value = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:      # an unexpected error in the run: reported, not retried
            kind, value = "error", f"{type(exc.cause).__name__}: {first_line(exc.cause, limit=None)}"
        except ray.exceptions.RayError as exc:          # worker process or node lost, retries used up
            kind, value = "error", (f"the Ray worker was lost ({type(exc).__name__}, "
                                    f"ray.max_retries = {exp.ray.max_retries}): {first_line(exc, limit=None)}")
        yield run, (value if kind == "rows" else AxisError(value))


def _run_evaluation(exp: Experiment, run: Run) -> tuple[str, Any]:
    """The Ray task of one evaluation run: ("rows", rows) or ("error", its message), as the local loop sees it."""
    try:
        harness = make_harness(exp, print)
        return "rows", harness.execute(run, run_dir(exp, run))
    except RUN_ERRORS as exc:
        return "error", first_line(exc, limit=None)
