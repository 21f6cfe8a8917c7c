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

import errno
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from axis_stream import __version__, errors
from axis_stream.config import Config
from axis_stream.service import api, notify
from axis_stream.service.api import one_line
from axis_stream.service.jobs.control import handlers
from axis_stream.service.jobs.runner import JobRunner
from axis_stream.service.metrics import Metrics, MetricsServer
from axis_stream.service.watcher import Watcher
from axis_stream.store import readers
from axis_stream.store.atomic import atomic_write_bytes, fsync_dir, fsync_file
from axis_stream.store.basis import CURRENT, Basis
from axis_stream.store.models import load_base
from axis_stream.store.records import FoldRecord
from axis_stream.store.statelock import StateLock, lock_state

log = logging.getLogger("axis_stream.service.daemon")

REJECT_REASONS = sorted({cls.reason for cls in vars(errors).values()
                         if isinstance(cls, type) and issubclass(cls, errors.CheckpointError)}
                        | {"internal_error"})


class FoldAbandoned(BaseException):
    """Raised into the writer thread by a second stop signal: give up the fold in progress."""


@dataclass
class Outcome:
    """What processing one file did. ``result``: folded, rejected (quarantined), error (internal:
    quarantined; environment: left in place for a retry), already_folded (a restart found a file
    whose fold was durable but whose discard was not), vanished (gone before its turn)."""

    file: str
    result: str
    message: str
    reason: str | None = None
    version: int | None = None
    seconds: float = 0.0


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


