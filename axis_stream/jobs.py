"""Adaptation jobs: durable records in SQLite, dispatched by APScheduler, each run in its own child process.

The SQLite table ``<state_dir>/jobs.sqlite`` is the source of truth: APScheduler 3 forgets a one-shot
job once it is submitted and stores no results, so here it only decides when a queued job starts
(a thread pool of ``scheduler.gpu_slots`` workers) and fires the cron triggers. Each job runs in a
fresh ``spawn`` child (CUDA-safe) in its own process group, so a crash, an out-of-memory kill or a
cancel cannot take the daemon down. Times in records are UNIX seconds (floats).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterator

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from axis_stream import api, executors
from axis_stream.api import RequestError, arg, one_line
from axis_stream.atomic import atomic_write_json
from axis_stream.config import Config
from axis_stream.errors import AxisError, ConfigError

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
    "adapt": "axis_stream.adapt:run_adapt",
    "selftest": "axis_stream.jobs:run_selftest",
}
NEEDS_BASIS = frozenset({"adapt"})
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
RESTART_ERROR = "daemon restarted while the job was running"
SHUTDOWN_ERROR = "daemon shut down while the job was running"
NO_BASIS_ERROR = "no basis yet: fold at least one checkpoint first"
PROGRESS_INTERVAL_S = 1.0        # progress reaches SQLite and on_change at most this often per job


@dataclass
class JobRecord:
    """One job as stored in SQLite. Times are UNIX seconds; ``basis_version`` is pinned when it starts."""

    id: str
    kind: str
    target: str
    params: dict[str, Any]
    state: str                               # queued | running | succeeded | failed | cancelled
    created_at: float
    log_path: str                            # <state_dir>/jobs/<id>/job.log: the child's stdout, stderr, logging
    origin: str = "request"                  # request | cron:<expr> | folds:<M>
    basis_version: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None                 # one line, for failed and cancelled jobs
    progress: dict[str, Any] | None = None   # the last progress report of the job function
    pid: int | None = None                   # the job's child process while it runs

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (what the control API returns)."""
        return dataclasses.asdict(self)


_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
_JSON_FIELDS = frozenset({"params", "result", "progress"})


