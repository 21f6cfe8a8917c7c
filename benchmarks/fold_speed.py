"""Time and peak memory of one streaming Stage 1 fold: exact dense SVD vs the certified randomized path.

Task matrices have a slowly decaying spectrum, singular values ``j^-0.5`` over the full rank, with
random orthonormal singular vectors (``--task noisy``: rank 16 plus noise, as in fold_memory.py). The current basis "after S sources" is synthetic: random
orthonormal factors carrying the top k of S pooled ``c_i * j^-0.5`` spectra (``c_i = exp(0.3 z_i)``),
as the fold of S such matrices would hold; S = 0 is the first fold of an empty basis, measured twice:
with the first-fold rule (``stage1.FIRST_FOLD_SVD``: the exact path) and without it (the randomized
attempt, row "0*"). Each measurement runs in a fresh subprocess: "+MiB" is
its peak RSS during the folds (``VmHWM`` after a reset through /proc/self/clear_refs) minus its RSS
just before them ("base MiB": torch and the inputs).

    python benchmarks/fold_speed.py                      # the full table (about 5-10 minutes)
    python benchmarks/fold_speed.py --shapes 3072x768    # one shape
    python benchmarks/fold_speed.py --sources 0 --task noisy   # the first fold, with and without the rule
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the systemd unit sets it; before torch starts
import torch  # noqa: E402

from axis_stream.core import stage1  # noqa: E402
from axis_stream.core.stage1 import Factors  # noqa: E402

SHAPES = ["768x768", "3072x768", "768x3072", "4096x11008"]
SOURCES = [1, 8, 32]
BIG = 10_000_000  # matrices with more entries than this get fewer repetitions


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g)).Q


def decaying_task(m: int, n: int, seed: int) -> torch.Tensor:
    """A float32 task matrix with singular values ``j^-0.5``, j = 1..min(m, n)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    return (orthonormal(m, r, g) * s) @ orthonormal(n, r, g).T


def noisy_task(m: int, n: int, seed: int, rank: int = 16) -> torch.Tensor:
    """A float32 fine-tune-like task matrix (as fold_memory.py's): a rank-16 ``1/j`` part with 90 % of
    the energy plus Gaussian noise with 10 %, a flat (Marchenko-Pastur) tail from rank 17 on."""
    g = torch.Generator().manual_seed(seed)
    low = (orthonormal(m, rank, g) / torch.arange(1, rank + 1)) @ orthonormal(n, rank, g).T
    noise = torch.randn(m, n, generator=g)
    return 0.9**0.5 * low / torch.linalg.matrix_norm(low) + 0.1**0.5 * noise / torch.linalg.matrix_norm(noise)


TASKS = {"decaying": decaying_task, "noisy": noisy_task}


def merged_basis(m: int, n: int, k: int, sources: int, seed: int) -> tuple[torch.Tensor, ...] | None:
    """``(U, s, V)`` of the rank-k basis a fold of ``sources`` decaying task matrices would hold (0: none)."""
    if sources == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(0.3 * torch.randn(sources, generator=g))
    pooled = torch.cat([c * torch.arange(1, k + 1, dtype=torch.float32) ** -0.5 for c in scales])
    return orthonormal(m, k, g), pooled.sort(descending=True).values[:k], orthonormal(n, k, g)


def memory_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, from /proc."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) / 1024


