"""Full runs of the vision suite: a small open_clip ViT pretrained here on Fashion-MNIST, real image tasks.

Runs config/suite-vision.toml (AXIS at N = 10/20/40 % vs aTLAS, zero-shot, linear probe; 3 seeds),
config/suite-vision-fewshot.toml,
config/suite-vision-noisy.toml and config/suite-vision-ablations.toml with ``axis-stream evaluate``'s
engine, then writes the tables to benchmarks/results/suite-vision/tables.md. Resumable: finished runs
are skipped; the source fine-tunes are cached under ~/.cache/axis-stream/suites/vision.

    apt-get install dataset-fashion-mnist && pip install -e ".[suites]"
    nohup python benchmarks/suite_vision.py > suite_vision.log 2>&1 &
    python benchmarks/suite_vision.py --tables-only      # the tables from what has finished
    python benchmarks/suite_vision.py --start-scales     # AXIS from its merged start vs scaled starts
    python benchmarks/suite_vision.py --continual [--tables-only]   # the streaming peers' multi-task pass

``--continual`` runs config/suite-vision-continual.toml (issue 18): the merged models of AXIS, OPCM,
continual TA / TIES / averaging and batch TSV-M / TIES / TA after each of the 6 sources, in 3 arrival
orders, on the source tasks folded so far; tables: benchmarks/results/suite-vision/continual-tables.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from axis_stream.experiments.suites.continual import run_continual
from axis_stream.experiments.suites.report import run_benchmark, start_scale_study

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "config" / f"suite-vision{part}.toml" for part in ("", "-fewshot", "-noisy", "-ablations")]
RESULTS = ROOT / "benchmarks" / "results" / "suite-vision"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--continual", action="store_true", help="the streaming peers' multi-task pass")
    mode.add_argument("--start-scales", action="store_true", help="AXIS from its merged start vs scaled starts")
    parser.add_argument("--tables-only", action="store_true", help="the tables from what has finished")
    args = parser.parse_args()
    if args.continual:
        print(run_continual(ROOT / "config" / "suite-vision-continual.toml", RESULTS / "continual-tables.md",
                            tables_only=args.tables_only))
    elif args.start_scales:
        print("\n".join(start_scale_study(CONFIGS[0], ["digits", "textures"])))
    else:
        print(run_benchmark("vision", CONFIGS, RESULTS / "tables.md", tables_only=args.tables_only))
