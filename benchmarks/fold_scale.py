"""Fold cost as the basis grows to 10,000 sources: time, peak RSS, manifest, ledger and disk per version.

The model is the tests' tiny CLIP (``models.TINY_CLIP``, seeded: 1.7 M parameters, 8 matrices).
Checkpoint ``i`` is ``testing.finetuned_like(base, i)`` (the image tower changed like a fine-tune,
the text tower untouched), written, folded with ``Basis.fold_checkpoint`` and deleted before the
next exists. At each milestone ``n`` the table reports the median wall and CPU time of folds
``n - window + 1 .. n``, their largest peak RSS (``VmHWM`` reset through /proc/self/clear_refs before
each fold: the process's memory, so growth with the sources shows), and, after fold ``n``, the
current manifest's bytes, the ledger's bytes (format 2: ``ledger.sqlite``, and apart its write-ahead
log, which SQLite's automatic checkpoint keeps under about 4 MB; format 1: the ledger's JSON inside
the manifest), and the version's files on disk with the bytes only it holds (the rest hard-linked
from another version).

"Format 1" is the basis of commit dce0990 (``git show dce0990:axis_stream/store/basis.py``, imported
from a temporary file; it needs git and this checkout's history): the ledger and the share lists
inside every manifest, rewritten at every fold. Each format runs in a fresh subprocess, one after
the other; a run that passes ``--budget`` seconds stops there, with a row for its last fold.

    nice -n 19 python benchmarks/fold_scale.py                       # both formats (about 45 minutes)
    python benchmarks/fold_scale.py --folds 100 --old-folds 100      # a quick look
    python benchmarks/fold_scale.py --old-folds 0 --json a.json      # one format (run two at once) ...
    python benchmarks/fold_scale.py --show a.json b.json             # ... and their table
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from axis_stream import config
from axis_stream.config import BasisConfig
from axis_stream.store import models
from axis_stream.testing import finetuned_like

MILESTONES = [1, 10, 100, 1000, 2000, 5000, 10_000]
OLD_COMMIT = "dce0990"
MiB = 2**20


def memory_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak since the last reset) of this process, from /proc."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) * 1024


def tiny_base(folder: Path) -> dict[str, torch.Tensor]:
    """The tests' tiny CLIP, seeded as tests/conftest.py builds it."""
    cfg_path = folder / "axis-tiny.json"
    cfg_path.write_text(json.dumps(models.TINY_CLIP))
    torch.manual_seed(0)
    model = models.create_base(config.BaseConfig(model="axis-tiny", pretrained="", model_config=cfg_path))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def old_basis_module(folder: Path):
    """``axis_stream/store/basis.py`` as of ``OLD_COMMIT`` (format 1), imported from a temporary file."""
    repo = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(repo), "show", f"{OLD_COMMIT}:axis_stream/store/basis.py"],
                            capture_output=True, text=True, check=True).stdout
    path = folder / "basis_format_1.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("basis_format_1", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sizes(basis, fmt: int) -> dict[str, int]:
    """Manifest, ledger and current-version bytes (and the bytes only that version holds)."""
    vdir = basis.directory / "versions" / f"v{basis.version:06d}"
    manifest = (vdir / "manifest.json").stat().st_size
    files = [p.stat() for p in vdir.iterdir() if p.is_file()]
    total, own = sum(s.st_size for s in files), sum(s.st_size for s in files if s.st_nlink == 1)
    db = basis.directory / "ledger.sqlite"
    if fmt == 1:
        ledger, wal = len(json.dumps(basis.manifest["ledger"], indent=1)), 0
    else:
        ledger, wal = db.stat().st_size, db.with_name(db.name + "-wal").stat().st_size
    return {"manifest": manifest, "ledger": ledger, "wal": wal, "version": total, "own": own}


