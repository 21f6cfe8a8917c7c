"""What a job is: the context a job function gets, and the job functions by kind."""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axis_stream.adapt.data import resolve_target
from axis_stream.adapt.recipe import Progress, adapt, job_settings
from axis_stream.config import Config
from axis_stream.store import models
from axis_stream.store.atomic import atomic_write_json
from axis_stream.store.basis import Basis

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """Everything a job function gets besides its parameters; it runs in a child process."""

    job_id: str
    config: Config
    basis_dir: Path
    basis_version: int | None                # pinned when the job started (None only for kinds needing no basis)
    out_dir: Path                            # the job's own folder under <state_dir>/jobs/<id>
    progress: Callable[[dict[str, Any]], None]   # report e.g. {"epoch": 1, "step": 10, "of": 100, "loss": 0.3}


# Job kind -> "module:function"; the function is called as fn(params, ctx) in the child and returns a JSON-able dict.
JOB_KINDS: dict[str, str] = {
    "adapt": "axis_stream.service.jobs.kinds:run_adapt",
    "selftest": "axis_stream.service.jobs.kinds:run_selftest",
}
NEEDS_BASIS = frozenset({"adapt"})


def run_adapt(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """The ``adapt`` job: Stage 2 against basis version ``ctx.basis_version``; files go to ``ctx.out_dir``."""
    job = job_settings(params, ctx.config)
    base = models.create_base(ctx.config.base)
    snapshot = Basis.open(ctx.basis_dir, base.state_dict(), settings=ctx.config.basis).load(ctx.basis_version)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    return adapt(base, ctx.config.base, snapshot, job, ctx.out_dir, ctx.progress)


def run_local(params: dict[str, Any], cfg: Config, progress: Progress) -> dict[str, Any]:
    """``axis-stream adapt --local``: run the job in this process against the current basis version."""
    adapt_request(params, cfg)  # fail on bad parameters or a missing target before anything is created
    version = Basis.open(cfg.paths.basis_dir).version
    cfg.paths.jobs_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix=f"local-{time.strftime('%Y%m%d-%H%M%S')}-", dir=cfg.paths.jobs_dir))
    job_id = out_dir.name  # unique even for two runs started in the same second
    ctx = JobContext(job_id, cfg, cfg.paths.basis_dir, version, out_dir, progress)
    return {"job_id": job_id, "out_dir": str(out_dir), **run_adapt(params, ctx)}


def run_selftest(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """A small real CPU job for checking the job machinery: fit y = 3x - 1 by gradient descent.

    params: ``steps`` (default 50), ``seed``, ``sleep_s`` per step, and ``mode``: "ok", "fail"
    (raise), "crash" (``os._exit(exit_code)``) or "hang" (block until killed), the last three
    after the first step.
    """
    steps, mode = int(params.get("steps", 50)), params.get("mode", "ok")
    rng = random.Random(int(params.get("seed", 0)))
    xs = [rng.uniform(-1.0, 1.0) for _ in range(64)]
    ys = [3.0 * x - 1.0 + 0.01 * rng.gauss(0.0, 1.0) for x in xs]
    w = b = 0.0
    print(f"selftest: fitting y = 3x - 1 on {len(xs)} points for {steps} steps", flush=True)
    for step in range(1, steps + 1):
        errors = [w * x + b - y for x, y in zip(xs, ys)]
        loss = sum(e * e for e in errors) / len(xs)
        w -= 0.5 * 2.0 * sum(e * x for e, x in zip(errors, xs)) / len(xs)
        b -= 0.5 * 2.0 * sum(errors) / len(xs)
        ctx.progress({"step": step, "of": steps, "loss": loss})
        time.sleep(float(params.get("sleep_s", 0.0)))
        if mode == "fail":
            raise RuntimeError("selftest asked to fail")
        if mode == "crash":
            os._exit(int(params.get("exit_code", 3)))
        if mode == "hang":
            threading.Event().wait()
    if not math.isfinite(loss):
        raise RuntimeError(f"selftest diverged: loss {loss}")
    result = {"w": w, "b": b, "loss": loss, "steps": steps, "basis_version": ctx.basis_version}
    atomic_write_json(ctx.out_dir / "selftest.json", result)
    return result


def adapt_params(args: dict[str, Any], config: Config) -> dict[str, Any]:
    """An adapt job's parameters, checked now by Stage 2's own rules so that a bad one fails the request,
    not the job; settings not given come from the config's ``[adapt]`` section when the job runs."""
    params = {name: value for name, value in args.items() if value is not None}
    job_settings(params, config)
    return params


def adapt_request(args: dict[str, Any], config: Config) -> dict[str, Any]:
    """``adapt_params``, and the target resolved with its data as the job will (a known name, an
    image folder that exists, a data root that exists), so that a request naming no usable data fails
    at once. (A trigger's jobs are checked when they run: their data may appear later.)"""
    params = adapt_params(args, config)
    job = job_settings(params, config)
    resolve_target(job.target, job.data_root, job.classnames, job.templates)
    return params
