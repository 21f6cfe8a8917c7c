"""Where Stage 2 starts with ``adapt.start_scale = "auto"``: a few candidate starts, scored on validation.

Lambda starts at ``scale * s`` (``SVDAdapted.set_start``). The candidates, in order of decreasing
scale, equal ones dropped: ``merged`` (scale 1, the paper's start), ``calibrated`` (the basis's
factor ``c`` per matrix, ``BasisSnapshot.calibration``; a missing name is 1), ``half`` (``c / 2``)
and ``zero`` (only the frozen rest of the spectrum and the averaged parameters stay on the base).
The start is the largest-scale candidate whose validation accuracy is within one binomial standard
error of the best, ``sqrt(best * (1 - best) / n)`` on ``n`` validation samples: a smaller start has
to be clearly better to be taken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Candidate:
    """One start: Lambda = ``scales[name] * s`` for every matrix ``name``."""

    name: str
    scales: dict[str, float]

    @property
    def mean_scale(self) -> float:
        return sum(self.scales.values()) / len(self.scales) if self.scales else 0.0


def candidates(names: Sequence[str], calibration: Mapping[str, float]) -> list[Candidate]:
    """The candidate starts for the matrices ``names``, largest scale first, without duplicates."""
    c = {n: float(calibration.get(n, 1.0)) for n in names}
    out: list[Candidate] = []
    for name, scales in (("merged", dict.fromkeys(names, 1.0)), ("calibrated", c),
                         ("half", {n: v / 2 for n, v in c.items()}), ("zero", dict.fromkeys(names, 0.0))):
        if all(scales != seen.scales for seen in out):
            out.append(Candidate(name, scales))
    return out


def choose(scores: Sequence[float], n: int) -> int:
    """The index of the first score (the largest scale) within one standard error of the best on ``n`` samples."""
    best = max(scores)
    se = math.sqrt(best * (1 - best) / n) if n > 0 else 0.0
    return next(i for i, s in enumerate(scores) if s >= best - se)


def record(scored: Sequence[tuple[Candidate, float]], chosen: int, n: int) -> dict[str, Any]:
    """The choice as the report and the job result hold it (``report["start"]``)."""
    rows = [{"name": c.name, "scale": c.mean_scale, "val_accuracy": acc, "n": n} for c, acc in scored]
    return {"chosen": rows[chosen]["name"], "scale": rows[chosen]["scale"], "candidates": rows}


def fixed(scale: float) -> dict[str, Any]:
    """A start the job named (``start_scale`` a number): nothing scored."""
    return {"chosen": "fixed", "scale": float(scale), "candidates": []}
