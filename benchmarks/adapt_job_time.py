"""Where a daemon adapt job's wall time goes on the tiny model, and what the job processes' start costs.

    nice python benchmarks/adapt_job_time.py [--runs 3] [--epochs 3]

A workspace like the quickstart's (the tiny CLIP, three fine-tune-like sources folded into an ``axis``
basis and into a dense ``continual-ta`` one, the quickstart's image-folder target) in a temporary
folder. Two tables:

1. the job's steps one by one in a fresh interpreter (``--phases``, run as a subprocess, as a spawned
   job process would run them): imports, base load, the basis version's ``load()`` (a dense strategy's
   top-K SVD of every merged matrix), Stage 2 up to its start, training, test and save, and the
   interpreter's exit; median over ``--runs``;
2. whole jobs through ``JobRunner`` as the daemon runs them, ``spawn`` against ``forkserver`` (the
   default), interleaved in one process: the record's wall time (running -> finished), the child's
   first log line after the start, and the Stage 2 report's own ``seconds``.

One thread (``OMP_NUM_THREADS=1`` unless set), as the quickstart runs its jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

PHASES = ("imports", "base load", "basis load()", "Stage 2 setup (head, model, data, start)", "training",
          "test and save", "interpreter start and exit")


def phases(config_path: str) -> None:
    """The adapt job's steps in this (fresh) interpreter, timed; prints one JSON line."""
    t0 = time.perf_counter()
    import open_clip  # noqa: F401  (what the job imports: open_clip at its base load)

    from axis_stream import config
    from axis_stream.adapt.recipe import adapt, job_settings
    from axis_stream.service.jobs.process import call_job  # noqa: F401  (the job process's own module)
    from axis_stream.store import models
    from axis_stream.store.basis import Basis

    marks = {"imports": time.perf_counter() - t0}
    cfg = config.load(config_path, env={})
    job = job_settings({"target": f"imagefolder:{Path(config_path).parent.parent / 'target'}"}, cfg)
    t = time.perf_counter()
    base = models.create_base(cfg.base)
    marks["base load"] = time.perf_counter() - t
    t = time.perf_counter()
    snapshot = Basis.open(cfg.paths.basis_dir, base.state_dict(), settings=cfg.basis).load()
    marks["basis load()"] = time.perf_counter() - t
    seen: dict[str, float] = {}

    def progress(event: dict) -> None:
        seen.setdefault(event["phase"], time.perf_counter())
        if event["phase"] in ("train", "validate"):
            seen["trained"] = time.perf_counter()

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        adapt(base, cfg.base, snapshot, job, Path(out), progress)
        end = time.perf_counter()
    marks["Stage 2 setup (head, model, data, start)"] = seen["start"] - t
    marks["training"] = seen["trained"] - seen["start"]
    marks["test and save"] = end - seen["trained"]
    print(json.dumps(marks), flush=True)


def workspace(root: Path, epochs: int) -> dict[str, Path]:
    """The tiny base, a target, and a config per strategy with three sources folded; name -> config path."""
    from safetensors.torch import save_file

    from axis_stream import config
    from axis_stream.service import quickstart
    from axis_stream.store.basis import open_from_config
    from axis_stream.testing import finetuned_like

    base_cfg, base = quickstart.build_base(root)
    quickstart.write_image_folder(quickstart.TARGET, root / "target", {"train": 40, "test": 24}, 100)
    sources = []
    for seed in range(3):
        sources.append(root / f"source-{seed}.safetensors")
        save_file(finetuned_like(base.state_dict(), seed), sources[-1])
    out = {}
    for strategy in ("axis", "continual-ta"):
        (root / strategy).mkdir()
        path = quickstart.write_config(root / strategy, base_cfg, epochs)
        path.write_text(path.read_text() + f'[basis]\nstrategy = "{strategy}"\n')
        basis = open_from_config(config.load(path, env={}), create=True)
        for src in sources:
            basis.fold_checkpoint(src)
        out[strategy] = path
    return out


def daemon_jobs(cfg_path: Path, method: str) -> dict[str, float]:
    """One adapt job through a ``JobRunner`` with job processes from ``method``; its times in seconds."""
    from axis_stream import config
    from axis_stream.service.jobs.runner import JobRunner, job_processes
    from axis_stream.testing import wait_until

    cfg = config.load(cfg_path, env={})
    runner = JobRunner(cfg, cfg.paths.basis_dir, start_method=method)
    runner.start()
    try:
        if method == "forkserver":   # the daemon's steady state: its server started (and imported) at its start
            warm = job_processes(method).Process(target=time.sleep, args=(0,))
            warm.start()
            warm.join()
        job_id = runner.submit("adapt", {"target": f"imagefolder:{cfg_path.parent.parent / 'target'}"})
        record = wait_until(lambda: (r := runner.get(job_id)).finished_at and r, 600, f"job {job_id}", interval=0.05)
    finally:
        runner.shutdown()
    if record.state != "succeeded":
        raise SystemExit(f"job {job_id} {record.state}: {record.error} (log {record.log_path})")
    first = Path(record.log_path).read_text().splitlines()[0]
    child = datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return {"wall": record.finished_at - record.started_at, "child start": child - record.started_at,
            "Stage 2 seconds": record.result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="Runs of each measurement (median).")
    parser.add_argument("--epochs", type=int, default=3, help="Stage 2 epochs (the quickstart's: 3).")
    parser.add_argument("--phases", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # as the quickstart runs its jobs (before torch loads)
    if args.phases:
        return phases(args.phases)
    with tempfile.TemporaryDirectory() as tmp:
        configs = workspace(Path(tmp), args.epochs)
        print("| step of the job (fresh interpreter) | " + " | ".join(configs) + " |")
        print("|---|" + "---|" * len(configs))
        rows: dict[str, dict[str, list[float]]] = {p: {s: [] for s in configs} for p in PHASES}
        for _ in range(args.runs):
            for strategy, path in configs.items():
                t = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--phases", str(path)], capture_output=True,
                                      text=True, check=True)
                whole = time.perf_counter() - t
                marks = json.loads(done.stdout.strip().splitlines()[-1])
                marks["interpreter start and exit"] = whole - sum(marks.values())
                for p in PHASES:
                    rows[p][strategy].append(marks[p])
        for p in PHASES:
            print(f"| {p} | " + " | ".join(f"{statistics.median(v):.2f} s" for v in rows[p].values()) + " |")
        print()
        print("| daemon job, axis basis | wall (running -> finished) | child's first log line | Stage 2 report |")
        print("|---|---|---|---|")
        jobs: dict[str, list[dict[str, float]]] = {"spawn": [], "forkserver": []}
        for _ in range(args.runs):
            for method in jobs:
                jobs[method].append(daemon_jobs(configs["axis"], method))
        for method, runs in jobs.items():
            print(f"| {method} | " + " | ".join(f"{statistics.median(r[k] for r in runs):.2f} s"
                                              for k in ("wall", "child start", "Stage 2 seconds")) + " |")


if __name__ == "__main__":
    main()
