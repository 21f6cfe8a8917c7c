"""The working memory of one matrix's fold, per strategy and shape, against the estimate the memory budget uses.

``backfill --workers W --memory-budget MIB`` (and the daemon's fold workers) keep the folds in flight
under the budget by counting each matrix at ``FoldStrategy.fold_bytes_per_entry`` bytes per entry.
This measures the real use: one matrix's fold as ``store.folding`` runs it (the second source into a
one-matrix basis), each in a fresh process with one torch thread, its peak RSS over its resting RSS
plus the task matrix (``fold_peak_bytes_per_entry`` of tests/test_strategies.py, which asserts the
bound on one shape). Freed memory that the allocator reuses makes single measurements vary; the
table gives the smallest and the largest of ``--repeat`` runs, and the estimate must cover the largest.

    python benchmarks/fold_budget.py                      # ViT-B shapes, 3 runs each
    python benchmarks/fold_budget.py --shapes 512x2048 --repeat 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the measurement lives with the test that asserts it

from test_strategies import fold_peak_bytes_per_entry  # noqa: E402

from axis_stream.core.strategies import FOLD_STRATEGIES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["768x768", "768x3072", "3072x768"],
                        help="m x n of the matrix (ViT-B: attention 768x768, MLP 768x3072 and 3072x768)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    print("| strategy | estimate B/entry | " + " | ".join(f"{m}x{n} measured (min-max)" for m, n in shapes)
          + " | largest / estimate |")
    print("|---|---:|" + "---:|" * len(shapes) + "---:|")
    for name in FOLD_STRATEGIES:
        strategy = FOLD_STRATEGIES[name]
        runs = {shape: [fold_peak_bytes_per_entry(name, shape) for _ in range(args.repeat)] for shape in shapes}
        largest = max(max(r) for r in runs.values())
        cells = [f"{min(r):.1f}-{max(r):.1f}" for r in runs.values()]
        print(f"| {name} | {strategy.fold_bytes_per_entry} | " + " | ".join(cells)
              + f" | {largest / strategy.fold_bytes_per_entry:.2f} |", flush=True)


if __name__ == "__main__":
    main()