class JobStore:
    """The jobs table in SQLite (WAL, one connection behind a lock); crash safety is SQLite's transactions."""

    SCHEMA_VERSION = 1

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > self.SCHEMA_VERSION:
                raise AxisError(f"{self.path}: jobs schema version {version} is newer than this axis-stream "
                                f"supports ({self.SCHEMA_VERSION})")
            if version == 0:
                self._create()
        except sqlite3.DatabaseError as exc:
            raise AxisError(f"{self.path}: not a usable jobs database: {exc}") from None

    def _create(self) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("""CREATE TABLE jobs (
                id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, params TEXT NOT NULL,
                state TEXT NOT NULL, created_at REAL NOT NULL, log_path TEXT NOT NULL, origin TEXT NOT NULL,
                basis_version INTEGER, started_at REAL, finished_at REAL, result TEXT, error TEXT,
                progress TEXT, pid INTEGER)""")
            self._db.execute("CREATE INDEX jobs_state ON jobs (state, created_at)")
            self._db.execute("CREATE TABLE fold_counts (trigger TEXT PRIMARY KEY, folds INTEGER NOT NULL)")
            self._db.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, make: Callable[[str], JobRecord], stamp: float) -> JobRecord:
        """Insert ``make(id)`` under a new id: "j" + UTC time + a counter, sortable and unique."""
        prefix = "j" + time.strftime("%y%m%d-%H%M%S", time.gmtime(stamp))
        with self._lock:
            for n in range(10_000):
                record = make(f"{prefix}-{n:02d}")
                try:
                    self._db.execute(f"INSERT INTO jobs ({', '.join(_FIELDS)}) VALUES ({_marks(len(_FIELDS))})",
                                     [_encode(f, getattr(record, f)) for f in _FIELDS])
                    return record
                except sqlite3.IntegrityError:
                    continue
        raise AxisError(f"{self.path}: no free job id for {prefix}")

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _decode(row) if row else None

    def list(self, limit: int | None = None, states: tuple[str, ...] = STATES) -> list[JobRecord]:
        """Jobs in ``states``, newest first."""
        sql = (f"SELECT {', '.join(_FIELDS)} FROM jobs WHERE state IN ({_marks(len(states))}) "
               "ORDER BY created_at DESC, id DESC LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, (*states, -1 if limit is None else limit)).fetchall()
        return [_decode(row) for row in rows]

    def update(self, job_id: str, from_states: tuple[str, ...] = STATES, **fields: Any) -> bool:
        """Set ``fields`` of a job if it is in one of ``from_states``; False when it was not (a lost race)."""
        sets = ", ".join(f"{name} = ?" for name in fields)
        values = [_encode(name, value) for name, value in fields.items()]
        with self._lock:
            cur = self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND state IN ({_marks(len(from_states))})",
                                   (*values, job_id, *from_states))
        return cur.rowcount == 1

    def count_fold(self, trigger: str) -> int:
        """Add one fold to ``trigger``'s persistent count and return the new count."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO fold_counts VALUES (?, 1) "
                             "ON CONFLICT (trigger) DO UPDATE SET folds = folds + 1", (trigger,))
            return self._db.execute("SELECT folds FROM fold_counts WHERE trigger = ?", (trigger,)).fetchone()[0]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _encode(name: str, value: Any) -> Any:
    return json.dumps(value) if name in _JSON_FIELDS and value is not None else value


def _decode(row: tuple) -> JobRecord:
    values = {name: json.loads(v) if name in _JSON_FIELDS and v is not None else v for name, v in zip(_FIELDS, row)}
    return JobRecord(**values)


def current_basis_version(basis_dir: Path) -> int | None:
    """The basis version a job starting now pins; None while nothing has been folded (no basis, or version 0)."""
    if not basis_dir.is_dir():
        return None
    from axis_stream.basis import CURRENT, Basis      # torch; the daemon has it loaded already

    if not (basis_dir / CURRENT).exists():
        return None
    manifest = Basis.open(basis_dir).manifest
    return manifest["version"] if manifest["count"] > 0 else None


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
                 kill_grace_s: float = 10.0):
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
        self._mp = multiprocessing.get_context("spawn")
        self._remote = executors.RayJobs(config) if config.scheduler.executor == "ray" else None
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
        now = time.time()
        record = self._store.insert(lambda job_id: JobRecord(
            id=job_id, kind=kind, target=str(params.get("target", "")), params=dict(params), state="queued",
            created_at=now, log_path=str(self.jobs_dir / job_id / "job.log"), origin=origin), now)
        log.info("job %s: queued %s %s (%s)", record.id, kind, record.target, origin)
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
            try:
                self._scheduler.remove_job(job_id)
            except JobLookupError:
                pass                 # already handed to the worker pool, which skips it
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
            log.info("trigger %s for %s: job %s is still queued, not queuing another", origin, target, waiting[0])
            return
        try:
            self.submit("adapt", adapt_params({"target": target}, self.config), origin=origin)
        except AxisError as exc:
            log.error("trigger %s for %s: %s", origin, target, exc)

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
            log.info("job %s: running %s %s on basis version %s", job_id, record.kind, record.target, version)
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
                  record.basis_version, out_dir, Path(record.log_path), writer, os.getpid()))
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
        """The same with the ``ray`` executor: the job runs as a Ray task (``executors.RayJobs``)."""
        messages = _Messages(self, record.id)
        task = executors.JobTask(JOB_KINDS[record.kind], record.params, record.id, self.config, self.basis_dir,
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
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _cron_trigger(index: int, expr: str) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(expr)
    except ValueError as exc:
        raise ConfigError(f"scheduler.triggers[{index}].cron: {expr!r} is not a crontab expression: {exc}") from None


# -- the child process -----------------------------------------------------------------------------

def _child_main(spec: str, params: dict[str, Any], job_id: str, config: Config, basis_dir: Path,
                basis_version: int | None, out_dir: Path, log_path: Path, writer: Connection, parent_pid: int) -> None:
    """Run one job function in this fresh process, logging to its job.log and reporting over ``writer``."""
    os.setsid()                              # own process group: cancel reaches grandchildren too
    _exit_with_parent(parent_pid)
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
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
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
    except Exception as exc:
        job_log.exception("job %s failed", ctx.job_id)
        return "error", one_line(str(exc) if isinstance(exc, AxisError) else f"{type(exc).__name__}: {exc}")
    job_log.info("job %s: done: %s", ctx.job_id, json.dumps(encoded))
    return "result", encoded


def _exit_with_parent(parent_pid: int) -> None:
    """Kill this job's process group when the daemon dies, so no orphan keeps holding the GPU."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="axis-parent-watch", daemon=True).start()


def _prefer_as_oom_victim() -> None:
    """Ask the kernel's OOM killer to pick this job before the daemon (best effort, Linux only)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


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


# -- control-API handlers --------------------------------------------------------------------------

def adapt_params(args: dict[str, Any], config: Config) -> dict[str, Any]:
    """An adapt job's parameters, checked now by Stage 2's own rules so that a bad one fails the request,
    not the job; settings not given come from the config's ``[adapt]`` section when the job runs."""
    from axis_stream.adapt.recipe import job_settings      # torch; the daemon has it loaded already

    params = {name: value for name, value in args.items() if value is not None}
    job_settings(params, config)
    return params


