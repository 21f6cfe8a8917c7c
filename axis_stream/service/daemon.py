"""``axis-stream serve``: the watched folder, one fold queue, jobs, the control socket and metrics.

Wiring only; the numerics live in ``stage1`` and every byte of the basis in ``basis``/``ingest``.
Files that arrive (``watcher``) go into a FIFO; one writer thread (the main thread) folds them one
at a time into the basis, so two checkpoints never fold into the same basis at once, and only
after the new version is durable discards the file (delete, or move to the archive). Rejected
files go to the quarantine with a ``<name>.reason`` file. Shutdown on SIGTERM/SIGINT lets the fold
in progress finish and starts no new one; a second signal abandons it (basis writes are atomic, so
the basis keeps its previous version and the file stays in the folder for the next start).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from axis_stream import __version__, errors
from axis_stream.config import Config
from axis_stream.service import api, notify
from axis_stream.service.api import one_line
from axis_stream.service.foldworker import (  # noqa: F401  (re-exported: the daemon's names before the split)
    REJECT_REASONS,
    FoldWorker,
    Outcome,
    default_memory_budget,
    fold_threads,
    free_name,
    move_into,
    remove,
)
from axis_stream.service.jobs.control import handlers
from axis_stream.service.jobs.runner import JobRunner
from axis_stream.service.metrics import Metrics, MetricsServer, start_scale_of
from axis_stream.service.watcher import Watcher
from axis_stream.store.models import load_base
from axis_stream.store.rollback import rollback
from axis_stream.store.statelock import StateLock, lock_state
from axis_stream.text import printable

log = logging.getLogger("axis_stream.service.daemon")

class FoldAbandoned(BaseException):
    """Raised into the writer thread by a second stop signal: give up the fold in progress."""


class FoldQueue:
    """FIFO of arrived files. A path is held from ``put`` until ``done``, and queued once meanwhile."""

    def __init__(self) -> None:
        self._items: deque[Path] = deque()
        self._held: set[Path] = set()
        self._cond = threading.Condition()

    def put(self, path: Path) -> bool:
        """Queue ``path`` unless it is already queued or being folded; True when it was queued."""
        with self._cond:
            if path in self._held:
                return False
            self._held.add(path)
            self._items.append(path)
            self._cond.notify()
            return True

    def get(self, timeout: float) -> Path | None:
        """The oldest queued path (still held until ``done``), or None after ``timeout`` seconds."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def peek(self) -> Path | None:
        """The oldest queued path, left queued (the fold worker hashes it ahead)."""
        with self._cond:
            return self._items[0] if self._items else None

    def done(self, path: Path) -> None:
        with self._cond:
            self._held.discard(path)

    def __contains__(self, path: object) -> bool:
        with self._cond:
            return path in self._held

    def __len__(self) -> int:
        """Files waiting for their turn (not counting the one being folded)."""
        with self._cond:
            return len(self._items)


