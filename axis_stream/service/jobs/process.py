"""One job in its own spawned process: output redirected to its log, its result sent back."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from axis_stream.config import Config
from axis_stream.errors import AxisError
from axis_stream.service.api import one_line
from axis_stream.service.jobs.kinds import JobContext

log = logging.getLogger(__name__)


def _child_main(spec: str, params: dict[str, Any], job_id: str, config: Config, basis_dir: Path,
                basis_version: int | None, out_dir: Path, log_path: Path, writer: Connection, parent_pid: int,
                env: dict[str, str] | None = None) -> None:
    """Run one job function in this fresh process, logging to its job.log and reporting over ``writer``.
    ``env``: the daemon's environment now (a process forked from the forkserver has the server's)."""
    os.setsid()                              # own process group: cancel reaches grandchildren too
    _exit_with_parent(parent_pid)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
        if env.get("OMP_NUM_THREADS", "").isdigit():    # read by torch at its import, in the server
            torch.set_num_threads(max(1, int(env["OMP_NUM_THREADS"])))
    _prefer_as_oom_victim()
    redirect_output(log_path, config.log.level)

    def send(kind: str, payload: Any) -> None:
        writer.send_bytes(json.dumps([kind, payload]).encode())

    def progress(report: dict[str, Any]) -> None:
        send("progress", report)

    ctx = JobContext(job_id=job_id, config=config, basis_dir=basis_dir, basis_version=basis_version,
                     out_dir=out_dir, progress=progress)
    kind, payload = call_job(spec, params, ctx)
    send(kind, payload)
    if kind == "error":
        sys.exit(1)


def redirect_output(path: Path, level: str) -> None:
    """Send this process's stdout, stderr and logging to ``path`` (a job process serves one job only)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's stdout from now on)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's stderr from now on)
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def call_job(spec: str, params: dict[str, Any], ctx: JobContext) -> tuple[str, Any]:
    """Run job function ``spec`` ("module:function") in this process, logging it: ("result", a JSON-able
    dict) or ("error", one line). Shared by the spawned job processes and the Ray workers."""
    job_log = logging.getLogger("axis_stream.job")
    job_log.info("job %s: %s on basis version %s, params %s", ctx.job_id, spec, ctx.basis_version, json.dumps(params))
    try:
        module, _, name = spec.partition(":")
        result = getattr(importlib.import_module(module), name)(params, ctx)
        if not isinstance(result, dict):
            raise TypeError(f"{spec} returned {type(result).__name__}, expected a dict")
        encoded = json.loads(json.dumps(result))
    except AxisError as exc:     # bad input or data, said in one line: no traceback in the user's log
        job_log.error("job %s failed: %s", ctx.job_id, one_line(str(exc)))
        return "error", one_line(str(exc))
    except Exception as exc:
        job_log.exception("job %s failed", ctx.job_id)
        return "error", one_line(f"{type(exc).__name__}: {exc}")
    job_log.info("job %s: done: %s", ctx.job_id, json.dumps(encoded))
    return "result", encoded


def _exit_with_parent(parent_pid: int) -> None:
    """Kill this job's process group when the daemon dies, so no orphan keeps holding the GPU. The parent
    is the daemon (spawn) or the forkserver, which exits with the daemon: either way it changes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and _alive(parent_pid):
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="axis-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # alive, another user's
        return True
    return True


def _prefer_as_oom_victim() -> None:
    """Ask the kernel's OOM killer to pick this job before the daemon (best effort, Linux only)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")
