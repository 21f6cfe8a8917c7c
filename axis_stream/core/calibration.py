"""Calibrating an AXIS basis: one factor per matrix so that sources sharing directions do not stack up.

Algorithm 1 sums the kept components at full strength. With diverse sources (near-orthogonal task
matrices, the paper's setting) the re-SVD of that sum keeps each source's singular values as they
were; with many sources that share directions it stacks them, and the merged matrix's top singular
value grows to several times any single source's (task arithmetic at lambda = 1 on the top
components). A calibration rule maps a matrix's bounded source statistics (``SourceStats``, the
same size whatever the number of sources) and its merged spectrum ``s`` to a factor ``c`` in (0, 1];
the calibrated merged matrix is ``c * U diag(s) V^T``. Every rule gives 1 for one source (within
float rounding, which counts as 1) and does not touch the stored factors, so a rule can be changed
at any time.

- ``none``: c = 1, the paper's uncalibrated sum.
- ``spectral``: c = min(1, max_i sigma_1(Delta_i) / sigma_1(Delta_m)): the merged matrix is no
  stronger in any direction than the strongest source; 1 for orthogonal sources.
- ``norm``: c = min(1, mean_i ||Delta_i||_F / ||Delta_m||_F): the merged matrix is no larger than
  the mean source (OPCM's rescale to the mean norm, per matrix; the mean counts the sources that
  left the matrix unchanged as 0).
- ``interference``: c = min(1, E_sel / ||Delta_m||_F^2), E_sel the sum of the selected components'
  sigma^2 as their sources gave them: 1 when the selected components are orthogonal, about 1/S for
  S parallel ones.

Pure functions on tensors and floats: no files, no logging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from axis_stream.core import svd as _svd
from axis_stream.core.registry import Registry

ROUNDING = 1e-6
"""A ratio within this of 1 is float rounding (the re-SVD of one source's components), not a cap."""


@dataclass(frozen=True)
class SourceStats:
    """What a basis keeps per matrix about its sources for calibration: three numbers, whatever their count."""

    sigma_max: float = 0.0          # max_i sigma_1(Delta_i)
    norm_sum: float = 0.0           # sum_i ||Delta_i||_F
    selected_energy: float = 0.0    # sum of sigma^2 of the kept components, as their sources gave them

    def after(self, sigma_1: float, norm: float, kept_fraction: float, entered_energy: float) -> SourceStats:
        """The statistics once one more source is folded: its top singular value ``sigma_1`` and norm,
        ``kept_fraction`` of the current basis's energy kept by the fold and the ``entered_energy``
        (sum of sigma^2) of the source's components that entered.

        The kept part of the selected energy is taken in proportion to the current energy kept: exact
        when the fold keeps every current component (the global merge's sum then), an estimate otherwise.
        """
        return SourceStats(max(self.sigma_max, sigma_1), self.norm_sum + norm,
                           self.selected_energy * kept_fraction + entered_energy)


Rule = Callable[[SourceStats, int, Tensor], float]


def _none(stats: SourceStats, count: int, s: Tensor) -> float:
    return 1.0


def _spectral(stats: SourceStats, count: int, s: Tensor) -> float:
    return stats.sigma_max / float(s.double().max())


def _norm(stats: SourceStats, count: int, s: Tensor) -> float:
    return stats.norm_sum / count / float(torch.linalg.vector_norm(s.double()))


def _interference(stats: SourceStats, count: int, s: Tensor) -> float:
    return stats.selected_energy / float(s.double().square().sum())


CALIBRATIONS: Registry[Rule] = Registry("calibration")
CALIBRATIONS.add("none", _none)
CALIBRATIONS.add("spectral", _spectral)
CALIBRATIONS.add("norm", _norm)
CALIBRATIONS.add("interference", _interference)


def factor(rule: str, stats: SourceStats | None, count: int, s: Tensor) -> float | None:
    """The calibration factor ``c`` in (0, 1] of a merged matrix with singular values ``s`` after
    ``count`` sources; ``None`` where ``stats`` is unknown (a basis folded before they were kept).
    An empty matrix (no component yet) has factor 1."""
    calibrate = CALIBRATIONS[rule]
    if rule == "none" or s.numel() == 0 or not bool(s.any()):
        return 1.0
    if stats is None:
        return None
    ratio = calibrate(stats, count, s)
    return 1.0 if ratio >= 1.0 - ROUNDING else ratio


def global_stats(deltas: Sequence[Tensor], k: int) -> SourceStats:
    """``SourceStats`` of task matrices merged at once (Algorithm 1 with the ``top`` strategy):
    the global counterpart of folding them one by one."""
    parts = [_svd.exact_svd(d.to(_svd.work_dtype(d))) for d in deltas]
    pooled = torch.cat([s for _, s, _ in parts])
    chosen = torch.sort(pooled, descending=True, stable=True).values[:k]
    return SourceStats(sigma_max=max(float(s.max()) for _, s, _ in parts),
                       norm_sum=sum(float(torch.linalg.matrix_norm(d.double())) for d in deltas),
                       selected_energy=float(chosen.double().square().sum()))
