"""Checkpoints a minute of ``axis-stream backfill`` at 1 and 2 workers against the daemon's
one-at-a-time ``FoldWorker`` on the same files, with the time of each stage of a fold.

The base is open_clip ViT-B-32 (``pretrained=None``, seeded) or the tests' tiny CLIP; checkpoint
``i`` is ``fold_memory.fine_tuned(base, i)`` (ViT-B-32: a rank-16 plus noise change to every visual
weight) or ``testing.finetuned_like(base, i)`` (tiny). Each mode folds the same N files in the same
order into a fresh state folder, in this process (the base loaded once): "daemon" is
``FoldWorker.process`` as ``axis-stream serve`` runs it (on copies made beforehand: it deletes what it
folds), "backfill wN" is ``service.backfill.backfill`` with N workers. The first fold of a basis
costs more than the others (see fold_memory.py), so the rate is over files 2..N. Stages, summed over
files 2..N: sha256 of the file (``readers.file_sha256``, timed apart, page cache warm), the matrix
folds (time inside ``stage1.fold``, summed over threads), the rest of reading and validating
(``FoldRecord.seconds`` minus that, wall), writing the version (``fold_checkpoint``'s wall minus
``FoldRecord.seconds``). The modes' bases are checked to be bit-identical.

"ray wN" is ``backfill --executor ray --workers N`` on a local Ray with N CPUs (started before the
clock): the files hashed, N shards folded by Ray tasks into partial bases, the tree, the root folded
into the basis. Its rate is over the whole run, all N files from the start to the end of the root's
fold (its first folds and the tree included: they are its cost); its stages run in the workers and
are not timed; its basis is a tree, not the daemon's: the line under the table gives its relative
Frobenius distance to the daemon's (mean over the matrices).

    python benchmarks/backfill_rate.py --model ViT-B-32 --count 4
    python benchmarks/backfill_rate.py --model tiny --count 20
    python benchmarks/backfill_rate.py --model tiny --count 20 --modes daemon "backfill w1" "backfill w2" "ray w2"
    python benchmarks/backfill_rate.py --count 4 --modes "daemon serial" daemon "backfill w2 serial" "backfill w2"
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from daemon_throughput import make_base, write_config  # noqa: E402
from fold_memory import fine_tuned  # noqa: E402

from axis_stream import cluster, config  # noqa: E402
from axis_stream.core import stage1  # noqa: E402
from axis_stream.service import backfill  # noqa: E402
from axis_stream.service.daemon import FoldWorker  # noqa: E402
from axis_stream.service.foldworker import default_memory_budget, fold_threads  # noqa: E402
from axis_stream.store import basis as basis_module  # noqa: E402
from axis_stream.store import readers  # noqa: E402
from axis_stream.testing import finetuned_like  # noqa: E402


class StageClock:
    """Time spent inside ``stage1.fold`` (summed over threads) and in ``Basis.fold_checkpoint`` (wall)."""

    def __init__(self) -> None:
        self.svd = 0.0
        self.folds: list[tuple[float, float]] = []  # (fold_checkpoint wall, record.seconds)
        self._lock = threading.Lock()
        fold, fold_checkpoint = stage1.fold, basis_module.Basis.fold_checkpoint

        def timed_fold(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fold(*args, **kwargs)
            finally:
                with self._lock:
                    self.svd += time.perf_counter() - t0

        def timed_fold_checkpoint(basis, *args, **kwargs):
            t0 = time.perf_counter()
            record = fold_checkpoint(basis, *args, **kwargs)
            self.folds.append((time.perf_counter() - t0, record.seconds))
            return record

        stage1.fold = timed_fold
        basis_module.Basis.fold_checkpoint = timed_fold_checkpoint

    def reset(self) -> None:
        self.svd, self.folds = 0.0, []


def run_mode(mode: str, cfg_path: Path, files: list[Path], clock: StageClock) -> dict:
    """Fold ``files`` into a fresh state folder as ``mode`` does; times per file. A mode ending in
    " serial" runs without the read-ahead (``FoldWorker.prefetch`` a no-op: as before issue 27)."""
    if mode.endswith(" serial"):
        prefetch = FoldWorker.prefetch
        FoldWorker.prefetch = lambda worker, path: None
        try:
            return dict(run_mode(mode.removesuffix(" serial"), cfg_path, files, clock), mode=mode)
        finally:
            FoldWorker.prefetch = prefetch
    cfg = config.load(cfg_path)
    shutil.rmtree(cfg.paths.state_dir, ignore_errors=True)
    ends, svd_after_first = [], 0.0
    start = time.perf_counter()

    def note(_outcome=None) -> None:
        nonlocal svd_after_first
        ends.append(time.perf_counter())
        if len(ends) == 1:
            svd_after_first = clock.svd
    clock.reset()
    if mode.startswith("ray w"):
        workers = int(mode[len("ray w"):])
        cluster.connect(config.RayConfig(address="local"), "ray", local_cpus=workers)
        start = time.perf_counter()
        counts = backfill.backfill(cfg, files, lambda _outcome: None, workers=workers, executor="ray",
                                   paths=[files[0].parent])
        assert counts["folded"] == len(files), counts
        end = time.perf_counter()
        return {"mode": mode, "first": float("nan"), "rate": 60 * len(files) / (end - start), "svd": float("nan"),
                "read": float("nan"), "write": float("nan"), "rest": end - start,
                "basis": basis_module.Basis.open(cfg.paths.basis_dir).load()}
    if mode == "daemon":
        inbox = cfg.paths.watch_dir
        inbox.mkdir(parents=True, exist_ok=True)
        copies = [Path(shutil.copy(p, inbox / p.name)) for p in files]
        worker = FoldWorker(cfg, *backfill.load_base(cfg), fold_workers=fold_threads(cfg.watch),
                            memory_budget=default_memory_budget())   # as serve builds it
        start = time.perf_counter()
        for i, p in enumerate(copies):
            worker.prefetch(copies[i + 1] if i + 1 < len(copies) else None)   # as the daemon: the next queued file
            assert worker.process(p).result == "folded"
            note()
    else:
        counts = backfill.backfill(cfg, files, note, workers=int(mode[len("backfill w"):]))
        assert counts["folded"] == len(files), counts
    rest = ends[-1] - ends[0]
    walls, inner = zip(*clock.folds[1:]) if len(clock.folds) > 1 else ((0.0,), (0.0,))
    svd = clock.svd - svd_after_first
    return {"mode": mode, "first": ends[0] - start, "rate": 60 * (len(files) - 1) / rest if rest else 0.0,
            "svd": svd, "read": max(0.0, sum(inner) - svd), "write": sum(walls) - sum(inner), "rest": rest,
            "basis": basis_module.Basis.open(cfg.paths.basis_dir).load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="ViT-B-32 (or another open_clip name) or tiny")
    parser.add_argument("--count", type=int, default=4, help="checkpoints (the first is timed apart)")
    parser.add_argument("--modes", nargs="+", default=["daemon", "backfill w1", "backfill w2"])
    args = parser.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="backfill-rate-"))
    try:
        base_cfg, base = make_base(args.model, ws)
        cfg_path, _ = write_config(ws, base_cfg)
        zoo = ws / "zoo"
        zoo.mkdir()
        files = []
        for i in range(1, args.count + 1):
            files.append(zoo / f"ckpt-{i:03d}.safetensors")
            save_file(fine_tuned(base, i) if args.model != "tiny" else finetuned_like(base, i), files[-1])
        sha = [time.perf_counter()]
        for p in files[1:]:
            readers.file_sha256(p)
        sha.append(time.perf_counter())
        clock = StageClock()
        rows = [run_mode(mode, cfg_path, files, clock) for mode in args.modes]
        same = all(all(torch.equal(getattr(r["basis"].factors[n], part), getattr(rows[0]["basis"].factors[n], part))
                       for n in r["basis"].factors for part in "UsV")
                   and all(torch.equal(r["basis"].means[n], rows[0]["basis"].means[n]) for n in r["basis"].means)
                   for r in rows if not r["mode"].startswith("ray"))
        size = files[0].stat().st_size / 2**20
        print(f"{args.model}: {args.count} checkpoints of {size:.0f} MiB, torch {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; bases bit-identical: {same}")
        print(f"sha256 of files 2..{args.count}: {sha[1] - sha[0]:.1f} s")
        header = (f"{'mode':<12} {'first fold s':>12} | {'ckpt/min (2..N)':>15} {'vs daemon':>9} | "
                  f"{'matrix folds s':>14} {'read+validate s':>15} {'write s':>7}")
        print(header)
        print("-" * len(header))
        for r in rows:
            print(f"{r['mode']:<12} {r['first']:>12.1f} | {r['rate']:>15.2f} {r['rate'] / rows[0]['rate']:>9.2f} | "
                  f"{r['svd']:>14.1f} {r['read']:>15.1f} {r['write']:>7.1f}".replace("nan", "  -"))
        for r in rows:
            if r["mode"].startswith("ray"):
                ref = rows[0]["basis"].factors
                gaps = [float(torch.linalg.matrix_norm(f.to_dense() - ref[n].to_dense())
                              / torch.linalg.matrix_norm(ref[n].to_dense())) for n, f in r["basis"].factors.items()
                        if ref[n].rank]
                print(f"{r['mode']}: the tree's basis vs the daemon's, relative Frobenius distance: mean "
                      f"{sum(gaps) / len(gaps):.4f}, max {max(gaps):.4f} over {len(gaps)} matrices")
    finally:
        shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
