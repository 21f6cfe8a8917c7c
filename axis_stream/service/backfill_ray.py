"""``axis-stream backfill --executor ray``: a backlog folded as a tree reduction on a Ray cluster.

The files, in order, are split into W contiguous shards. Ray tasks hash them first, so that a file
the configured basis holds already, or a copy of an earlier file of the run, is left to the
daemon's own duplicate rules at the end. Then one task per shard folds its files, through the
daemon's ``FoldWorker`` (bad files: one line each, the run goes on), into a partial basis in
``<state_dir>/backfill/<run>/shard-NN/basis``. Partial bases are folded pairwise in the shape of
``stage1.tree_levels`` (shard ``j`` into shard ``i``, one level's folds as parallel tasks, each
folded one removed), and the root into the configured basis with ``Basis.fold_basis``; then the
run's folder is removed. Workers read the files and write the partial bases on a file system they
share with this process (one machine, or a shared mount).

A tree of Stage 1 folds is not the sequential stream: each shard keeps its own top K before the
shards compete (docs/basis.md, "Backfill on Ray"; ``benchmarks/tree_reduce.py`` measures the difference).

Resuming after kill -9: the run's folder is named by the paths given and W, and a rerun reuses
it. A file that a partial basis's ledger holds is not folded again, a shard already folded into
its tree neighbour (its folder gone) is not rebuilt, and a fold whose commit happened but whose
folder removal did not is recognised (the target holds every source of the folder's basis).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from axis_stream.cluster import connect
from axis_stream.config import Config, RayConfig
from axis_stream.core import stage1
from axis_stream.errors import AxisError, first_line
from axis_stream.service.foldworker import FoldWorker, Outcome
from axis_stream.store import readers
from axis_stream.store.basis import CURRENT, Basis
from axis_stream.store.models import load_base

RUNS = "backfill"         # <state_dir>/backfill/<run>/shard-NN/basis
BASIS = "basis"


def run_folder(config: Config, paths: Sequence[str | Path], workers: int) -> Path:
    """The folder of the partial bases of a run: named by the paths given (resolved) and ``workers``."""
    key = "\n".join(str(Path(p).resolve()) for p in paths) + f"\nworkers={workers}"
    return config.paths.state_dir / RUNS / hashlib.sha256(key.encode()).hexdigest()[:12]


def backfill_on_ray(config: Config, paths: Sequence[str | Path], files: Sequence[Path],
                    on_outcome: Callable[[Outcome], None], *, workers: int, memory_budget: float,
                    quarantine: bool, address: str = "local") -> Counter:
    """Fold ``files`` (found from ``paths``) into the configured basis as a tree over ``workers``
    shards on the Ray cluster at ``address`` ("local": one started here with ``workers`` CPUs).
    The caller holds the state folder's lock. Returns the count of each result."""
    if config.basis.strategy != "axis":   # before any work: a tree of dense states is not defined
        raise AxisError(f"backfill --executor ray: folds a tree of AXIS bases; basis.strategy is "
                        f"{config.basis.strategy!r}: run backfill without --executor ray")
    ray = connect(RayConfig(address=address, num_gpus=0, num_cpus=1,
                            max_retries=config.scheduler.ray.max_retries), "backfill --executor", local_cpus=workers)

    def remote(fn: Callable) -> Any:
        return ray.remote(num_cpus=1, num_gpus=0, max_retries=config.scheduler.ray.max_retries)(fn)

    counts: Counter = Counter()

    def report(outcome: Outcome) -> None:
        counts[outcome.result] += 1
        on_outcome(outcome)

    run = run_folder(config, paths, workers)
    run.mkdir(parents=True, exist_ok=True)
    for leftover in run.glob(".trash-*"):
        shutil.rmtree(leftover)
    base, identity = load_base(config)
    main = Basis.open(config.paths.basis_dir, base, settings=config.basis) \
        if (config.paths.basis_dir / CURRENT).exists() else None
    shards = stage1.shards(files, workers)
    hashes = ray.get([remote(hash_files).remote(shard) for shard in shards])
    held = _held(run, workers)
    todo: list[list[Path]] = [[] for _ in shards]
    deferred, seen = [], set()
    for i, (shard, shas) in enumerate(zip(shards, hashes)):
        for path, sha in zip(shard, shas):
            if sha is not None and (sha in seen or (main is not None and main.has_source(sha))):
                deferred.append(path)       # the configured basis's own duplicate rules decide, at the end
            elif sha is not None and sha in held:
                report(Outcome(path.name, "already_folded", f"in the partial basis {held[sha]} since an earlier run"))
            else:
                todo[i].append(path)
            if sha is not None:
                seen.add(sha)
    failed = _fold_shards(ray, remote, config, run, todo, quarantine, report)
    if failed:
        raise AxisError(f"backfill: {'; '.join(failed)}; run the same command again to resume")
    root = _reduce(ray, remote, run, workers)
    if root is not None:
        if main is None:
            main = Basis.create(config.paths.basis_dir, base, config.basis, identity)
        fold_into(main, root, workers=workers, memory_budget=memory_budget)
    _remove(run)
    last = FoldWorker(config, base, identity, fold_workers=workers, memory_budget=memory_budget, keep=True,
                      quarantine=quarantine)
    for path in deferred:
        report(last.process(path))
    return counts