def measure(case: Path, path: str, repeats: int, threads: int) -> None:
    """Subprocess side: fold ``repeats`` times, print times and memory as JSON, save the last result.

    ``path`` is ``exact``, ``randomized``, or ``randomized*``: randomized without the first-fold rule.
    """
    torch.set_num_threads(threads)
    if path == "randomized*":
        stage1.FIRST_FOLD_SVD = None
    name, path = path, path.rstrip("*")
    inputs = torch.load(case)
    current = Factors(*inputs["current"]) if inputs["current"] is not None else None
    warm = torch.randn(96, 64)
    stage1.fold(None, warm, 8, svd=path)  # load the LAPACK/BLAS kernels before measuring
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS (Linux)
    before = memory_mib("VmRSS")
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = stage1.fold(current, inputs["delta"], inputs["k"], svd=path)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = memory_mib("VmHWM")
    torch.save({"U": out.U, "s": out.s, "V": out.V}, case.with_suffix(f".{name}.out"))
    print(json.dumps({"times": times, "cpu": cpu, "base_mib": before, "peak_mib": peak,
                      "method": out.stats.svd_method, "cert": out.stats.svd_error,
                      "new_kept": out.stats.new_kept}))


def run_case(case: Path, path: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(case), path, str(repeats), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    result = json.loads(done.stdout)
    result.update(torch.load(case.with_suffix(f".{path}.out")))
    return result


def errors(fast: dict, exact: dict) -> tuple[float, float]:
    """Max relative singular-value error and relative Frobenius error of the fold vs the exact fold."""
    dense = [(r["U"].double() * r["s"].double()) @ r["V"].double().T for r in (fast, exact)]
    fold_err = float(torch.linalg.matrix_norm(dense[0] - dense[1]) / torch.linalg.matrix_norm(dense[1]))
    n = min(fast["s"].numel(), exact["s"].numel())
    sv_err = float(((fast["s"][:n].double() - exact["s"][:n].double()).abs() / exact["s"][:n].double()).max())
    return sv_err, fold_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated MxN list")
    parser.add_argument("--sources", default=",".join(map(str, SOURCES)), help="sources already folded")
    parser.add_argument("--task", choices=sorted(TASKS), default="decaying",
                        help="the new task matrix: singular values j^-0.5, or rank 16 plus noise")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per fold")
    parser.add_argument("--measure", nargs=3, metavar=("CASE", "PATH", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(Path(args.measure[0]), args.measure[1], int(args.measure[2]), args.threads)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"float32, tol 1e-4, task {args.task}, best of the repetitions; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    header = (f"{'shape':>10} {'k':>4} {'S':>3} | {'exact s':>8} {'fast s':>8} {'speed-up':>8} {'cpu':>6} | "
              f"{'exact +MiB':>10} {'fast +MiB':>9} {'base MiB':>8} | {'sv err':>8} {'fold err':>8} "
              f"{'cert':>8} {'path':>10} {'new':>4}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            m, n = map(int, shape.split("x"))
            k = stage1.k_for((m, n))
            delta = TASKS[args.task](m, n, seed=1)
            reps = {"exact": 1, "randomized": 3} if m * n > BIG else {"exact": 3, "randomized": 5}
            for sources in map(int, args.sources.split(",")):
                case = Path(tmp) / f"{shape}-{sources}.pt"
                torch.save({"delta": delta, "current": merged_basis(m, n, k, sources, seed=2), "k": k}, case)
                exact = run_case(case, "exact", reps["exact"], args.threads)
                for path in ["randomized"] + (["randomized*"] if sources == 0 else []):
                    fast = run_case(case, path, reps["randomized"], args.threads)
                    sv_err, fold_err = errors(fast, exact)
                    te, tf = min(exact["times"]), min(fast["times"])
                    cpu = min(exact["cpu"]) / min(fast["cpu"])
                    label = f"{sources}{path[-1] if path.endswith('*') else ''}"
                    print(f"{shape:>10} {k:>4} {label:>3} | {te:8.3f} {tf:8.3f} {te / tf:7.1f}x {cpu:5.1f}x | "
                          f"{exact['peak_mib'] - exact['base_mib']:10.0f} {fast['peak_mib'] - fast['base_mib']:9.0f} "
                          f"{fast['base_mib']:8.0f} | "
                          f"{sv_err:8.1e} {fold_err:8.1e} {fast['cert']:8.1e} {fast['method']:>10} "
                          f"{fast['new_kept']:>4}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
