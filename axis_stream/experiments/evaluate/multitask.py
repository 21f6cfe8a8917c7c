"""The multi-task metric of continual merging: after each source, the merged model on every source task so far.

After the first ``t`` sources of a stream are folded, the merged model (base + the merged delta at
its stored values, ``evaluate.merged``; no Stage 2) is tested on each of those ``t`` sources' own
tasks with the frozen head its source was fine-tuned with. Multi-task accuracy MTA(t) is their mean;
backward transfer BWT(t) = mean over i < t of (acc_i after t sources - acc_i right after source i),
as the continual-merging papers report it (OPCM, arXiv:2501.09522; Lopez-Paz & Ranzato 2017):
negative is forgetting, BWT(1) = 0. One row per (method, arrival order, t) goes to
``<output_dir>/multitask.csv``; the suites' harness makes the rows (``SuiteHarness.multitask``).
"""

from __future__ import annotations

from collections.abc import Sequence

MULTITASK = "multitask.csv"
KEY = ("method", "order", "sources", "k_fraction", "seed")
COLUMNS = KEY + ("source_names", "multitask_accuracy", "backward_transfer", "accuracies", "accuracies_when_folded",
                 "fold_seconds", "state_bytes", "seconds")
"""``accuracies``: ``task=acc;...`` after ``sources`` sources; ``accuracies_when_folded``: each task's right
after its own source was folded; ``fold_seconds``: taking in the last source; ``state_bytes``: what
the method keeps to take in the next one."""


def backward_transfer(now: Sequence[float], when_folded: Sequence[float]) -> float:
    """BWT(t) for ``t = len(now)``: the mean of ``now[i] - when_folded[i]`` over ``i < t - 1`` (0 when t = 1)."""
    earlier = len(now) - 1
    return sum(now[i] - when_folded[i] for i in range(earlier)) / earlier if earlier > 0 else 0.0


def joined(names: Sequence[str], values: Sequence[float]) -> str:
    """``name=value;...``: a CSV cell of per-task accuracies."""
    return ";".join(f"{n}={v:.6g}" for n, v in zip(names, values))

