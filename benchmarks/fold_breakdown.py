"""Where a streaming fold's time goes, per checkpoint, against reading, hashing and validating it.

Each source is a checkpoint file folded matrix by matrix with ``stage1.fold`` (``svd="randomized"``,
K = 10 %, the default settings; per matrix the attempt is made or skipped by
``entering.worth_attempting`` from its last folds, as the daemon does; ``--svd attempt``: at every
fold) into a running basis, in this process, ``--fold-workers`` matrices at
a time as the daemon's fold threads do (``store.threads.bounded_map``; default one per core, as
``[watch] fold_workers = 0``; 1: one matrix after the other). Per file it prints the time of
``ingest.read_checkpoint`` + every ``Checkpoint.delta`` + ``finish`` (read, sha256, validation: "io
s") and of the matrix folds, split into: randomized attempts that certified ("attempt s"), attempts
that failed their certificate ("failed s"), the exact SVDs run after a failed attempt ("fallback s")
or taken directly ("exact s", the first fold's rule), the extra top-1 SVD of a fold none of whose
components entered ("re-SVD s") and the rest (pooling, re-orthogonalisation, norms), summed over the
fold threads (thread-seconds). "fold s" is the file's wall time of its matrix folds, "ratio" that over io; "err" the largest relative Frobenius error of a fold's result against a
float64 exact fold from the same current basis (``--check``).

Sources:
  vit       open_clip ViT-B-32 (``pretrained=None``, seeded) and ``fold_memory.fine_tuned`` checkpoints
            (rank 16 plus noise on every visual weight; 48 matrices of 768x768 / 768x3072 / 3072x768 / 2304x768)
  minilm    the text suite's real fine-tunes of MiniLM (``~/.cache/axis-stream/suites/text/cache/sources``)
  quickstart the quickstart's tiny CLIP and its three real fine-tunes (``service.quickstart``)

    python benchmarks/fold_breakdown.py --source minilm --count 6 --check
    python benchmarks/fold_breakdown.py --source vit --count 3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the systemd unit sets it; before torch starts
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fold_memory import fine_tuned  # noqa: E402

from axis_stream import config  # noqa: E402
from axis_stream.core import entering, layout, stage1  # noqa: E402
from axis_stream.core import svd as svd_module  # noqa: E402
from axis_stream.service import foldworker  # noqa: E402
from axis_stream.store import ingest, models, threads  # noqa: E402

MINILM_SOURCES = Path.home() / ".cache/axis-stream/suites/text/cache/sources"
COLUMNS = ("attempt", "failed", "fallback", "exact", "re-SVD", "rest")


class SVDClock:
    """Seconds per kind of SVD work inside ``stage1.fold``, by patching the functions it calls; each
    fold is counted in its own thread and added up (with fold threads: thread-seconds)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.local = threading.local()
        self.lock = threading.Lock()
        attempt, exact = entering.entering_svd, svd_module.exact_svd
        local = self.local

        def timed_attempt(*args, **kwargs):
            t0 = time.perf_counter()
            out = attempt(*args, **kwargs)
            local.failed = out is None
            local.seconds["failed" if local.failed else "attempt"] += time.perf_counter() - t0
            return out

        def timed_exact(a, k=None):
            t0 = time.perf_counter()
            out = exact(a, k)
            kind = "fallback" if local.failed else "re-SVD" if k == 1 else "exact"
            local.seconds[kind] += time.perf_counter() - t0
            return out

        local.failed, local.seconds = False, defaultdict(float)   # the --check folds, not counted

        entering.entering_svd, svd_module.exact_svd = timed_attempt, timed_exact

    def fold(self, *args, **kwargs) -> stage1.Factors:
        """``stage1.fold``; what is not SVD work goes to "rest"."""
        self.local.failed, self.local.seconds = False, defaultdict(float)
        t0 = time.perf_counter()
        out = stage1.fold(*args, **kwargs)
        wall = time.perf_counter() - t0
        with self.lock:
            for kind, sec in self.local.seconds.items():
                self.seconds[kind] += sec
            self.seconds["rest"] += wall - sum(self.local.seconds.values())
        return out


def vit_sources(ws: Path, count: int) -> tuple[dict[str, torch.Tensor], list[Path], list[str]]:
    torch.manual_seed(0)
    model = models.create_base(config.BaseConfig(model="ViT-B-32", pretrained=""))
    base = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    files = []
    for i in range(1, count + 1):
        files.append(ws / f"vit-{i:02d}.safetensors")
        save_file(fine_tuned(base, i), files[-1])
    return base, files, layout.matrix_names(base, config.VIT_BLOCK_MATRICES)


def minilm_sources(count: int) -> tuple[dict[str, torch.Tensor], list[Path], list[str]]:
    from axis_stream.experiments.suites import text

    base = {"bert." + k: v.detach().contiguous() for k, v in text.MiniLM().bert.state_dict().items()}
    files = sorted(MINILM_SOURCES.glob("pool-*.safetensors"))[:count]
    if not files:
        raise SystemExit(f"no MiniLM sources under {MINILM_SOURCES}: run benchmarks/suite_text.py first")
    return base, files, layout.matrix_names(base, text.MATRIX_PATTERNS)