class Daemon:
    """One serve process. ``start()``, then ``run()`` in the thread that folds, ``request_stop()`` from anywhere, ``close()``."""

    def __init__(self, config: Config, env: Mapping[str, str] | None = None):
        self.config = config
        self.env = os.environ if env is None else env
        self.metrics = Metrics(REJECT_REASONS, state_dir=config.paths.state_dir)
        self.queue = FoldQueue()
        self.watchdog = notify.Watchdog(self.env)
        self.started_at = time.time()
        self.ready = False
        self.current: str | None = None
        self.last: Outcome | None = None
        self.last_error: str | None = None
        self.counts = {"folded": 0, "rejected": 0, "error": 0, "already_folded": 0, "vanished": 0, "waiting": 0}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._tick = min(1.0, self.watchdog.interval or 1.0)
        self.worker: FoldWorker | None = None
        self.watcher: Watcher | None = None
        self.jobs: Any = None
        self._servers: list[Any] = []
        self._state_lock: StateLock | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to READY=1: the state-folder lock (first: a second daemon must change nothing),
        folders, base model, basis, metrics, jobs, control socket, watcher."""
        p, w = self.config.paths, self.config.watch
        self._state_lock = lock_state(p.state_dir, "serve", hint="stop it first, or give this one another state_dir")
        for folder in (p.state_dir, p.watch_dir, p.quarantine) + ((p.archive,) if w.discard == "archive" else ()):
            folder.mkdir(parents=True, exist_ok=True)
        if self.config.metrics.address:
            self._servers.append(MetricsServer(self.config.metrics.address, self.metrics, lambda: self.ready).start())
        weights = "transformers" if self.config.base.kind == "transformers" else (self.config.base.pretrained
                                                                                   or "random init")
        log.info("axis-stream %s starting: base %s (%s), watching %s", __version__, self.config.base.model,
                 weights, p.watch_dir)
        try:
            base, identity = load_base(self.config)
        except (OSError, RuntimeError, ValueError) as exc:
            raise errors.ConfigError(f"base: cannot build {self.config.base.model} with weights "
                                     f"{self.config.base.pretrained or '(random init)'}: {one_line(str(exc))}") from None
        self.worker = FoldWorker(self.config, base, identity, self.metrics, progress=self.watchdog.ping,
                                 wait_incomplete=True, fold_workers=fold_threads(w),
                                 memory_budget=default_memory_budget())
        self.metrics.basis_state(*self.worker.basis_stats())
        self._start_jobs()
        self.metrics.queue_depth.set_function(lambda: len(self.queue))
        self.watcher = Watcher(p.watch_dir, self.arrived, observer=w.observer, poll_interval_s=w.poll_interval_s,
                               stable_interval_s=w.stable_interval_s, rescan_interval_s=w.rescan_interval_s,
                               incomplete_timeout_s=w.incomplete_timeout_s, is_pending=lambda path: path in self.queue)
        self.metrics.waiting.set_function(lambda: len(self.waiting()))
        self.watcher.start()
        self.ready = True
        version, sources, _ = self.worker.basis_stats()
        log.info("ready: basis v%d with %d sources, %s observer on %s", version, sources,
                 self.watcher.observer_name, p.watch_dir)
        notify.send(f"READY=1\nSTATUS=basis v{version}, {sources} sources, watching {p.watch_dir}", self.env)

    def _start_jobs(self) -> None:
        self.jobs = JobRunner(self.config, self.config.paths.basis_dir, on_change=self._job_changed)
        self.jobs.start()
        self._count_jobs()
        control = api.ControlServer(self.config.paths.socket, {**handlers(self.jobs), **self.handlers()})
        control.start()
        self._servers.append(control)

    def run(self) -> None:
        """The writer loop: fold queued files in arrival order until a stop is requested."""
        while not self._stop.is_set():
            self.watchdog.ping()
            path = self.queue.get(self._tick)
            if path is None:
                continue
            if self._stop.is_set():          # arrived during the wait; it stays in the folder
                self.queue.done(path)
                break
            try:
                self._fold_one(path)
            except FoldAbandoned:
                log.warning("abandoned the fold of %s: the basis keeps its last version and the file "
                            "stays in %s for the next start", printable(path.name), self.config.paths.watch_dir)
                break
            except Exception:           # a bug here must not stop the queue; the file is retried later
                log.exception("processing %s failed", printable(path.name))
            finally:
                self.queue.done(path)

    def _fold_one(self, path: Path) -> None:
        with self._lock:
            self.current = path.name
        try:
            self.worker.prefetch(self.queue.peek())   # the next file is read and hashed during this fold
            outcome = self.worker.process(path)
        finally:
            with self._lock:
                self.current = None
        with self._lock:
            self.last = outcome
            self.counts[outcome.result] += 1
            if outcome.result in ("rejected", "error"):
                self.last_error = f"{outcome.file}: {outcome.message}"
        if outcome.result == "folded" and self.jobs is not None:
            self.jobs.notify_fold(outcome.version)

    def arrived(self, path: Path) -> None:
        """The watcher's callback: a complete file is in the folder."""
        if not self._stop.is_set() and self.queue.put(path):
            log.debug("arrived: %s (queue depth %d)", printable(path.name), len(self.queue))

    def request_stop(self, why: str = "stop requested") -> None:
        """Stop taking files; the fold in progress finishes. Safe from a signal handler."""
        if not self._stop.is_set():
            self._stop.set()
            notify.send("STOPPING=1", self.env)
            log.info("%s: stopping after the fold in progress", why)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def busy(self) -> bool:
        return self.current is not None

    def close(self) -> None:
        """Stop the watcher, the jobs and the servers, then release the state-folder lock (idempotent)."""
        self._stop.set()
        self.ready = False
        if self._state_lock is None:     # never started (or already closed): nothing of ours to stop
            return
        if self.watcher is not None:
            self.watcher.stop()
        if self.jobs is not None:
            self.jobs.shutdown(wait=True)
            self.jobs = None
        for server in reversed(self._servers):
            server.stop()
        self._servers.clear()
        log.info("stopped; %d file(s) left in the queue stay in %s", len(self.queue), self.config.paths.watch_dir)
        self._state_lock.release()
        self._state_lock = None

    # -- jobs metrics and the control API -------------------------------------------------------

    def _count_jobs(self) -> None:
        """Set the jobs-by-state gauge from the job store (the newest 10,000 records)."""
        counts: dict[str, int] = {}
        for r in self.jobs.list(limit=10_000) if self.jobs is not None else []:
            counts[r.state] = counts.get(r.state, 0) + 1
        self.metrics.job_states(counts)

    def _job_changed(self, record: Any) -> None:
        """The job runner's ``on_change``: job metrics, in the daemon process."""
        self._count_jobs()
        if record.state in ("succeeded", "failed", "cancelled") and record.finished_at:
            seconds = record.finished_at - record.started_at if record.started_at else None
            result = record.result or {}
            done = record.state == "succeeded"
            self.metrics.job_finished(seconds, target_label(record.target), result.get("test_accuracy") if done else None,
                                      start_scale=start_scale_of(result) if done else None)

    def status(self) -> dict[str, Any]:
        """What ``axis-stream status`` shows."""
        version, sources, nbytes = self.worker.basis_stats() if self.worker else (0, 0, 0)
        with self._lock:
            return {
                "pid": os.getpid(), "version": __version__, "ready": self.ready, "stopping": self.stopping,
                "started_at": self.started_at, "uptime_s": time.time() - self.started_at,
                "watch_dir": str(self.config.paths.watch_dir),
                "observer": self.watcher.observer_name if self.watcher else None,
                "basis": {"version": version, "sources": sources, "bytes": nbytes,
                          "versions": self.worker.basis.versions() if self.worker and self.worker.basis else []},
                "queue": {"depth": len(self.queue), "current": self.current,   # progress: [matrices folded, of]
                          "progress": self.worker.fold_progress if self.worker else None},
                "waiting": self.waiting(),
                "folds": dict(self.counts),
                "last": asdict(self.last) if self.last else None,
                "last_error": self.last_error,
            }

    def waiting(self) -> dict[str, dict[str, Any]]:
        """Entries left in the folder because they are incomplete (a short file, a folder lacking
        weights), by name: seconds unchanged and the cause; quarantined after watch.incomplete_timeout_s."""
        out = dict(self.watcher.waiting()) if self.watcher else {}
        for name, seconds in (self.worker.waiting() if self.worker else {}).items():
            out[name] = {"seconds": seconds, "cause": "shorter than its header says (still being written?)"}
        return out

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """The daemon's own control-API ops, merged with the job runner's."""
        def basis_history(args: dict[str, Any]) -> dict[str, Any]:
            basis = self.worker.basis if self.worker else None
            if basis is None:
                return {"version": 0, "count": 0, "ledger": []}
            records = basis.ledger(offset=int(args.get("offset", 0)), limit=args.get("limit"))
            return {"version": basis.version, "count": basis.count, "ledger": [r.to_json() for r in records]}

        def basis_rollback(args: dict[str, Any]) -> dict[str, Any]:
            """Under the basis lock, as a fold: a fold in progress finishes first (the lock waits for it)."""
            version = api.arg(args, "version", int)
            if self.worker is None or self.worker.basis is None:
                raise errors.BasisError(f"{self.config.paths.basis_dir}: no basis yet (nothing folded): "
                                        "nothing to roll back")
            report = rollback(self.worker.basis, version)
            if report["version"] == report["previous"]:
                return report
            self.metrics.basis_state(*self.worker.basis_stats())
            log.info("basis rollback: version %d holds version %d's basis; %d source(s) left the ledger%s",
                     report["version"], version, len(report["removed"]),
                     "".join(f", {printable(r['file'])}" for r in report["removed"][:20]))
            return report

        return {"status": lambda args: self.status(), "basis.history": basis_history,
                "basis.rollback": basis_rollback}


def target_label(target: str) -> str:
    """A short metric label for a target: its name, or the folder name of an ``imagefolder:PATH``."""
    return Path(target.split(":", 1)[1]).name if target.startswith("imagefolder:") else target


def setup_logging(config: Config, stderr: bool = True) -> None:
    """One line per event on stderr (the journal under systemd), and in ``paths.log_file`` if set."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)] if stderr else []
    if config.paths.log_file is not None:
        config.paths.log_file.parent.mkdir(parents=True, exist_ok=True)
        # (names are escaped by text.printable; backslashreplace so that nothing missed loses a line)
        handlers.append(logging.FileHandler(config.paths.log_file, encoding="utf-8", errors="backslashreplace"))
    logging.basicConfig(level=config.log.level.upper(), handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(config: Config) -> int:
    """Run the daemon in this process until SIGTERM/SIGINT; returns the exit status."""
    os.umask(0o027)     # chosen, not inherited: what it creates is the owner's and the service group's only
    setup_logging(config)
    daemon = Daemon(config)

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not daemon.stopping:
            daemon.request_stop(name)
        elif daemon.busy:
            raise FoldAbandoned(name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.start()
        daemon.run()
    finally:
        daemon.close()
    return 0
