"""Does a change to the fold's arithmetic move the basis? This code's fold against a basis folded earlier.

Folds the text suite's sources (the real MiniLM fine-tunes, in the cached basis's pool order) into a
fresh ``Basis`` with the cached basis's settings, then compares versions 1, 5, 10 and 20 with the
same versions of the cached basis (``benchmarks/results/suite-text/calibration/bases/axis-20-*``,
folded by the commit that produced the calibration tables): per matrix the relative Frobenius
difference of the merged deltas ``U diag(s) V^T`` and the difference of the calibration factors. A
difference far under the deltas' own float32 rounding of the weights says the downstream accuracies
measured on the cached basis hold for this code.

    python benchmarks/fold_agreement.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fold_breakdown import MINILM_SOURCES, minilm_sources  # noqa: E402

from axis_stream.config import BasisConfig  # noqa: E402
from axis_stream.store.basis import Basis  # noqa: E402

CACHED = Path(__file__).parent / "results" / "suite-text" / "calibration" / "bases"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 5, 10, 20])
    args = parser.parse_args()
    home = next(CACHED.glob("axis-20-*"))
    ident = json.loads((home / "settings.json").read_text())
    settings = BasisConfig(**{**ident["basis"], "calibration": "spectral"})
    old = Basis.open(home / "basis", settings=settings)   # the rule its last reader used may be a study variant
    base, _, _ = minilm_sources(1)
    print(f"cached basis {home.name} (svd = {settings.svd}); this code folds {max(args.levels)} sources again")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        new = Basis.create(Path(tmp) / "basis", base, settings, {"name": "text"})
        seconds = 0.0
        for t, name in enumerate(ident["pool"][:max(args.levels)], start=1):
            t0 = time.perf_counter()
            new.fold_checkpoint(MINILM_SOURCES / f"{name}.safetensors")
            seconds += time.perf_counter() - t0
            if t not in args.levels:
                continue
            a, b = new.load(t), old.load(t)
            diffs = []
            for m, fa in a.factors.items():
                fb = b.factors[m]
                da, db = fa.to_dense().double(), fb.to_dense().double()
                diffs.append(float(torch.linalg.matrix_norm(da - db) / torch.linalg.matrix_norm(db)))
            cal = max(abs(a.calibration.get(m, 1.0) - b.calibration.get(m, 1.0)) for m in a.factors)
            rows.append((t, max(diffs), statistics.median(diffs), cal, seconds))
    print("| sources | max rel. difference of a merged delta | median | max calibration factor difference | fold s (cumulative) |")
    print("|---:|---:|---:|---:|---:|")
    for t, mx, med, cal, sec in rows:
        print(f"| {t} | {mx:.1e} | {med:.1e} | {cal:.1e} | {sec:.1f} |")


if __name__ == "__main__":
    main()
