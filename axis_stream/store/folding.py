"""One source folded into a basis version in memory, parameter by parameter, with the basis's fold
strategy (``[basis] strategy``, ``core/strategies.py``); ``Basis`` reads the version and commits the result.

For ``axis`` a matrix's state is its ``Factors`` and a fold records the components that entered and
the provenance step (``store/records.py``). For a dense strategy the state is one tensor of the
matrix's shape (None: all zero) and the fold's statistics are neutral: ``new_kept`` 0,
``energy_kept`` 0.0, ``svd_method`` ``"dense"``, entry share 0 (nothing to attribute); the manifest's
``rank`` stays 0 (no factors stored). A state the fold leaves equal is handed back as it was, so its
file is shared with the previous version.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from axis_stream import errors
from axis_stream.config import BasisConfig
from axis_stream.core import calibration, entering, layout, stage1
from axis_stream.core.calibration import SourceStats
from axis_stream.core.stage1 import Factors
from axis_stream.core.strategies import DENSE, FOLD_STRATEGIES, UNCHANGED, FoldStrategy, Scalars, State
from axis_stream.store.records import entered
from axis_stream.store.threads import bounded_map

Progress = Callable[[int, int], None]


@dataclass
class FoldState:
    """One version's strategy state in memory, as a fold reads and changes it."""

    version: int
    matrices: dict[str, State | None]   # axis: Factors (rank 0 until a source changed it); dense: a tensor or None
    vectors: dict[str, Tensor]          # the other parameters' state (axis: the running mean); missing: all zero
    manifest: dict[str, Any]

    @property
    def scalars(self) -> Scalars:
        return Scalars(int(self.manifest["count"]), float(self.manifest.get("mean_norm", 0.0)))


STATS_KEYS = ("sigma_max", "norm_sum", "selected_energy")
"""A matrix's manifest entry holds its ``calibration.SourceStats`` under these keys; a basis folded
before they were kept has none, and its statistics stay unknown (``None``): its sources are gone."""


def calibration_stats(info: Mapping[str, Any]) -> SourceStats | None:
    """A matrix's ``SourceStats`` from its manifest entry, or None where they are unknown."""
    if any(info.get(key) is None for key in STATS_KEYS):
        return None
    return SourceStats(*(float(info[key]) for key in STATS_KEYS))


def stats_entry(stats: SourceStats | None) -> dict[str, float | None]:
    """The manifest keys of ``stats`` (None: unknown)."""
    return {key: None if stats is None else getattr(stats, key) for key in STATS_KEYS}


def joined_stats(folded: Mapping[str, Any], ours: Mapping[str, Any], theirs: Mapping[str, Any],
                 energy_kept: float) -> SourceStats | None:
    """A matrix's ``SourceStats`` once another basis (``theirs``) is folded in (``Basis.fold_basis``):
    the max and the norm sums over both sets of sources; the selected energy as the fold counted it
    (``folded``, which took the other basis as one source) with what entered weighted by the other's
    own selected energy over its energy, so that it is counted as its sources gave it."""
    mine, other, now = calibration_stats(ours), calibration_stats(theirs), calibration_stats(folded)
    if mine is None or other is None or now is None:
        return None
    return SourceStats(max(mine.sigma_max, other.sigma_max), mine.norm_sum + other.norm_sum,
                       now.selected_energy + energy_kept * (other.selected_energy - theirs["energy"]))


def checked(settings: BasisConfig, where: Path) -> BasisConfig:
    """``settings`` with ``strategy_params`` over the strategy's defaults (so equal choices compare
    equal); an unknown parameter is a ``BasisError`` naming ``where``."""
    try:
        params = FOLD_STRATEGIES[settings.strategy].check(settings.strategy_params)
    except ValueError as exc:
        raise errors.BasisError(f"{where}: {exc}") from None
    return dataclasses.replace(settings, strategy_params=params)


@dataclass
class MatrixFold:
    """One matrix's fold: its new manifest entry, its fold-record stats, the source's entry share
    ``[share, log_scale]``, the matrix's state (the current object when unchanged) and the source's
    squared norm on it."""

    entry: dict[str, Any]
    stats: dict[str, Any]
    share: list[float]
    state: State | None
    source_energy: float


@dataclass
class SourceFold:
    """A source's matrices folded (``Folder.matrices``): per matrix its manifest entry and stats, the
    source's entry shares in the manifest's order, the matrices it changed and its squared norm."""

    entries: dict[str, dict[str, Any]]
    stats: dict[str, dict[str, Any]]
    shares: list[list[float]]
    changed: set[str]
    source_energy: float


CPU = torch.device("cpu")
T = TypeVar("T", bound="Tensor | Factors | None")


