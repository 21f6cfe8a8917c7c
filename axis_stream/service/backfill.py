"""``axis-stream backfill``: fold checkpoints that already exist (a zoo) into the basis, on every core.

Each file goes through the daemon's own ``FoldWorker.process``, in the order given (a folder: its
checkpoints by name), so the basis is the one the daemon would build from the same files in the
same order, and bad files meet the same rules: one line each, the run goes on. Unlike the daemon,
folded files stay where they are, and rejected ones too unless ``quarantine``. The matrices of one
fold run in ``workers`` threads within a memory budget (``Basis.fold_checkpoint``), while the next
file is read and hashed in the background (``FoldWorker.prefetch``: one file ahead). A run killed at
any point (kill -9 included) is resumed by running it again: a file whose bytes the ledger holds
under the same name counts as already folded. With ``executor="ray"`` the files are folded as a
tree over shards on Ray instead (``backfill_ray.py``): the same rules, not the same basis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from axis_stream import errors
from axis_stream.config import Config
from axis_stream.service.backfill_ray import backfill_on_ray
from axis_stream.service.foldworker import FoldWorker, Outcome, default_memory_budget, default_workers
from axis_stream.service.watcher import is_candidate
from axis_stream.store.models import load_base
from axis_stream.store.statelock import lock_state


def checkpoint_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files to fold, in order: each folder's checkpoints by name (as the watcher accepts
    them), each file as given. Raises ``AxisError`` for a path that does not exist."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.is_file() and is_candidate(p, path))
        elif path.exists():
            out.append(path)
        else:
            raise errors.AxisError(f"{path}: no such file or folder")
    return out


def backfill(config: Config, files: Sequence[Path], on_outcome: Callable[[Outcome], None], *,
             workers: int | None = None, memory_budget: float | None = None, quarantine: bool = False,
             executor: str = "local", ray_address: str = "local", paths: Sequence[str | Path] = ()) -> Counter:
    """Fold ``files`` in order into the configured basis; ``on_outcome`` after each. Returns the
    count of each result (folded, rejected, already_folded, error, vanished). ``executor="ray"``:
    as a tree over ``workers`` shards on Ray (``backfill_ray``; ``paths``, what ``files`` were found
    from, name its run for a resume)."""
    counts: Counter = Counter()
    with lock_state(config.paths.state_dir, "backfill", hint="stop the daemon first, or drop the files into "
                                                                  "its watched folder"):
        if executor == "ray":
            return backfill_on_ray(config, paths or files, files, on_outcome, workers=workers or default_workers(),
                                   memory_budget=memory_budget or default_memory_budget(), quarantine=quarantine,
                                   address=ray_address)
        base, identity = load_base(config)
        worker = FoldWorker(config, base, identity, fold_workers=workers or default_workers(),
                            memory_budget=memory_budget or default_memory_budget(), keep=True,
                            quarantine=quarantine)
        for i, path in enumerate(files):
            worker.prefetch(files[i + 1] if i + 1 < len(files) else None)   # hashed while this one folds
            outcome = worker.process(path)
            counts[outcome.result] += 1
            on_outcome(outcome)
    return counts
