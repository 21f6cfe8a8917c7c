"""What a basis keeps about its sources: the ledger's ``FoldRecord``, a version in memory
(``BasisSnapshot``), and the provenance arithmetic (each source's share of a matrix's kept energy).

Provenance ("each source's share"): per matrix, the basis's energy ``sum(s**2)`` is attributed to
the sources. A fold keeps the top ``k - new_kept`` components of the previous basis and ``new_kept``
components of the new source (energy ``energy_kept * ||delta||^2``): every earlier share is scaled
by ``c = e_cur / (e_cur + e_new)`` and the new source enters with ``a = e_new / (e_cur + e_new)``.
So that a fold writes O(1), the ledger keeps each source's ``a`` with the matrix's ``log_scale``
(the sum of ``log c``) after its fold, and the manifest the matrix's current ``log_scale``: a share is
``a * exp(log_scale_now - log_scale_then)``, or 0 for a source older than the matrix's ``reset``
(a fold with ``c = 0``). "Energy kept" of a matrix is its basis energy over the sum of its folded
task matrices' energies.

A basis folded into another (``Basis.fold_basis``) is one more source whose components enter
with ``a`` the same way; each of its own sources enters with its share in it times that ``a``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from axis_stream.core.stage1 import Factors
from axis_stream.core.strategies import DENSE


@dataclass(frozen=True)
class FoldRecord:
    """One folded source: what the ledger keeps of it."""

    version: int                    # the basis version this fold created
    file: str
    sha256: str
    size: int
    folded_at: str                  # ISO 8601, UTC
    seconds: float                  # reading, validating and folding (the write follows)
    matrices: dict[str, dict[str, Any]]  # name -> k, rank, new_kept, energy_kept, svd_method, svd_error
    new_kept_total: int
    energy_kept: float              # mean over the matrices the source changed
    # (a dense strategy's fold: new_kept 0, energy_kept 0.0, rank 0, svd_method "dense", shares 0)
    relative_norm: float            # ||tau|| / ||theta_pre|| over the weights it holds
    mapping: str                    # how its names were mapped onto the base's
    architecture: str = ""          # another head folded in (basis.allow_other_architectures): the architectures

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def dense(self) -> bool:
        """Folded by a dense strategy: no components kept, the statistics are the neutral values."""
        return any(s["svd_method"] == DENSE for s in self.matrices.values())

    @property
    def calibration(self) -> float | None:
        """The smallest calibration factor over the matrices after this fold (None: none known, as
        in a record written before calibration existed or by a dense strategy)."""
        known = [s["calibration"] for s in self.matrices.values() if s.get("calibration") is not None]
        return min(known) if known else None

    def line(self) -> str:
        """One line for a log or the CLI (a dense strategy's fold keeps no components: "dense state");
        a calibration below 1 says how far the merged basis is scaled down (sources piling up)."""
        kept = "dense state" if self.dense else (f"{self.new_kept_total} new components, "
                                                 f"energy kept {self.energy_kept:.1%}")
        scaled = f", calibrated down to {c:.3f}" if (c := self.calibration) is not None and c < 1 else ""
        other = f", its head ignored ({self.architecture})" if self.architecture else ""
        return (f"folded {self.file} -> version {self.version}: {kept}{scaled}, |tau|/|base| "
                f"{self.relative_norm:.3f}, {self.seconds:.1f} s{other}")

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FoldRecord:
        """A record as the ledger keeps it; a field added since (``architecture``) takes its default."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class BasisSnapshot:
    """One version in memory: factors in matrix form (conv weights flattened) and mean deltas."""

    version: int
    factors: dict[str, Factors]     # every matrix parameter; rank 0 until a source changed it
    means: dict[str, Tensor]        # a missing name means an all-zero delta
    count: int                      # number of folded sources
    manifest: dict[str, Any]
    calibration: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per matrix the basis's calibration factor (``core/calibration.py``): the calibrated merged
    matrix is ``c * U diag(s) V^T``; a missing name is 1 (no calibration, or statistics unknown)."""


def entered(info: Mapping[str, Any], e_cur: float, e_new: float, version: int) -> tuple[float, int, float]:
    """One fold's provenance step on a matrix (``version``: the first the fold writes): its new
    ``log_scale`` and ``reset``, and the entry share ``a`` of what entered."""
    total = e_cur + e_new
    log_scale, reset = info["log_scale"], info["reset"]
    if total and e_cur:
        log_scale += math.log(e_cur / total)
    elif total:  # every earlier source's share drops to 0
        log_scale, reset = 0.0, version
    return log_scale, reset, e_new / total if total else 0.0


def share_now(info: Mapping[str, Any], version: int, row: Sequence[float]) -> float:
    """A source's share of a matrix's kept energy now, from its ledger row ``[a, log_scale at entry]``
    (``version``: the source's fold version)."""
    return 0.0 if version < info["reset"] else row[0] * math.exp(info["log_scale"] - row[1])