def fold_device(settings: BasisConfig) -> torch.device:
    """``basis.fold_device`` as a device; a CUDA device must be present (else a ConfigError saying so)."""
    device = torch.device(settings.fold_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise errors.ConfigError(f"basis.fold_device is {settings.fold_device!r} but CUDA is not available "
                                 f"(torch {torch.__version__}); set it to \"cpu\"")
    return device


def _moved(x: T, device: torch.device) -> T:
    """A task matrix, factors (with their stats) or None on ``device``: the same object where it already is."""
    if isinstance(x, Factors):
        if x.U.device == device:
            return x
        return cast(T, Factors(x.U.to(device), x.s.to(device), x.V.to(device), stats=x.stats))
    return x if x is None else cast(T, x.to(device))


class Folder:
    """Folds a source's tensors into a ``FoldState`` with one basis's settings and strategy."""

    def __init__(self, settings: BasisConfig):
        self.settings = settings
        self.strategy: FoldStrategy = FOLD_STRATEGIES[settings.strategy]
        self.params = self.strategy.check(settings.strategy_params)

    @functools.cached_property
    def device(self) -> torch.device:
        """Where this folder's matrix folds run, resolved at the first (a reader never needs the GPU)."""
        return fold_device(self.settings)

    def matrices(self, delta: Callable[[str], Tensor | Factors | None], state: FoldState, version: int,
                 progress: Progress | None, workers: int, memory_budget: float) -> SourceFold:
        """Fold a source's matrices (``delta(name)``: a checkpoint's task matrix or another basis's
        factors) into ``state.matrices``, ``workers`` at a time (``version``: the first one being written)."""
        infos = state.manifest["matrices"]

        def prepare(name: str) -> Callable[[], MatrixFold]:
            d = delta(name)  # read here, in order; the fold may run in another thread
            return lambda: self.matrix(infos[name], state.matrices[name], d, version, state.scalars.count)

        per_entry = self.strategy.fold_bytes_per_entry
        done = bounded_map(list(infos), prepare, lambda name: per_entry * math.prod(infos[name]["shape"]),
                           workers=workers, budget=memory_budget, done=progress)
        changed = {name for name, r in done.items() if r.state is not state.matrices[name]}
        state.matrices.update({name: r.state for name, r in done.items()})
        return SourceFold({n: r.entry for n, r in done.items()}, {n: r.stats for n, r in done.items()},
                          [r.share for r in done.values()], changed, sum(r.source_energy for r in done.values()))

    def matrix(self, info: dict[str, Any], current: State | None, d: Tensor | Factors | None, version: int,
               count: int) -> MatrixFold:
        """One matrix's fold on ``basis.fold_device``: the state and the source go there, the new state
        comes back to the CPU (``current`` itself when the source leaves it unchanged)."""
        here = _moved(current, self.device)
        done = self._matrix(info, here, _moved(d, self.device), version, count)
        state = current if done.state is here else _moved(done.state, CPU)
        return dataclasses.replace(done, state=state)

    def _matrix(self, info: dict[str, Any], current: State | None, d: Tensor | Factors | None, version: int,
                count: int) -> MatrixFold:
        if self.strategy.dense:    # a dense strategy's state is a tensor, ``axis``'s always factors
            return self._dense_matrix(info, cast("Tensor | None", current), d, count)
        current = cast(Factors, current)
        stats = calibration_stats(info)
        history: dict[str, int] = {}
        if d is None:
            st = {"k": info["k"], "new_kept": 0, "energy_kept": 0.0, "svd_method": UNCHANGED, "svd_error": 0.0}
            e_cur, e_new, delta_energy, factors = 1.0, 0.0, 0.0, current
        else:
            k, new, delta_energy = self._fold_source(info, current, d, count)
            fs = new.stats
            assert fs is not None                  # every stage1 fold sets its statistics
            kept_current = min(current.rank, k - fs.new_kept)
            e_cur = float(current.s[:kept_current].double().square().sum())
            e_new = fs.energy_kept * delta_energy
            st = {"k": k, "new_kept": fs.new_kept, "energy_kept": round(fs.energy_kept, 6),
                  "svd_method": fs.svd_method, "svd_error": float(f"{fs.svd_error:.3g}")}
            if not isinstance(d, Factors):   # what the next fold's choice of SVD path reads
                history = {"entered": fs.new_kept,
                           "failed_attempts": entering.failed_after(info.get("failed_attempts", 0), fs.svd_method)}
            if stats is not None:
                held = float(current.s.double().square().sum())
                stats = stats.after(fs.top_sigma, math.sqrt(delta_energy), e_cur / held if held else 1.0, e_new)
            # stage1.fold hands back the current tensors when no new component entered
            factors = current if new.U is current.U else Factors(new.U, new.s, new.V)
            del new
        log_scale, reset, share = entered(info, e_cur, e_new, version)
        st["rank"] = factors.rank
        st["calibration"] = calibration.factor(self.settings.calibration, stats, count + 1, factors.s)
        entry = dict(info, k=st["k"], rank=factors.rank, energy=float(factors.s.double().square().sum()),
                     source_energy=info["source_energy"] + delta_energy, log_scale=log_scale, reset=reset,
                     **stats_entry(stats), **history)
        return MatrixFold(entry, st, [share, log_scale], factors, delta_energy)

    def _dense_matrix(self, info: dict[str, Any], current: Tensor | None, d: Tensor | Factors | None, count: int
                      ) -> MatrixFold:
        """A dense strategy's fold of one matrix, with the neutral statistics."""
        delta = None if d is None else layout.as_matrix(cast(Tensor, d))  # fold_basis is axis's only
        new = cast("Tensor | None", self.strategy.fold(current, delta, info["k"], count, self.params))
        if current is not None and new is not None and torch.equal(new, current):
            new = current
        delta_energy = 0.0 if delta is None else float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        st = {"k": info["k"], "rank": 0, "new_kept": 0, "energy_kept": 0.0, "svd_method": DENSE, "svd_error": 0.0}
        energy = 0.0 if new is None else float(torch.linalg.matrix_norm(new.double())) ** 2
        entry = dict(info, energy=energy, source_energy=info["source_energy"] + delta_energy)
        return MatrixFold(entry, st, [0.0, info["log_scale"]], new, delta_energy)

    def _fold_source(self, info: Mapping[str, Any], current: Factors, d: Tensor | Factors, count: int
                     ) -> tuple[int, Factors, float]:
        """K, the fold and the source's squared norm: a task matrix (``stage1.fold``; ``svd = "randomized"``
        skips its attempt where the matrix's last folds, in ``info``, say it will not pay:
        ``entering.worth_attempting``) or another basis's factors."""
        if isinstance(d, Factors):  # another basis: its K was chosen by its own folds
            k = max(current.rank, d.rank) if self.settings.k_mode == "gavish-donoho" else self.static_k(d.shape)
            new = cast(Factors, self.strategy.fold(current, d, k, count, self.params))   # axis: factors in, out
            return k, new, float(d.s.double().square().sum())
        delta = layout.as_matrix(d)
        shape = (delta.shape[0], delta.shape[1])
        k = self.fold_k(shape, current, delta)
        svd = entering.fold_path(self.settings.svd, shape, k, info.get("entered"), info.get("failed_attempts", 0),
                                 count)
        new = cast(Factors, self.strategy.fold(current, delta, k, count, self.params, svd=svd,
                                               tol=self.settings.svd_tol, seed=0))
        return k, new, float(torch.linalg.matrix_norm(delta)) ** 2

    def vectors(self, state: FoldState, deltas: Iterator[tuple[str, torch.Size, Tensor | None]],
                weight: int = 1) -> float:
        """Fold a source's ``(name, shape, delta)`` of the non-matrix parameters into ``state.vectors``
        (a checkpoint's, ``weight`` 1, or for ``axis`` another basis's means of ``weight`` sources);
        all-zero states are dropped. Returns the source's squared norm over them."""
        count, sq = state.scalars.count, 0.0
        for name, shape, d in deltas:
            current = state.vectors.get(name)
            if d is None and current is None:   # every strategy keeps an all-zero state at zero
                continue
            if d is not None:
                sq += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2   # float32 sums drift
            new = self.strategy.fold_vector(current, d, count, tuple(shape), self.params, weight)
            if bool(new.any()):
                state.vectors[name] = new
            else:
                state.vectors.pop(name, None)
        return sq

    def calibration(self, state: FoldState) -> dict[str, float | None]:
        """Per matrix holding components its factor under ``settings.calibration`` (None: statistics
        unknown); none for a dense strategy, which scales by its own rule."""
        if self.strategy.dense:
            return {}
        count = state.scalars.count
        return {name: calibration.factor(self.settings.calibration, calibration_stats(info), count,
                                         cast(Factors, state.matrices[name]).s)
                for name, info in state.manifest["matrices"].items() if info["rank"]}

    def static_k(self, shape: Sequence[int]) -> int:
        s = self.settings
        if s.k_mode == "count":
            return min(s.k_count, min(shape))
        return stage1.k_for(shape, s.k_fraction)  # gavish-donoho: a starting value, set per fold

    def fold_k(self, shape: tuple[int, int], current: Factors, delta: Tensor) -> int:
        if self.settings.k_mode != "gavish-donoho":
            return self.static_k(shape)
        spectrum = torch.linalg.svdvals(delta)
        return max(current.rank, stage1.gavish_donoho_rank(spectrum, shape))