def handlers(runner: JobRunner) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """The control-API ops served by the job runner: adapt, jobs.list, jobs.show, jobs.cancel, jobs.logs."""

    def adapt(args: dict[str, Any]) -> dict[str, Any]:
        return runner.get(runner.submit("adapt", adapt_params(args, runner.config))).to_dict()

    def jobs_list(args: dict[str, Any]) -> dict[str, Any]:
        limit = arg(args, "limit", int, 50)
        if not 1 <= limit <= 10_000:
            raise RequestError(f"limit must be between 1 and 10000, got {limit}")
        return {"jobs": [r.to_dict() for r in runner.list(limit=limit)]}

    def jobs_show(args: dict[str, Any]) -> dict[str, Any]:
        return runner.get(arg(args, "id", str)).to_dict()

    def jobs_cancel(args: dict[str, Any]) -> dict[str, Any]:
        return runner.cancel(arg(args, "id", str)).to_dict()

    def jobs_logs(args: dict[str, Any]) -> dict[str, Any]:
        """``tail`` lines, or with ``offset`` the text from that byte on (for following)."""
        job_id, offset = arg(args, "id", str), arg(args, "offset", int, None)
        state = runner.get(job_id).state
        if offset is None:
            return {"id": job_id, "state": state, "text": runner.logs(job_id, tail=arg(args, "tail", int, 200))}
        if offset < 0:
            raise RequestError(f"offset must be >= 0, got {offset}")
        text, offset = runner.log_chunk(job_id, offset)
        return {"id": job_id, "state": state, "text": text, "offset": offset}

    return {"adapt": adapt, "jobs.list": jobs_list, "jobs.show": jobs_show, "jobs.cancel": jobs_cancel,
            "jobs.logs": jobs_logs}


# -- the client side: what the CLI shows of jobs -----------------------------------------------------

def watch_job(socket_path: Path, job_id: str, interval_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """Yield job ``job_id`` (as the daemon returns it) each time its state or progress changes, until it ends."""
    seen = None
    while True:
        record = api.request(socket_path, "jobs.show", id=job_id)
        if (record["state"], record["progress"]) != seen:
            seen = (record["state"], record["progress"])
            yield record
        if record["state"] in FINAL_STATES:
            return
        time.sleep(interval_s)


def follow_log(socket_path: Path, job_id: str, interval_s: float = 0.5) -> Iterator[str]:
    """Yield the job's log text as it grows, from the start, until the job has ended and all is read."""
    offset = 0
    while True:
        reply = api.request(socket_path, "jobs.logs", id=job_id, offset=offset)
        offset = reply["offset"]
        if reply["text"]:
            yield reply["text"]
        elif reply["state"] in FINAL_STATES:
            return
        else:
            time.sleep(interval_s)


def progress_line(progress: dict[str, Any] | None) -> str:
    """``{"epoch": 2, "step": 40, "of": 100, "loss": 0.31}`` -> ``"epoch 2  step 40/100  loss 0.31"``."""
    if not progress:
        return ""
    parts = []
    for key, value in progress.items():
        if key == "of":
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        if key == "step" and "of" in progress:
            text += f"/{progress['of']}"
        parts.append(f"{key} {text}")
    return "  ".join(parts)


def update_line(record: dict[str, Any]) -> str:
    """One line per change while waiting on a job: its state, and what it reports while running."""
    if record["state"] != "running":
        return record["state"]
    if record["progress"]:
        return f"running  {progress_line(record['progress'])}"
    version = record["basis_version"]
    return "running" + ("" if version is None else f" on basis version {version}")


def describe(record: dict[str, Any]) -> list[str]:
    """A job as "key: value" lines for ``jobs show`` (times local, ISO 8601)."""
    lines = [f"{key}: {record[key]}" for key in ("id", "kind", "target", "state", "origin") if record.get(key) != ""]
    lines.append(f"basis version: {'-' if record['basis_version'] is None else record['basis_version']}")
    for key in ("created_at", "started_at", "finished_at"):
        lines.append(f"{key.replace('_at', '')}: {_when(record[key])}")
    if record["started_at"]:
        lines.append(f"duration: {_duration(record)}")
    lines.append("params: " + ", ".join(f"{k}={v}" for k, v in record["params"].items()))
    if record["progress"]:
        lines.append(f"progress: {progress_line(record['progress'])}")
    if record["error"]:
        lines.append(f"error: {record['error']}")
    if record["result"] is not None:
        lines.append("result:")
        lines.extend(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in record["result"].items())
    lines.append(f"log: {record['log_path']}")
    return lines


def table(records: list[dict[str, Any]]) -> list[str]:
    """Jobs as aligned rows for ``jobs list``, newest first."""
    rows = [("ID", "STATE", "KIND", "TARGET", "BASIS", "CREATED", "DURATION", "NOTE")]
    for r in records:
        note = _summary(r["result"]) if r["state"] == "succeeded" else (r["error"] or progress_line(r["progress"]))
        rows.append((r["id"], r["state"], r["kind"], r["target"] or "-",
                     "-" if r["basis_version"] is None else f"v{r['basis_version']}", _when(r["created_at"]),
                     _duration(r) if r["started_at"] else "-", note or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip() for row in rows]


def _summary(result: dict[str, Any] | None) -> str:
    keys = [k for k in ("val_accuracy", "test_accuracy") if k in (result or {})]
    return "  ".join(f"{k} {result[k]:.4f}" for k in keys)


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")


def _duration(record: dict[str, Any]) -> str:
    seconds = int((record["finished_at"] or time.time()) - record["started_at"])
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