class FoldWorker:
    """Folds one file into the basis, then discards it (folded) or quarantines it (rejected).

    The basis is created at the first fold, so "no basis yet" means nothing was folded yet.
    ``fold_workers`` matrices fold at once within ``memory_budget`` bytes (the same basis); ``keep``
    leaves folded files in place and ``quarantine=False`` rejected ones (``axis-stream backfill``).
    """

    def __init__(self, config: Config, base_state: Mapping[str, torch.Tensor], identity: Mapping[str, str],
                 metrics: Metrics | None = None, progress: Callable[[], None] = lambda: None, *,
                 fold_workers: int = 1, memory_budget: float = math.inf, keep: bool = False,
                 quarantine: bool = True):
        self.fold_workers, self.memory_budget = fold_workers, memory_budget
        self.keep, self.quarantine = keep, quarantine
        self.config = config
        self.paths = config.paths
        self.base_state = base_state
        self.identity = dict(identity)
        self.metrics = metrics
        self._progress = progress
        self.basis: Basis | None = None
        if (self.paths.basis_dir / CURRENT).exists():
            self.basis = Basis.open(self.paths.basis_dir, base_state, settings=config.basis)

    def process(self, path: Path) -> Outcome:
        """Fold ``path``, then discard it (folded) or quarantine it (rejected); never raises for a bad file.

        A symlink is quarantined unread (the link moves, its target is untouched). A file replaced under
        the same name while it was folded is not discarded: the new file is folded at the next rescan."""
        if path.is_symlink():
            return self._reject(path, errors.Symlink.reason, "a symbolic link, not followed: move or copy the "
                                "checkpoint itself into the folder")
        if not (path.is_file() or path.is_dir()):
            return self._report(Outcome(path.name, "vanished", "gone before its turn"))
        identity = readers.checkpoint_identity(path)
        t0 = time.monotonic()
        try:
            record = self._fold(path)
        except errors.Duplicate as exc:
            if self._folded_before_restart(path):
                self._discard(path)
                return self._report(Outcome(path.name, "already_folded", "in the ledger under this name already"
                                            if self.keep else "its fold was durable before a restart, only "
                                            "the discard was missing; discarded now"))
            return self._reject(path, exc.reason, exc.message)
        except errors.CheckpointError as exc:
            return self._reject(path, exc.reason, exc.message)
        except (OSError, errors.BasisError, errors.SourceChanged) as exc:
            # Not the file's fault (disk full, permissions, a broken basis, a writer not done): keep it for a retry.
            if self.metrics:
                self.metrics.fold_failed()
            return self._report(Outcome(path.name, "error", f"left in place for a retry: {exc}"))
        except Exception as exc:
            log.error("internal error folding %s:\n%s", path.name, traceback.format_exc().rstrip())
            return self._reject(path, "internal_error", f"{type(exc).__name__}: {exc}", internal=True)
        seconds = time.monotonic() - t0
        now = readers.checkpoint_identity(path)
        replaced = now is not None and now != identity
        if not replaced:
            self._discard(path)
        if self.metrics:
            # a dense strategy keeps no components: the gauge says "not defined" (NaN), which no alert reads as low
            self.metrics.fold_succeeded(seconds, math.nan if record.dense else float(record.energy_kept), time.time())
            self.metrics.basis_state(*self.basis_stats())
        kept = "dense state" if record.dense else f"energy kept {float(record.energy_kept):.1%}"
        return self._report(Outcome(path.name, "folded", f"into v{record.version} in {seconds:.2f} s ({kept})"
                                    + ("; it was replaced during the fold: the new file stays for the next "
                                       "rescan" if replaced else ""), version=record.version, seconds=seconds))

    def basis_stats(self) -> tuple[int, int, int]:
        """(version, sources folded, bytes on disk) of the current basis; zeros before the first fold."""
        if self.basis is None:
            return 0, 0, 0
        return self.basis.version, self.basis.count, self.basis.nbytes()

    def _fold(self, path: Path) -> FoldRecord:
        if self.basis is None:
            self.basis = Basis.create(self.paths.basis_dir, self.base_state, self.config.basis, self.identity)
        return self.basis.fold_checkpoint(path, progress=lambda *a, **k: self._progress(),
                                          workers=self.fold_workers, memory_budget=self.memory_budget)

    def _folded_before_restart(self, path: Path) -> bool:
        """Decided with the ledger: the same bytes under the same name are already folded."""
        record = self.basis.has_source(readers.checkpoint_sha256(path))
        return record is not None and record.file == path.name

    def _reject(self, path: Path, reason: str, message: str, internal: bool = False) -> Outcome:
        try:
            if self._quarantine(path, reason, message) is None:
                return self._report(Outcome(path.name, "vanished", "gone before it could be quarantined"))
        except OSError as exc:
            if self.metrics:
                self.metrics.fold_failed()
            return self._report(Outcome(path.name, "error", f"rejected ({reason}: {message}) but could not be "
                                        f"quarantined, left in place: {exc}", reason=reason))
        if self.metrics:
            self.metrics.fold_rejected(reason, internal=internal)
        return self._report(Outcome(path.name, "error" if internal else "rejected", message, reason=reason))

    def _quarantine(self, path: Path, reason: str, message: str) -> Path | None:
        """Move ``path`` into the quarantine with ``<name>.reason`` beside it (reason file first); with
        ``quarantine`` off, leave it. None when it is gone."""
        if not self.quarantine:
            return path if path.exists() else None
        folder = self.paths.quarantine
        folder.mkdir(parents=True, exist_ok=True)
        dest = free_name(folder, path.name)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        note = dest.with_name(dest.name + ".reason")
        atomic_write_bytes(note, f"{one_line(message)} [reason={reason}] [time={stamp}]\n".encode())
        try:
            move_into(path, dest)
        except FileNotFoundError:
            note.unlink(missing_ok=True)
            return None
        return dest

    def _discard(self, path: Path) -> None:
        """After the new version is durable: delete, or move into the archive. A failure leaves the
        file for the next rescan, which finds it in the ledger and discards it then."""
        if self.keep:
            return
        try:
            if self.config.watch.discard == "archive":
                move_into(path, free_name(self.paths.archive, path.name))
            else:
                remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("folded %s but could not %s it (retried at the next rescan): %s",
                      path.name, self.config.watch.discard, exc)

    @staticmethod
    def _report(outcome: Outcome) -> Outcome:
        level = {"rejected": logging.WARNING, "error": logging.ERROR}.get(outcome.result, logging.INFO)
        verb = {"folded": "folded %s %s", "rejected": "rejected %s: %s", "error": "failed on %s: %s",
                "already_folded": "already folded %s: %s", "vanished": "skipped %s: %s"}[outcome.result]
        log.log(level, verb, outcome.file, outcome.message)
        return outcome