def quickstart_sources(ws: Path, count: int) -> tuple[dict[str, torch.Tensor], list[Path], list[str]]:
    from axis_stream.service import quickstart

    _, model = quickstart.build_base(ws)
    base = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    files = []
    for i, task in enumerate(quickstart.SOURCES[:count]):
        files.append(ws / f"{task.name}.safetensors")
        save_file(quickstart.finetune(model, task, 40, i)[0], files[-1])
    return base, files, layout.matrix_names(base, config.VIT_BLOCK_MATRICES)


def read(path: Path, base: dict[str, torch.Tensor], names: list[str]) -> tuple[dict[str, torch.Tensor], float]:
    """Every task matrix of ``path`` and the time to read, hash and validate the whole file."""
    t0 = time.perf_counter()
    with ingest.read_checkpoint(path, base, required=names) as ckpt:
        deltas = {name: ckpt.delta(name) for name in ckpt.names}
        ckpt.finish()
    return {n: deltas.get(n) for n in names}, time.perf_counter() - t0


def relative_error(got: stage1.Factors, want: stage1.Factors) -> float:
    ref = want.to_dense().double()
    return float(torch.linalg.matrix_norm(got.to_dense().double() - ref) / torch.linalg.matrix_norm(ref))


def fold_stream(clock: SVDClock, method: str, base: dict[str, torch.Tensor], files: list[Path], names: list[str],
                check: bool, workers: int) -> None:
    """Fold ``files`` in order into an empty basis with ``svd=method``, ``workers`` matrices at a time
    (as the daemon's fold threads do); one table row per file."""
    basis: dict[str, stage1.Factors | None] = {n: None for n in names}
    history: dict[str, tuple[int | None, int]] = {n: (None, 0) for n in names}   # as the manifest keeps it
    for i, path in enumerate(files, 1):
        deltas, io = read(path, base, names)
        clock.seconds.clear()
        todo = [n for n in names if deltas[n] is not None]
        matrices = {n: layout.as_matrix(deltas[n]) for n in todo}

        def prepare(name: str, matrices=matrices, count=i - 1):
            d, current = matrices[name], basis[name]
            k = stage1.k_for(tuple(d.shape))   # the daemon's choice per matrix (store.folding.Folder), or always attempt
            svd = "randomized" if method == "attempt" else entering.fold_path(method, tuple(d.shape), k, *history[name], count)
            return lambda: clock.fold(current, d, k, svd=svd)

        t0 = time.perf_counter()
        outs = threads.bounded_map(todo, prepare, lambda n: 0, workers=workers, budget=math.inf)
        wall = time.perf_counter() - t0
        paths, new, err = defaultdict(int), 0, 0.0
        for name, out in outs.items():
            paths[out.stats.svd_method] += 1
            new += out.stats.new_kept
            if check:
                cur, d = basis[name], matrices[name]
                cur64 = None if cur is None else stage1.Factors(cur.U.double(), cur.s.double(), cur.V.double())
                err = max(err, relative_error(out, stage1.fold(cur64, d.double(), stage1.k_for(tuple(d.shape)),
                                                               svd="exact")))
            basis[name] = stage1.Factors(out.U, out.s, out.V)
            history[name] = (out.stats.new_kept, entering.failed_after(history[name][1], out.stats.svd_method))
        summary = ", ".join(f"{m} {c}" for m, c in sorted(paths.items()))
        print(f"{method:>10} {i:>4} {io:>6.2f} {wall:>7.2f} {wall / io:>6.2f} | "
              + " ".join(f"{clock.seconds.get(c, 0.0):>10.2f}" for c in COLUMNS)
              + f" | {summary:<36} {new:>5} {err if check else float('nan'):>8.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("vit", "minilm", "quickstart"), default="minilm")
    parser.add_argument("--count", type=int, default=4, help="checkpoints folded in order")
    parser.add_argument("--svd", nargs="+", choices=(*svd_module.METHODS, "attempt"), default=["randomized"],
                        help="the fold's SVD path(s), each a stream of its own in this run (randomized: as the "
                             "daemon folds, choosing per matrix whether to attempt; attempt: at every fold)")
    parser.add_argument("--check", action="store_true", help="compare every fold with a float64 exact fold")
    parser.add_argument("--fold-workers", type=int, default=0,
                        help="matrices folded at once, as [watch] fold_workers (0: one per core, the default)")
    args = parser.parse_args()
    clock = SVDClock()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        base, files, names = {"vit": lambda: vit_sources(ws, args.count), "minilm": lambda: minilm_sources(args.count),
                              "quickstart": lambda: quickstart_sources(ws, args.count)}[args.source]()
        size = files[0].stat().st_size / 2**20
        print(f"{args.source}: {len(files)} checkpoints of {size:.0f} MiB, {len(names)} matrices, "
              f"torch {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start")
        header = (f"{'svd':>10} {'file':>4} {'io s':>6} {'fold s':>7} {'ratio':>6} | "
                  + " ".join(f"{c + ' s':>10}" for c in COLUMNS) + f" | {'paths':<36} {'new':>5} {'err':>8}")
        print(header)
        print("-" * len(header))
        workers = args.fold_workers or foldworker.default_workers()
        print(f"{workers} fold thread(s)")
        for method in args.svd:
            fold_stream(clock, method, base, files, names, args.check, workers)
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