def _fold_shards(ray: Any, remote: Callable, config: Config, run: Path, todo: list[list[Path]], quarantine: bool,
                 report: Callable[[Outcome], None]) -> list[str]:
    """One streaming task per shard with files to fold; each outcome reported as it comes. Returns
    what failed (a task lost or broken: not a file's fault)."""
    task = remote(fold_shard).options(num_returns="streaming")
    streams = {task.remote(config, run / f"shard-{i:02d}", shard, quarantine): i for i, shard in enumerate(todo) if shard}
    pending, failed = list(streams), []
    while pending:
        [stream], pending = ray.wait(pending, num_returns=1)
        try:
            outcome = ray.get(next(stream))
        except StopIteration:
            continue
        except ray.exceptions.RayError as exc:
            failed.append(f"shard {streams[stream]:02d} failed: {first_line(exc, limit=None)}")
            continue
        report(dataclasses.replace(outcome, message=f"{outcome.message}; partial basis shard-{streams[stream]:02d}")
               if outcome.result == "folded" else outcome)
        pending.append(stream)
    return failed


def _reduce(ray: Any, remote: Callable, run: Path, workers: int) -> Path | None:
    """Fold the partial bases pairwise, level by level (one level's folds in parallel); the root's
    folder, or None when no shard holds anything."""
    holder = _partials(run, workers)
    for level in stage1.tree_levels(workers):
        folds = []
        for i, j in level:
            if j not in holder:
                continue
            if i not in holder:           # an empty shard is the identity: the right one moves up as it is
                holder[i] = holder.pop(j)
            else:
                folds.append(remote(fold_pair).remote(holder[i], holder.pop(j)))
        ray.get(folds)
    return holder.get(0)


def _partials(run: Path, workers: int) -> dict[int, Path]:
    """The shard folders of ``run`` holding a partial basis, by shard."""
    return {i: d for i in range(workers) if ((d := run / f"shard-{i:02d}") / BASIS / CURRENT).exists()}


def _held(run: Path, workers: int) -> dict[str, str]:
    """The sha256 of every source a partial basis of ``run`` holds, with its folder's name."""
    out = {}
    for folder in _partials(run, workers).values():
        partial = Basis.open(folder / BASIS)
        out.update((r.sha256, folder.name) for r in partial.ledger())
        partial.close()
    return out


def _remove(folder: Path) -> None:
    """Remove a folder: renamed away first, so a half-removed one is never taken for a partial basis."""
    trash = folder.with_name(f".trash-{folder.name}-{secrets.token_hex(4)}")
    os.rename(folder, trash)
    shutil.rmtree(trash)


def fold_into(target: Basis, folder: Path, **fold: Any) -> None:
    """Fold the partial basis in ``folder`` into ``target``, then remove the folder. When ``target``
    holds all of its sources already (a fold committed before a kill), only the removal is left."""
    other = Basis.open(folder / BASIS)
    try:
        if not all(target.has_source(r.sha256) is not None for r in other.ledger()):
            target.fold_basis(other, **fold)
    finally:
        other.close()
    _remove(folder)


# --- what the Ray tasks run (on the workers) ---

def hash_files(paths: Sequence[Path]) -> list[str | None]:
    """Each file's sha256 (None when it cannot be read: its fold will say why)."""
    out: list[str | None] = []
    for path in paths:
        try:
            out.append(readers.checkpoint_sha256(path))
        except OSError:
            out.append(None)
    return out


def fold_shard(config: Config, folder: Path, paths: Sequence[Path], quarantine: bool):
    """Fold ``paths`` in order into the partial basis in ``folder`` (created at the first fold), by
    the daemon's rules; yields each file's ``Outcome``. Rejected files go to the run's quarantine."""
    logging.getLogger("axis_stream").setLevel(logging.ERROR)   # each outcome is one line in the driver
    base, identity = load_base(config)
    paths_cfg = dataclasses.replace(config.paths, state_dir=folder, quarantine_dir=config.paths.quarantine,
                                    archive_dir=config.paths.archive)
    worker = FoldWorker(dataclasses.replace(config, paths=paths_cfg), base, identity, keep=True, quarantine=quarantine)
    for path in paths:
        yield worker.process(path)


def fold_pair(left: Path, right: Path) -> None:
    """One fold of the tree: the partial basis in ``right`` into the one in ``left``; ``right`` removed."""
    target = Basis.open(left / BASIS)
    try:
        fold_into(target, right)
    finally:
        target.close()
