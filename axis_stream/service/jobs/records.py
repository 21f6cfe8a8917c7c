"""Job records: the jobs table in SQLite, the source of truth for every job's state."""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axis_stream.errors import AxisError
from axis_stream.store.atomic import own_mode

log = logging.getLogger(__name__)


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
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):   # not by the umask
                if p.exists():
                    own_mode(p)
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