def run(fmt: int, folds: int, milestones: list[int], window: int, budget: float, threads: int) -> None:
    """Subprocess side: fold ``folds`` checkpoints, print one JSON line per milestone."""
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix=f"fold-scale-{fmt}-"))
    try:
        fold_all(tmp, fmt, folds, milestones, window, budget)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fold_all(tmp: Path, fmt: int, folds: int, milestones: list[int], window: int, budget: float) -> None:
    """Fold checkpoint after checkpoint in ``tmp``, printing the milestones' rows."""
    base = tiny_base(tmp)
    module = old_basis_module(tmp) if fmt == 1 else importlib.import_module("axis_stream.store.basis")
    basis = module.Basis.create(tmp / "basis", base, BasisConfig(svd="exact"), {"name": "axis-tiny"})
    marks = [n for n in milestones if n <= folds]
    watched = {i for n in marks for i in range(max(1, n - window + 1), n + 1)}
    times: dict[int, tuple[float, float, int]] = {}
    start = time.monotonic()
    for i in range(1, marks[-1] + 1):
        ckpt = tmp / f"ckpt-{i:05d}.safetensors"
        save_file(finetuned_like(base, i), ckpt)
        if i in watched:
            Path("/proc/self/clear_refs").write_text("5")
        t0, c0 = time.perf_counter(), time.process_time()
        basis.fold_checkpoint(ckpt)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ckpt.unlink()
        if i in watched:
            times[i] = (wall, cpu, memory_bytes("VmHWM"))
        over = time.monotonic() - start > budget
        if i in marks or over:
            span = [times[j] for j in range(max(1, i - window + 1), i + 1) if j in times] or [(wall, cpu, 0)]
            print(json.dumps({"format": fmt, "fold": i, "seconds": statistics.median(t[0] for t in span),
                              "cpu": statistics.median(t[1] for t in span), "peak": max(t[2] for t in span),
                              "elapsed": time.monotonic() - start, "stopped": over, **sizes(basis, fmt)}),
                  flush=True)
            if over:
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=10_000, help="format 2: fold up to this many")
    parser.add_argument("--old-folds", type=int, default=1000, help="format 1: fold up to this many (0: skip)")
    parser.add_argument("--milestones", type=int, nargs="+", default=MILESTONES)
    parser.add_argument("--window", type=int, default=5, help="folds per milestone (the median is shown)")
    parser.add_argument("--budget", type=float, default=3600, help="seconds per format before it stops")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the rows here (after each row)")
    parser.add_argument("--show", type=Path, nargs="+", default=[], help="only print the table of these --json files")
    parser.add_argument("--run", type=int, choices=[1, 2], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(args.run, args.folds, args.milestones, args.window, args.budget, args.threads)
        return
    rows = [r for path in args.show for r in json.loads(path.read_text())]
    for fmt, folds in ((2, args.folds), (1, args.old_folds)) if not args.show else ():
        if not folds:
            continue
        cmd = [sys.executable, __file__, "--run", str(fmt), "--folds", str(folds), "--window", str(args.window),
               "--budget", str(args.budget), "--threads", str(args.threads), "--milestones", *map(str, args.milestones)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            rows.append(json.loads(line))
            print(f"  format {fmt}: fold {rows[-1]['fold']} done after {rows[-1]['elapsed']:.0f} s", file=sys.stderr)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1) + "\n")
        if proc.wait():
            raise SystemExit(f"{' '.join(cmd)} failed")
    print(f"tiny CLIP (8 matrices), svd exact, {args.threads} torch thread(s), median of {args.window} folds "
          f"per row (fold 1: itself); * = stopped there by --budget")
    header = (f"{'format':>6} {'fold':>6} | {'wall s':>7} {'cpu s':>6} {'peak MiB':>8} | {'manifest KiB':>12} "
              f"{'ledger KiB':>10} {'WAL KiB':>8} {'version MiB':>11} {'own MiB':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r['peak'] / MiB:>8.0f}" if r["peak"] else f"{'-':>8}"  # a --budget stop outside a window
        print(f"{r['format']:>6} {r['fold']:>6}{'*' if r.get('stopped') else ' '}| {r['seconds']:>7.3f} {r['cpu']:>6.3f} {peak} | "
              f"{r['manifest'] / 1024:>12.1f} {r['ledger'] / 1024:>10.1f} {r['wal'] / 1024:>8.0f} {r['version'] / MiB:>11.3f} "
              f"{r['own'] / MiB:>8.3f}")


if __name__ == "__main__":
    main()
