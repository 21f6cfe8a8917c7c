"""How far a tree of Stage 1 folds (``axis-stream backfill --executor ray``) lands from sequential
streaming and from the global merge, on the text suite's 20 real MiniLM fine-tunes.

For every matrix of ``text.MATRIX_PATTERNS`` (36 in MiniLM's 6 blocks, K = 10 % of the short
side), the task matrices of the 20 cached sources (``pool-00`` .. ``pool-19``, in order) are merged
by: the global merge (``stage1.merge``, paper Algorithm 1 on all 20 at once: the reference),
sequential streaming (``merges.axis_stream``, what the daemon and ``backfill`` compute) and the tree
of 2, 4 and 8 contiguous streamed shards folded pairwise (``merges.axis_tree``, what ``backfill
--executor ray --workers W`` computes). Per method: the relative Frobenius error of the merged delta
``||M - G||_F / ||G||_F`` against the global merge G (mean and max over the matrices) and against
streaming (mean), the subspace overlap with G (``(||U_G^T U_M||_F^2 + ||V_G^T V_M||_F^2) / 2K``,
1 = the same K-dimensional subspaces; mean and min), and the wall time in this one process (the
shards run one after another here; on W workers the shard phase divides by about W).

The sources must be cached (``axis-stream data prepare text``, then any text-suite run, e.g.
``axis-stream evaluate --config config/suite-text-sweep.toml``).

    nice -n 19 python benchmarks/tree_reduce.py
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone

import torch
from safetensors import safe_open

from axis_stream.core import layout, merges, stage1
from axis_stream.experiments.suites.harness import make_suite
from axis_stream.experiments.suites.text import MATRIX_PATTERNS


def overlap(m: stage1.Factors, g: stage1.Factors) -> float:
    """Mean squared cosine between the two K-dimensional left and right singular subspaces."""
    k = max(g.rank, 1)
    return float(((g.U.mT @ m.U).square().sum() + (g.V.mT @ m.V).square().sum()) / (2 * k))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=20, help="the first N of pool-00 .. pool-19")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--matrices", type=int, default=None, help="only the first N matrices (a quick look)")
    args = parser.parse_args()
    suite = make_suite("text", None)
    base = {k: v.detach().clone() for k, v in suite.base().state_dict().items()}
    names = layout.matrix_names(base, MATRIX_PATTERNS, False)[:args.matrices]
    files = [suite.cache_dir / "sources" / f"pool-{i:02d}.safetensors" for i in range(args.sources)]
    missing = [p for p in files if not p.exists()]
    if missing:
        raise SystemExit(f"{missing[0]}: not cached; run a text-suite experiment first (see --help)")
    handles = [safe_open(str(p), "pt") for p in files]
    methods = {"global (Algorithm 1)": lambda ds, k: stage1.merge(ds, k),
               "streaming (sequential)": lambda ds, k: merges.axis_stream(ds, k)}
    methods.update({f"tree, {w} shards": (lambda ds, k, w=w: merges.axis_tree(ds, k, w)) for w in args.shards})
    rows = {m: {"err": [], "vs_stream": [], "overlap": [], "seconds": 0.0} for m in methods}
    for name in names:
        deltas = [layout.as_matrix(h.get_tensor(name).float() - base[name].float()) for h in handles]
        k = stage1.k_for(deltas[0].shape)
        out = {}
        for method, merge in methods.items():
            t0 = time.perf_counter()
            out[method] = merge(deltas, k)
            rows[method]["seconds"] += time.perf_counter() - t0
        g, s = out["global (Algorithm 1)"], out["streaming (sequential)"].to_dense().double()
        for method, f in out.items():
            dense = f.to_dense().double()
            rows[method]["err"].append(rel(dense, g.to_dense().double()))
            rows[method]["vs_stream"].append(rel(dense, s))
            rows[method]["overlap"].append(overlap(f, g))
    shapes = sorted({tuple(layout.as_matrix(base[n]).shape) for n in names})
    print(f"text suite: {len(files)} MiniLM sources, {len(names)} matrices {shapes}, K = 10 % of the short side; "
          f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load {os.getloadavg()[0]:.1f}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    header = (f"{'method':<24} | {'rel. error vs global':>20} {'(max)':>7} | {'vs streaming':>12} | "
              f"{'overlap with global':>19} {'(min)':>6} | {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for method, r in rows.items():
        n = len(r["err"])
        print(f"{method:<24} | {sum(r['err']) / n:>20.4f} {max(r['err']):>7.4f} | {sum(r['vs_stream']) / n:>12.4f} | "
              f"{sum(r['overlap']) / n:>19.4f} {min(r['overlap']):>6.4f} | {r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
