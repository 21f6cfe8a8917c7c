"""Issue 24's transfer evidence: the text sweep with the daemon's defaults (calibrated basis, auto start)
against AXIS from its merged start (the uncalibrated path) and the peers, with paired differences.

Runs config/suite-text-calibrated.toml, config/suite-text-calibrated-peers.toml and
config/suite-text-calibrated-long.toml with ``axis-stream evaluate``'s engine (resumable; each file
also runs alone with ``axis-stream evaluate --config FILE``), then prints markdown tables: test
accuracy (mean over the 3 targets ± std over seeds) per method and number of sources, and per level
the paired per-(target, seed) difference of AXIS's default against its merged start and against the
best peer of that level.

    python benchmarks/calibrated_sweep.py               # run what is missing, then the tables
    python benchmarks/calibrated_sweep.py --tables-only
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from axis_stream.experiments.evaluate.experiment import load_experiment
from axis_stream.experiments.evaluate.runner import run_experiment
from axis_stream.experiments.suites.report import read_rows

ROOT = Path(__file__).resolve().parent.parent
FILES = {name: ROOT / "config" / f"suite-text-{name}.toml" for name in ("calibrated", "calibrated-peers",
                                                                        "calibrated-long")}
DEFAULT, MERGED = "axis", "axis-merged-start"


def accuracies(rows: list[dict[str, str]]) -> dict[tuple[str, int], dict[tuple[str, int], float]]:
    """(method, sources) -> (target, seed) -> test accuracy %; zero-shot at every level."""
    out: dict[tuple[str, int], dict[tuple[str, int], float]] = defaultdict(dict)
    levels = sorted({int(r["sources"]) for r in rows if r["method"] != "zeroshot"})
    seeds = sorted({int(r["seed"]) for r in rows})
    for r in rows:
        if float(r.get("patch_dropout") or 0):
            continue
        zeroshot = r["method"] == "zeroshot"   # the same model at every level and seed
        for n in (levels if zeroshot else [int(r["sources"])]):
            for seed in (seeds if zeroshot else [int(r["seed"])]):
                out[(r["method"], n)][(r["target"], seed)] = 100 * float(r["test_accuracy"])
    return out


def cell(per: dict[tuple[str, int], float]) -> str:
    """Mean over targets, ± std over seeds of that mean."""
    by_seed = defaultdict(list)
    for (_, seed), v in per.items():
        by_seed[seed].append(v)
    means = [statistics.fmean(v) for v in by_seed.values()]
    return f"{statistics.fmean(means):.1f}" + (f" ± {statistics.stdev(means):.1f}" if len(means) > 1 else "") + \
        f" ({len(means)})"


def paired(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float]) -> str:
    """Mean ± std of a - b over the (target, seed) pairs both have, and wins / ties / losses."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return "-"
    d = [a[k] - b[k] for k in keys]
    sd = f" ± {statistics.stdev(d):.1f}" if len(d) > 1 else ""
    return (f"{statistics.fmean(d):+.1f}{sd} ({sum(x > 0 for x in d)}/{sum(x == 0 for x in d)}/"
            f"{sum(x < 0 for x in d)})")


def tables(rows: list[dict[str, str]], title: str) -> list[str]:
    acc = accuracies(rows)
    levels = sorted({n for _, n in acc})
    methods = list(dict.fromkeys(m for m, _ in acc))
    lines = [f"#### {title}: test accuracy % (mean over the targets ± std over seeds (seeds))", "",
             "| method \\ sources | " + " | ".join(map(str, levels)) + " |", "|---|" + "---:|" * len(levels)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(acc[(m, n)]) if acc.get((m, n)) else "-" for n in levels) + " |")
    peers = [m for m in methods if m not in (DEFAULT, MERGED, "zeroshot")]
    lines += ["", f"#### {title}: paired differences, points (mean ± std over (target, seed) pairs; "
                  "wins/ties/losses)", "",
              "| AXIS default minus \\ sources | " + " | ".join(map(str, levels)) + " |",
              "|---|" + "---:|" * len(levels)]
    best = {n: max((m for m in peers if acc.get((m, n))),
                   key=lambda m: statistics.fmean(acc[(m, n)].values()), default=None) for n in levels}
    for label, other in (("AXIS from its merged start (uncalibrated)", lambda n: MERGED),
                         ("the base (zero-shot)", lambda n: "zeroshot"),
                         ("the best peer of the level", lambda n: best[n])):
        if not any(acc.get((other(n), n)) for n in levels if other(n)):
            continue
        lines.append(f"| {label} | " + " | ".join(
            paired(acc[(DEFAULT, n)], acc[(other(n), n)]) if other(n) and acc.get((other(n), n)) else "-"
            for n in levels) + " |")
    lines.append("")
    lines.append("Best peer per level: " + ", ".join(f"{n}: {best[n]}" for n in levels))
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables-only", action="store_true", help="only the tables, from what has finished")
    if not parser.parse_args().tables_only:
        for path in FILES.values():
            run_experiment(load_experiment(path))
    peers = load_experiment(FILES["calibrated-peers"])   # its seeds only (rows of an earlier, longer plan left out)
    short = read_rows(load_experiment(FILES["calibrated"]).output_dir / "results.csv") + [
        r for r in read_rows(peers.output_dir / "results.csv") if int(r["seed"]) in peers.seeds]
    long = read_rows(load_experiment(FILES["calibrated-long"]).output_dir / "results.csv")
    print("\n".join(tables(short, "Short Stage 2 (4 steps)") + [""] + tables(long, "32-step Stage 2 (seed 0)")))
