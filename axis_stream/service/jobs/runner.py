"""The job runner: queues jobs, starts them through APScheduler, supervises their processes, records each change."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from axis_stream.config import Config
from axis_stream.errors import AxisError, ConfigError
from axis_stream.service.api import one_line
from axis_stream.service.jobs import ray as ray_executor
from axis_stream.service.jobs.kinds import JOB_KINDS, NEEDS_BASIS, adapt_params
from axis_stream.service.jobs.process import _child_main
from axis_stream.service.jobs.records import (
    FINAL_STATES,
    NO_BASIS_ERROR,
    PROGRESS_INTERVAL_S,
    RESTART_ERROR,
    SHUTDOWN_ERROR,
    JobRecord,
    JobStore,
)
from axis_stream.text import printable

log = logging.getLogger(__name__)


def current_basis_version(basis_dir: Path) -> int | None:
    """The basis version a job starting now pins; None while nothing has been folded (no basis, or version 0)."""
    if not basis_dir.is_dir():
        return None
    from axis_stream.store.basis import CURRENT, Basis  # torch; the daemon has it loaded already

    if not (basis_dir / CURRENT).exists():
        return None
    basis = Basis.open(basis_dir)
    return basis.version if basis.count > 0 else None


# What the job processes' server imports once, so that each job forks with them loaded (``job_processes``).
JOB_PRELOAD = ["axis_stream.service.jobs.process", "open_clip", "torchvision.datasets"]


def job_processes(start_method: str = "forkserver") -> multiprocessing.context.BaseContext:
    """Where job processes come from. ``forkserver`` (the default): forked from one small server process,
    started with the runner, that imported torch, open_clip and the job code once (``JOB_PRELOAD``), so a
    job starts in a fraction of a second instead of importing them again (seconds; see PERFORMANCE.md,
    adapt_job_time.py); it touches no GPU, so each job still initialises CUDA itself. ``spawn``: a fresh
    interpreter per job. Either way a job is a process of its own, with its own memory."""
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(JOB_PRELOAD)
    return ctx


@dataclass
class _Run:
    """What the daemon holds for a running job: the request to stop it, and the moment it is done."""

    stop_reason: str | None = None           # "cancel" | "shutdown"
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class JobRunner:
    """Queues jobs, runs at most ``scheduler.gpu_slots`` at once in child processes, and records them.

    ``on_change(record)`` is called in the daemon process after every state change (queued, running,
    succeeded, failed, cancelled) and after progress updates (at most once a second per job).
    """

    def __init__(self, config: Config, basis_dir: Path, on_change: Callable[[JobRecord], None] | None = None,
                 kill_grace_s: float = 10.0, start_method: str = "forkserver"):
        self.config = config
        self.basis_dir = Path(basis_dir)
        self.jobs_dir = config.paths.jobs_dir
        self.on_change = on_change
        self.kill_grace_s = kill_grace_s
        self._cron = [(i, _cron_trigger(i, t.cron)) for i, t in enumerate(config.scheduler.triggers) if t.cron]
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._store = JobStore(config.paths.state_dir / "jobs.sqlite")
        self._lock = threading.Lock()
        self._running: dict[str, _Run] = {}
        self._stopping = False
        self._mp = job_processes(start_method)
        self._remote = ray_executor.RayJobs(config) if config.scheduler.executor == "ray" else None
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(config.scheduler.gpu_slots), "triggers": ThreadPoolExecutor(1)},
            job_defaults={"misfire_grace_time": None, "coalesce": False, "max_instances": 1},
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Fail jobs a dead daemon left running, start dispatching, re-queue what was queued, arm cron triggers."""
        for record in self._store.list(states=("running",)):
            if self._store.update(record.id, ("running",), state="failed", error=RESTART_ERROR,
                                  finished_at=time.time(), pid=None):
                log.warning("job %s: %s", record.id, RESTART_ERROR)
                self._changed(record.id)
        if self._mp.get_start_method() == "forkserver" and self._remote is None:
            # its imports (seconds) while nothing waits for them, not when the first job starts
            threading.Thread(target=multiprocessing.forkserver.ensure_running, name="axis-forkserver",
                             daemon=True).start()
        self._scheduler.start()
        for record in reversed(self._store.list(states=("queued",))):
            log.info("job %s: queued before the restart, dispatching again", record.id)
            self._dispatch(record)
        for index, trigger in self._cron:
            origin = f"cron:{self.config.scheduler.triggers[index].cron}"
            self._scheduler.add_job(self._fire_trigger, trigger, args=[index, origin], id=f"trigger-{index}",
                                    executor="triggers", misfire_grace_time=300, coalesce=True)

    def shutdown(self, wait: bool = True) -> None:
        """Stop dispatching (queued jobs stay queued for the next start) and stop running jobs.

        A running job is terminated (SIGTERM, SIGKILL after ``kill_grace_s``) and marked failed;
        with ``wait`` this returns once every one of them is recorded.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            runs = list(self._running.values())
        for run in runs:
            _request_stop(run, "shutdown")
        if self._scheduler.running:
            # APScheduler 3 marks itself stopped before taking its job-store lock, which races with a
            # dispatch pass in flight (JobLookupError in its thread): pause, and let remove_all_jobs
            # (which takes that lock) wait for the pass to finish first.
            self._scheduler.pause()
            self._scheduler.remove_all_jobs()
            self._scheduler.shutdown(wait=wait)      # waits for the workers: the stopped runs are recorded
        if wait:
            self._store.close()

    # -- requests ----------------------------------------------------------------------------

    def submit(self, kind: str, params: dict[str, Any], origin: str = "request") -> str:
        """Queue a job of ``kind`` with ``params`` (JSON-able); returns its id."""
        if kind not in JOB_KINDS:
            raise AxisError(f"unknown job kind {kind!r}; known: {', '.join(sorted(JOB_KINDS))}")
        if self._stopping:
            raise AxisError("the daemon is shutting down; no new jobs are accepted")
        limit = self.config.scheduler.max_queued_jobs
        if len(self._store.list(limit=limit, states=("queued",))) >= limit:
            raise AxisError(f"{limit} jobs are queued already (scheduler.max_queued_jobs); not queuing another "
                            "until some have run: `axis-stream jobs list`, `axis-stream jobs cancel ID`")
        now = time.time()
        record = self._store.insert(lambda job_id: JobRecord(
            id=job_id, kind=kind, target=str(params.get("target", "")), params=dict(params), state="queued",
            created_at=now, log_path=str(self.jobs_dir / job_id / "job.log"), origin=origin), now)
        log.info("job %s: queued %s %s (%s)", record.id, kind, printable(record.target), printable(origin))
        self._changed(record.id)
        self._dispatch(record)
        return record.id

    def get(self, job_id: str) -> JobRecord:
        record = self._store.get(job_id)
        if record is None:
            raise AxisError(f"no job {job_id!r}")
        return record

    def list(self, limit: int = 50) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        return self._store.list(limit=limit)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job, or stop a running one (its child process is gone when this returns)."""
        record = self.get(job_id)
        if record.state == "queued" and self._store.update(
                job_id, ("queued",), state="cancelled", error="cancelled before it started", finished_at=time.time()):
            log.info("job %s: cancelled while queued", job_id)
            with contextlib.suppress(JobLookupError):   # already handed to the worker pool, which skips it
                self._scheduler.remove_job(job_id)
            self._changed(job_id)
            return self.get(job_id)
        with self._lock:
            run = self._running.get(job_id)
        if run is None:
            record = self.get(job_id)
            if record.state in FINAL_STATES:
                raise AxisError(f"job {job_id} already {record.state}")
            return record
        _request_stop(run, "cancel")
        run.done.wait(self.kill_grace_s + 10.0)
        return self.get(job_id)

    def logs(self, job_id: str, tail: int = 200) -> str:
        """The last ``tail`` lines of the job's log ("" before it started)."""
        path = Path(self.get(job_id).log_path)
        try:
            with path.open("rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - (1 << 20)))
                data = fh.read()
        except FileNotFoundError:
            return ""
        lines = data.decode(errors="replace").splitlines(keepends=True)
        return "".join(lines[-tail:]) if tail > 0 else ""

    def log_chunk(self, job_id: str, offset: int, limit: int = 1 << 18) -> tuple[str, int]:
        """Log text from byte ``offset`` (whole lines where possible) and the offset to continue from."""
        path = Path(self.get(job_id).log_path)
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read(limit)
        except FileNotFoundError:
            return "", offset
        if len(data) == limit and b"\n" in data:
            data = data[: data.rindex(b"\n") + 1]
        return data.decode(errors="replace"), offset + len(data)

    def notify_fold(self, version: int) -> None:
        """Count a fold (basis ``version`` is now current) for the "every M folds" triggers; queue those due."""
        for index, trigger in enumerate(self.config.scheduler.triggers):
            if trigger.every_folds:
                folds = self._store.count_fold(f"{trigger.target}|every_folds={trigger.every_folds}")
                if folds % trigger.every_folds == 0:
                    self._fire_trigger(index, f"folds:{trigger.every_folds}@v{version}")

    # -- internals ---------------------------------------------------------------------------

    def _fire_trigger(self, index: int, origin: str) -> None:
        """Queue the adaptation of trigger ``index``, unless one for its target is still waiting to start."""
        target = self.config.scheduler.triggers[index].target
        waiting = [r.id for r in self._store.list(states=("queued",)) if r.kind == "adapt" and r.target == target]
        if waiting:
            log.info("trigger %s for %s: job %s is still queued, not queuing another", origin, printable(target),
                     waiting[0])
            return
        try:
            self.submit("adapt", adapt_params({"target": target}, self.config), origin=origin)
        except AxisError as exc:
            log.error("trigger %s for %s: %s", origin, printable(target), printable(exc))

    def _dispatch(self, record: JobRecord) -> None:
        """Hand a queued job to APScheduler; dispatching twice is harmless (only one run leaves "queued")."""
        if self._scheduler.running:
            self._scheduler.add_job(self._execute, args=[record.id], id=record.id,
                                    name=f"{record.kind} {record.target}", replace_existing=True)

    def _changed(self, job_id: str) -> None:
        if self.on_change is None:
            return
        record = self._store.get(job_id)
        try:
            self.on_change(record)
        except Exception:
            log.exception("job %s: on_change callback failed", job_id)

    def _execute(self, job_id: str) -> None:
        """Worker-pool entry: pin the basis, run the job's child process to the end, record the outcome."""
        if self._stopping:
            return                   # stays queued for the next start
        record = self._store.get(job_id)
        if record is None or record.state != "queued":
            return
        try:
            version = current_basis_version(self.basis_dir)
            if version is None and record.kind in NEEDS_BASIS:
                raise AxisError(NO_BASIS_ERROR)
        except Exception as exc:
            now = time.time()
            if self._store.update(job_id, ("queued",), state="failed", error=one_line(str(exc)),
                                  started_at=now, finished_at=now):
                log.error("job %s: %s", job_id, exc)
                self._changed(job_id)
            return
        run = _Run()
        with self._lock:
            if self._stopping or not self._store.update(job_id, ("queued",), state="running",
                                                        started_at=time.time(), basis_version=version):
                return
            self._running[job_id] = run
        try:
            log.info("job %s: running %s %s on basis version %s", job_id, record.kind, printable(record.target), version)
            self._changed(job_id)
            try:
                state, error, result = self._supervise(self._store.get(job_id), run)
            except Exception as exc:
                log.exception("job %s: supervising the job process failed", job_id)
                error = one_line(f"supervising the job failed: {type(exc).__name__}: {exc}")
                state, result = "failed", None
            # the log's closing line first: whoever sees the final state then finds a complete log
            _append_line(Path(record.log_path), f"axis-stream: job {job_id} {state}" + (f": {error}" if error else ""))
            self._store.update(job_id, ("running",), state=state, error=error, result=result,
                               finished_at=time.time(), pid=None)
            log.log(logging.ERROR if state == "failed" else logging.INFO, "job %s: %s%s", job_id, state,
                    f": {error}" if error else "")
            self._changed(job_id)
        finally:
            with self._lock:
                del self._running[job_id]
            run.done.set()

    def _supervise(self, record: JobRecord, run: _Run) -> tuple[str, str | None, dict | None]:
        """Start the child, relay its progress, stop it on request; returns (state, error, result)."""
        out_dir = self.jobs_dir / record.id
        out_dir.mkdir(parents=True, exist_ok=True)
        if self._remote is not None:
            return self._supervise_remote(record, run, out_dir)
        reader, writer = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(
            target=_child_main, name=f"axis-job-{record.id}",
            args=(JOB_KINDS[record.kind], record.params, record.id, self.config, self.basis_dir,
                  record.basis_version, out_dir, Path(record.log_path), writer, os.getpid(), dict(os.environ)))
        try:
            proc.start()
        except Exception as exc:
            reader.close()
            writer.close()
            return "failed", one_line(f"cannot start the job process: {exc}"), None
        writer.close()
        messages = _Messages(self, record.id)
        try:
            self._store.update(record.id, ("running",), pid=proc.pid)
            kill_at = None
            while True:
                ready = wait([proc.sentinel] + ([reader] if messages.open else []), timeout=0.2)
                if reader in ready:
                    messages.receive(reader)
                if run.stop.is_set() and kill_at is None:
                    _signal_group(proc.pid, signal.SIGTERM)
                    kill_at = time.monotonic() + self.kill_grace_s
                if kill_at is not None and time.monotonic() > kill_at:
                    _signal_group(proc.pid, signal.SIGKILL)
                if proc.sentinel in ready:
                    break
            while messages.open and reader.poll():
                messages.receive(reader)
        finally:
            _signal_group(proc.pid, signal.SIGKILL)      # leftovers (e.g. data-loader workers), or all of it on error
            proc.join()
            reader.close()
        messages.flush_progress()
        if messages.result is not None and proc.exitcode == 0:
            return "succeeded", None, messages.result
        if run.stop_reason == "cancel":
            return "cancelled", "cancelled while running", None
        if run.stop_reason == "shutdown":
            return "failed", SHUTDOWN_ERROR, None
        if messages.error:
            return "failed", messages.error, None
        if proc.exitcode is not None and proc.exitcode < 0:
            name = signal.Signals(-proc.exitcode).name
            hint = " (out of memory?)" if proc.exitcode == -signal.SIGKILL else ""
            return "failed", f"job process was killed by {name}{hint}", None
        return "failed", f"job process exited with code {proc.exitcode} without a result", None

    def _supervise_remote(self, record: JobRecord, run: _Run, out_dir: Path) -> tuple[str, str | None, dict | None]:
        """The same with the ``ray`` executor: the job runs as a Ray task (``ray_executor.RayJobs``)."""
        messages = _Messages(self, record.id)
        task = ray_executor.JobTask(JOB_KINDS[record.kind], record.params, record.id, self.config, self.basis_dir,
                                 record.basis_version, out_dir, Path(record.log_path))
        self._remote.run(task, run.stop, messages.handle,
                         on_pid=lambda pid: self._store.update(record.id, ("running",), pid=pid))
        messages.flush_progress()
        if messages.result is not None:
            return "succeeded", None, messages.result
        if run.stop_reason == "cancel":
            return "cancelled", "cancelled while running", None
        if run.stop_reason == "shutdown":
            return "failed", SHUTDOWN_ERROR, None
        return "failed", messages.error or "the Ray task ended without a result", None


class _Messages:
    """The daemon side of a job's pipe: progress (stored at most once a second), result, error."""

    def __init__(self, runner: JobRunner, job_id: str):
        self.runner, self.job_id = runner, job_id
        self.open = True
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self._progress: dict[str, Any] | None = None
        self._stored_at = 0.0
        self._dirty = False

    def receive(self, reader: Connection) -> None:
        try:
            kind, payload = json.loads(reader.recv_bytes())
        except (EOFError, OSError):
            self.open = False
            return
        self.handle(kind, payload)

    def handle(self, kind: str, payload: Any) -> None:
        if kind == "progress":
            self._progress, self._dirty = payload, True
            if time.monotonic() - self._stored_at >= PROGRESS_INTERVAL_S:
                self.flush_progress()
        elif kind == "result":
            self.result = payload
        elif kind == "error":
            self.error = payload

    def flush_progress(self) -> None:
        if self._dirty:
            self.runner._store.update(self.job_id, ("running",), progress=self._progress)
            self.runner._changed(self.job_id)
            self._stored_at, self._dirty = time.monotonic(), False


def _append_line(path: Path, line: str) -> None:
    """Close a job's log with its outcome, which a killed child cannot write itself."""
    try:
        with path.open("a") as fh:
            fh.write(f"{datetime.now().isoformat(sep=' ', timespec='seconds')} {line}\n")
    except OSError as exc:
        log.warning("%s: cannot append the job's outcome: %s", path, exc.strerror)


def _request_stop(run: _Run, reason: str) -> None:
    run.stop_reason = run.stop_reason or reason
    run.stop.set()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the job's process group (its child calls setsid first), or the child alone before it has."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _cron_trigger(index: int, expr: str) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(expr)
    except ValueError as exc:
        raise ConfigError(f"scheduler.triggers[{index}].cron: {expr!r} is not a crontab expression: {exc}") from None