def free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/<stem>-N<suffix>`` for the first N that is not taken."""
    dest = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 1
    while dest.exists() or dest.with_name(dest.name + ".reason").exists():
        n += 1
        dest = folder / f"{stem}-{n}{suffix}"
    return dest


def remove(path: Path) -> None:
    """Delete a file, or a model folder renamed to a dot-name first (which the watcher ignores), so that
    a crash mid-way never leaves a half-deleted model where a checkpoint is expected."""
    if path.is_dir():
        trash = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash)
    else:
        path.unlink()
        fsync_dir(path.parent)


def move_into(src: Path, dest: Path) -> None:
    """Move a file or a model folder crash-safely: a rename when on one filesystem, else copy, fsync,
    rename, remove."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.tmp")
        if src.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            for root, _, files in os.walk(tmp):
                for name in files:
                    fsync_file(Path(root) / name)
                fsync_dir(Path(root))
        else:
            shutil.copyfile(src, tmp)
            fsync_file(tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        remove(src)
    fsync_dir(dest.parent)
    fsync_dir(src.parent)


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
        self.counts = {"folded": 0, "rejected": 0, "error": 0, "already_folded": 0, "vanished": 0}
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
        self.worker = FoldWorker(self.config, base, identity, self.metrics, progress=self.watchdog.ping)
        self.metrics.basis_state(*self.worker.basis_stats())
        self._start_jobs()
        self.metrics.queue_depth.set_function(lambda: len(self.queue))
        self.watcher = Watcher(p.watch_dir, self.arrived, observer=w.observer, poll_interval_s=w.poll_interval_s,
                               stable_interval_s=w.stable_interval_s, rescan_interval_s=w.rescan_interval_s,
                               is_pending=lambda path: path in self.queue)
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
                            "stays in %s for the next start", path.name, self.config.paths.watch_dir)
                break
            except Exception:           # a bug here must not stop the queue; the file is retried later
                log.exception("processing %s failed", path.name)
            finally:
                self.queue.done(path)

    def _fold_one(self, path: Path) -> None:
        with self._lock:
            self.current = path.name
        try:
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
            log.debug("arrived: %s (queue depth %d)", path.name, len(self.queue))

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
            accuracy = result.get("test_accuracy") if record.state == "succeeded" else None
            self.metrics.job_finished(seconds, target_label(record.target), accuracy)

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
                "queue": {"depth": len(self.queue), "current": self.current},
                "folds": dict(self.counts),
                "last": asdict(self.last) if self.last else None,
                "last_error": self.last_error,
            }

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """The daemon's own control-API ops, merged with the job runner's."""
        def basis_history(args: dict[str, Any]) -> dict[str, Any]:
            basis = self.worker.basis if self.worker else None
            if basis is None:
                return {"version": 0, "count": 0, "ledger": []}
            records = basis.ledger(offset=int(args.get("offset", 0)), limit=args.get("limit"))
            return {"version": basis.version, "count": basis.count, "ledger": [r.to_json() for r in records]}

        return {"status": lambda args: self.status(), "basis.history": basis_history}


def target_label(target: str) -> str:
    """A short metric label for a target: its name, or the folder name of an ``imagefolder:PATH``."""
    return Path(target.split(":", 1)[1]).name if target.startswith("imagefolder:") else target


def setup_logging(config: Config, stderr: bool = True) -> None:
    """One line per event on stderr (the journal under systemd), and in ``paths.log_file`` if set."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)] if stderr else []
    if config.paths.log_file is not None:
        config.paths.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(config.paths.log_file))
    logging.basicConfig(level=config.log.level.upper(), handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(config: Config) -> int:
    """Run the daemon in this process until SIGTERM/SIGINT; returns the exit status."""
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
