"""The ledger of a basis: one record per folded source, in an append-only SQLite file (WAL mode).

``<basis>/ledger.sqlite`` holds two tables::

    sources(version, file, sha256, size, folded_at, record)   one row per fold, keyed by the basis
                                                              version it created; indexed by sha256
    shares(base, version, shares)                              per fold, per matrix, its share of the
                                                              kept energy when it entered, as
                                                              ``[share, log_scale]`` (see basis.py)

Rows are never changed and never deleted, with one exception: rows of versions newer than the
current basis version (written by a fold killed before its ``CURRENT`` pointer moved) are dropped
by the next writer (``drop_after``). Which rows make a version's ledger is not stored here: the
version's manifest names it as a *lineage*, a short list of ``[first, last]`` ranges of fold versions
(one range, plus one per rollback in its history). The basis version is the source of truth; the
ledger only has to hold at least the rows the lineage names, which the write order guarantees (the
row is committed, with ``synchronous=FULL``, before the pointer moves).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from axis_stream import errors
from axis_stream.store import atomic
from axis_stream.text import storable

FILE = "ledger.sqlite"
Lineage = Sequence[Sequence[int]]  # [[first, last], ...] fold versions, ascending

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    version INTEGER PRIMARY KEY, file TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    folded_at TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sources_sha256 ON sources (sha256);
CREATE TABLE IF NOT EXISTS shares (
    base INTEGER NOT NULL, version INTEGER NOT NULL, shares TEXT NOT NULL, PRIMARY KEY (base, version));
"""


def extend(lineage: Lineage, version: int) -> list[list[int]]:
    """The lineage of a fold creating ``version`` on top of ``lineage`` (its parent is ``version - 1``)."""
    out = [list(r) for r in lineage]
    if out and out[-1][1] == version - 1:
        out[-1][1] = version
    else:
        out.append([version, version])
    return out


def ranges(versions: Iterable[int]) -> list[list[int]]:
    """Ascending fold versions as a lineage of consecutive runs."""
    out: list[list[int]] = []
    for v in versions:
        out = extend(out, v)
    return out


def size(lineage: Lineage) -> int:
    """How many sources a lineage holds."""
    return sum(b - a + 1 for a, b in lineage)


def _where(lineage: Lineage) -> tuple[str, list[int]]:
    if not lineage:
        return "0", []
    return " OR ".join(["version BETWEEN ? AND ?"] * len(lineage)), [x for r in lineage for x in r]


class Ledger:
    """The ledger file of one basis directory. One connection per object, shared by its threads."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / FILE
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
                for name in (FILE, FILE + "-wal", FILE + "-shm"):      # not by the umask (SQLite copies it)
                    if (p := self.path.with_name(name)).exists():
                        atomic.own_mode(p)
            except sqlite3.Error as exc:
                if os.access(self.path.parent, os.W_OK) or not self.path.is_file():
                    raise errors.BasisError(f"{self.path}: cannot open the ledger ({exc})") from None
                conn = self._read_only()
            self._conn = conn
        return self._conn

    def _read_only(self) -> sqlite3.Connection:
        """The ledger of a folder this process cannot write (a read-only mount, a backup, another user's
        state), for reading: SQLite's read-only mode, or, where it cannot keep its ``-shm`` index beside
        the file, the file as immutable (what it holds now; a writer elsewhere is not seen)."""
        for query in ("mode=ro", "immutable=1"):
            try:
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?{query}", uri=True, timeout=30,
                                       check_same_thread=False, isolation_level=None)
                conn.execute("SELECT count(*) FROM sources").fetchone()
                return conn
            except sqlite3.Error as exc:
                error = exc
        raise errors.BasisError(f"{self.path}: cannot open the ledger, even for reading ({error})")

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _write(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        """One durable transaction; the directory is fsynced too, so a new WAL file's name survives."""
        with self._lock:
            db = self._db()
            try:
                db.execute("BEGIN IMMEDIATE")
                for sql, args in statements:
                    db.execute(sql, args)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        atomic.fsync_dir(self.path.parent)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db().execute(sql, args).fetchall()

    # --- writing ---

    def add(self, entries: Sequence[tuple[dict[str, Any], list[list[float]]]], base: int) -> None:
        """Append a fold's records and their entry shares, in one transaction (before the basis
        pointer moves): one for a checkpoint, every source of a basis folded in (``fold_basis``)."""
        self._write([stmt for record, shares in entries for stmt in (
            ("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?, ?)",
             (record["version"], storable(record["file"]), record["sha256"], record["size"], record["folded_at"],
              json.dumps(record))),
            ("INSERT OR REPLACE INTO shares VALUES (?, ?, ?)", (base, record["version"], json.dumps(shares))))])

    def import_records(self, records: Iterable[dict[str, Any]], base: int,
                       shares: Iterable[tuple[int, list[list[float]]]]) -> None:
        """Add records and one share base that may exist already (migrating a format-1 basis)."""
        self._write(
            [("INSERT OR IGNORE INTO sources VALUES (?, ?, ?, ?, ?, ?)",
              (r["version"], storable(r["file"]), r["sha256"], r["size"], r["folded_at"], json.dumps(r))) for r in records]
            + [("INSERT OR IGNORE INTO shares VALUES (?, ?, ?)", (base, v, json.dumps(s))) for v, s in shares])

    def drop_after(self, version: int) -> None:
        """Remove the rows of versions newer than ``version`` (folds that never became current)."""
        if self._read("SELECT 1 FROM sources WHERE version > ? UNION ALL "
                      "SELECT 1 FROM shares WHERE version > ? LIMIT 1", (version, version)):
            self._write([("DELETE FROM sources WHERE version > ?", (version,)),
                         ("DELETE FROM shares WHERE version > ?", (version,))])

    # --- reading ---

    def find(self, sha256: str, lineage: Lineage) -> dict[str, Any] | None:
        """The record of the source with these bytes among ``lineage``'s, if any."""
        where, args = _where(lineage)
        rows = self._read(f"SELECT record FROM sources WHERE sha256 = ? AND ({where}) ORDER BY version LIMIT 1",
                          [sha256, *args])
        return json.loads(rows[0][0]) if rows else None

    def page(self, lineage: Lineage, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """``lineage``'s records in folding order, ``limit`` of them from ``offset``."""
        where, args = _where(lineage)
        rows = self._read(f"SELECT record FROM sources WHERE {where} ORDER BY version LIMIT ? OFFSET ?",
                          [*args, -1 if limit is None else limit, offset])
        return [json.loads(r[0]) for r in rows]

    def count(self, lineage: Lineage) -> int:
        """How many of ``lineage``'s records the file holds (``size(lineage)`` unless it lost some)."""
        where, args = _where(lineage)
        return int(self._read(f"SELECT count(*) FROM sources WHERE {where}", args)[0][0])

    def shares(self, base: int, lineage: Lineage) -> list[list[list[float]]]:
        """The entry shares of ``lineage``'s sources under ``base``, in folding order."""
        where, args = _where(lineage)
        rows = self._read(f"SELECT shares FROM shares WHERE base = ? AND ({where}) ORDER BY version", [base, *args])
        return [json.loads(r[0]) for r in rows]

    def nbytes(self) -> int:
        """Bytes of the ledger on disk (the database file and its write-ahead log)."""
        return sum(p.stat().st_size for p in (self.path, self.path.with_name(FILE + "-wal")) if p.exists())
