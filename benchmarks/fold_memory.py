"""Peak RSS and time of folding the 1st, 10th and 30th checkpoint of an open_clip ViT-B-32 into a basis.

The base is open_clip ``ViT-B-32`` built with ``pretrained=None`` (seeded), saved once as
safetensors. Each checkpoint is the whole state dict with its visual tower changed like a
fine-tune: every 2-D visual weight gets a rank-16 change with a ``1/j`` spectrum (90 % of the
change's energy) plus dense noise (10 %), 3 % of the weight's norm in all; the other visual tensors
get small noise; the text tower is unchanged. A checkpoint is generated, folded and deleted before
the next one exists, as the daemon discards them.

The measured folds run in a fresh subprocess each: it records its peak RSS (``VmHWM``) after the
imports and a fold of a small random matrix (the interpreter's baseline, with the linear-algebra
libraries' code paged in), loads the base (plain reads, no mmap), opens the basis and
folds; its final peak RSS is the fold's peak. The bound the fold must stay under is baseline + base +
basis (the new version's files) + 2 x the largest tensor. A measured fold runs ``--repeat`` times on
copies of the basis; every fold also runs in this process, which carries the basis forward. With
``--without-give-up`` each measured fold is measured again with the randomized SVD's early give-up
switched off (``svd.GIVE_UP_FACTOR = inf``: the attempt runs to its subspace budget before falling
back), side by side; with ``--without-first-fold-rule``, again with the randomized path attempted
at the first fold too (``stage1.FIRST_FOLD_SVD = None``; by default an empty basis's fold takes the
exact path). The SVD column counts the matrices by path and by why the randomized attempt
stopped (``svd.SVDReport.stop``; a later fold's entering-set SVD, ``entering.fold_svd``, counts by its
path); "SVD cpu seconds" is the CPU time spent inside ``svd.top_svd`` and ``entering.fold_svd``
(the rest of a fold, reading, hashing and writing, is the same whichever path the SVD takes).

    python benchmarks/fold_memory.py                        # 30 folds, measures 1, 10, 30 twice each
    python benchmarks/fold_memory.py --folds 3 --measure 1 3 --svd exact
    python benchmarks/fold_memory.py --repeat 1 --without-give-up
    python benchmarks/fold_memory.py --sharded 100          # each checkpoint a folder of <= 100 MiB shards
    python benchmarks/fold_memory.py --folds 1 --measure 1 --without-first-fold-rule

With ``--sharded MIB`` each checkpoint is a Hugging Face-style folder instead of one file
(``config.json``, shards ``model-0000N-of-0000M.safetensors`` of at most MIB written by
``store.export.write_hf_weights``, ``model.safetensors.index.json``), read through ``readers.HFFolder``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from axis_stream.config import BasisConfig
from axis_stream.core import entering, stage1, svd
from axis_stream.store import readers
from axis_stream.store.basis import Basis
from axis_stream.store.export import write_hf_weights

MiB = 2**20


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would carry the parent's peak over the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): steadier than wall time on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_base(path: Path) -> dict[str, torch.Tensor]:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
    return state


def load_base(path: Path) -> dict[str, torch.Tensor]:
    f = readers.SafetensorsFile(path)
    try:
        return {k: f.read(k) for k in f.keys()}
    finally:
        f.close()


def fine_tuned(base: dict[str, torch.Tensor], seed: int, rank: int = 16, size: float = 0.03
               ) -> dict[str, torch.Tensor]:
    """The base with a fine-tune-like change to its visual tower (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        if name.startswith("visual.") and t.is_floating_point():
            if t.dim() == 2:
                m, n = t.shape
                r = min(rank, m, n)
                u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
                v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
                low = (u / torch.arange(1, r + 1)) @ v.T
                noise = torch.randn(m, n, generator=g)
                target = size * float(torch.linalg.matrix_norm(t))
                t = t + target * (0.9**0.5 * low / torch.linalg.matrix_norm(low)
                                  + 0.1**0.5 * noise / torch.linalg.matrix_norm(noise))
            else:
                t = t + 1e-3 * torch.randn(t.shape, generator=g)
        out[name] = t.contiguous()
    return out


def write_checkpoint(state: dict[str, torch.Tensor], stem: Path, shard_mib: float | None) -> Path:
    """``stem.safetensors``, or with ``shard_mib`` the folder ``stem`` holding the state dict in shards."""
    if shard_mib is None:
        save_file(state, stem.with_suffix(".safetensors"))
        return stem.with_suffix(".safetensors")
    stem.mkdir()
    (stem / "config.json").write_text(json.dumps({"model_type": "open_clip"}))
    write_hf_weights(state, stem, {"format": "pt"}, int(shard_mib * MiB))
    return stem


def measure(base_path: Path, basis_dir: Path, ckpt: Path, give_up_factor: float, first_fold_rule: bool) -> dict:
    """Run in a fresh process: the peak RSS and time of one fold."""
    for path in ("exact", "randomized"):  # load the linear-algebra code: part of the baseline, not the fold
        stage1.fold(None, torch.randn(300, 200), 20, svd=path)
    baseline = peak_rss_bytes()
    base = load_base(base_path)
    basis = Basis.open(basis_dir, base)
    svd.GIVE_UP_FACTOR = give_up_factor
    stage1.FIRST_FOLD_SVD = stage1.FIRST_FOLD_SVD if first_fold_rule else None
    stops: Counter = Counter()
    svd_cpu = [0.0]
    top_svd = svd.top_svd

    def counted(*args, **kwargs):  # why each randomized attempt stopped, and its CPU time: not in the ledger
        tic = cpu_seconds()
        out = top_svd(*args, **kwargs)
        svd_cpu[0] += cpu_seconds() - tic
        stops[out[3].stop or "-"] += 1
        return out

    fold_svd = entering.fold_svd

    def counted_entering(*args, **kwargs):  # a later fold's randomized path (core/entering.py)
        tic = cpu_seconds()
        out = fold_svd(*args, **kwargs)
        svd_cpu[0] += cpu_seconds() - tic
        stops[out[3].method] += 1
        return out

    svd.top_svd, entering.fold_svd = counted, counted_entering
    start, cpu_start = time.perf_counter(), cpu_seconds()
    record = basis.fold_checkpoint(ckpt)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    svd.top_svd, entering.fold_svd = top_svd, fold_svd
    return {
        "version": record.version, "seconds": seconds, "cpu_seconds": cpu, "svd_cpu_seconds": svd_cpu[0],
        "peak": peak_rss_bytes(),
        "baseline": baseline,
        "base": sum(t.nbytes for t in base.values()),
        "basis": basis.nbytes(record.version),
        "largest": max(t.nbytes for t in base.values()),
        "checkpoint": readers.checkpoint_size(ckpt), "new_kept": record.new_kept_total,
        "energy_kept": record.energy_kept,
        "svd": dict(Counter(m["svd_method"] for m in record.matrices.values())),
        "stops": dict(stops), "give_up": math.isfinite(give_up_factor), "first_fold_rule": first_fold_rule,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=30)
    parser.add_argument("--measure", type=int, nargs="+", default=[1, 10, 30])
    parser.add_argument("--repeat", type=int, default=2, help="fresh-process measurements per measured fold")
    parser.add_argument("--svd", choices=["randomized", "exact"], default=BasisConfig().svd)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--without-give-up", action="store_true",
                        help="measure each measured fold also with the randomized SVD's early give-up off")
    parser.add_argument("--sharded", type=float, metavar="MIB", default=None,
                        help="write each checkpoint as a Hugging Face folder of shards of at most MIB MiB")
    parser.add_argument("--without-first-fold-rule", action="store_true",
                        help="measure each measured fold also with the randomized path attempted at the first fold")
    parser.add_argument("--worker", nargs=5, metavar=("BASE", "BASIS", "CKPT", "FACTOR", "RULE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*map(Path, args.worker[:3]), float(args.worker[3]), args.worker[4] == "on")))
        return
    variants = [(svd.GIVE_UP_FACTOR, "on")] + ([(math.inf, "on")] if args.without_give_up else []) + (
        [(svd.GIVE_UP_FACTOR, "off")] if args.without_first_fold_rule else [])
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        base_path = tmp / "vit-b-32-base.safetensors"
        base = build_base(base_path)
        basis_dir = tmp / "basis"
        Basis.create(basis_dir, base, BasisConfig(svd=args.svd), {"name": "ViT-B-32", "pretrained": "none (seed 0)"})
        basis = Basis.open(basis_dir, base)
        rows = []
        for i in range(1, args.folds + 1):
            ckpt = write_checkpoint(fine_tuned(base, seed=i), tmp / f"task-{i:03d}", args.sharded)
            if i in args.measure:  # on copies of the basis, each in a fresh process
                for _ in range(args.repeat):
                    for factor, rule in variants:
                        copy = tmp / "basis-copy"
                        shutil.copytree(basis_dir, copy)
                        cmd = [sys.executable, __file__, "--worker", str(base_path), str(copy), str(ckpt), str(factor), rule]
                        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                        shutil.rmtree(copy)
                        rows.append(json.loads(out.strip().splitlines()[-1]))
                        print(f"fold {i} (measured): {rows[-1]}", flush=True)
            cpu_start = cpu_seconds()
            record = basis.fold_checkpoint(ckpt)
            print(f"fold {i}: {record.seconds:.1f} s, cpu {cpu_seconds() - cpu_start:.1f} s", flush=True)
            shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    print(f"checkpoints: {f'folders of shards <= {args.sharded:g} MiB' if args.sharded else 'one safetensors file'}")
    print()
    print("| fold | give-up | first-fold rule | seconds | cpu seconds | SVD cpu seconds | peak RSS | baseline | base | basis | largest tensor | bound "
          "| peak - baseline - base | svd | randomized attempt stopped |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        bound = r["baseline"] + r["base"] + r["basis"] + 2 * r["largest"]
        print(f"| {r['version']} | {'on' if r['give_up'] else 'off'} "
              f"| {'on' if r['first_fold_rule'] else 'off'} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['svd_cpu_seconds']:.1f} "
              f"| {r['peak'] / MiB:.0f} MiB | {r['baseline'] / MiB:.0f} MiB "
              f"| {r['base'] / MiB:.0f} MiB | {r['basis'] / MiB:.1f} MiB | {r['largest'] / MiB:.0f} MiB "
              f"| {bound / MiB:.0f} MiB {'ok' if r['peak'] <= bound else 'EXCEEDED'} "
              f"| {(r['peak'] - r['baseline'] - r['base']) / MiB:.0f} MiB "
              f"| {', '.join(f'{k} {v}' for k, v in r['svd'].items())} "
              f"| {', '.join(f'{k} {v}' for k, v in sorted(r['stops'].items()))} |")


if __name__ == "__main__":
    main()
