"""The one writer's work on one file: fold it into the basis, then discard it (folded) or move it into
the quarantine with a ``<name>.reason`` beside it (rejected); the file moves (``move_into``,
``free_name``, ``remove``) that do it crash-safely. The daemon, ``backfill`` and ``backfill_ray`` share it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import re
import shutil
import sqlite3
import stat
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError

from axis_stream import errors
from axis_stream.config import Config, WatchConfig
from axis_stream.service.api import one_line
from axis_stream.service.metrics import Metrics
from axis_stream.store import readers
from axis_stream.store.atomic import atomic_write_bytes, fsync_dir, fsync_file
from axis_stream.store.basis import CURRENT, Basis
from axis_stream.store.folding import fold_device
from axis_stream.store.prefetch import Prefetcher
from axis_stream.store.records import FoldRecord
from axis_stream.text import printable

log = logging.getLogger("axis_stream.service.daemon")

REJECT_REASONS = sorted({cls.reason for cls in vars(errors).values()
                         if isinstance(cls, type) and issubclass(cls, errors.CheckpointError)}
                        | {"internal_error"})


@dataclass
class Outcome:
    """What processing one file did. ``result``: folded, rejected (quarantined), error (internal:
    quarantined; environment: left in place for a retry), already_folded (a restart found a file
    whose fold was durable but whose discard was not), vanished (gone before its turn), waiting
    (shorter than its header says: left in place and looked at again, until ``incomplete_timeout_s``)."""

    file: str
    result: str
    message: str
    reason: str | None = None
    version: int | None = None
    seconds: float = 0.0


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def default_memory_budget() -> int:
    """Half the memory available now, in bytes."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def fold_threads(watch: WatchConfig) -> int:
    """The daemon's fold threads: ``watch.fold_workers``, 0 meaning one per core."""
    return watch.fold_workers or default_workers()


class FoldWorker:
    """Folds one file into the basis, then discards it (folded) or quarantines it (rejected).

    The basis is created at the first fold, so "no basis yet" means nothing was folded yet.
    ``fold_workers`` matrices fold at once within ``memory_budget`` bytes (the same basis); ``keep``
    leaves folded files in place and ``quarantine=False`` rejected ones (``axis-stream backfill``).
    ``progress()`` after each matrix folded and each chunk hashed or read (the daemon's watchdog ping).
    ``wait_incomplete`` (the daemon): a file shorter than its header says may still be written in
    place, so it is left ("waiting") until it has stayed short and unchanged for
    ``watch.incomplete_timeout_s`` by ``clock``, then quarantined as truncated.
    """

    def __init__(self, config: Config, base_state: Mapping[str, torch.Tensor], identity: Mapping[str, str],
                 metrics: Metrics | None = None, progress: Callable[[], None] = lambda: None, *,
                 fold_workers: int = 1, memory_budget: float = math.inf, keep: bool = False,
                 quarantine: bool = True, wait_incomplete: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.fold_workers, self.memory_budget = fold_workers, memory_budget
        self.keep, self.quarantine = keep, quarantine
        self.config = config
        self.paths = config.paths
        self.base_state = base_state
        self.identity = dict(identity)
        self.metrics = metrics
        self._progress = progress
        self.wait_incomplete, self.clock = wait_incomplete, clock
        self._short: dict[Path, tuple[float, readers.Identity | None]] = {}   # first seen short, as it was
        self.fold_progress: tuple[int, int] | None = None      # (matrices folded, of) while a fold runs
        self._ahead = Prefetcher()                             # the next file's hash, taken during a fold
        self._upcoming: Path | None = None                     # the file to hash during the next fold
        self.basis: Basis | None = None
        fold_device(config.basis)      # a missing GPU is said at start, not at the first fold
        if (self.paths.basis_dir / CURRENT).exists():
            self.basis = Basis.open(self.paths.basis_dir, base_state, settings=config.basis)

    def process(self, path: Path) -> Outcome:
        """Fold ``path``, then discard it (folded) or quarantine it (rejected); never raises for a bad file.

        A symlink is quarantined unread (the link moves, its target is untouched). A file replaced under
        the same name while it was folded is not discarded: the new file is folded at the next rescan."""
        if path.is_symlink():
            return self._reject(path, errors.Symlink.reason, "a symbolic link, not followed: move or copy the "
                                "checkpoint itself into the folder")
        if (kind := special_kind(path)) is not None:
            return self._reject(path, errors.SpecialFile.reason, f"a {kind}, not a regular file: never opened")
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
        except errors.TruncatedFile as exc:
            return self._short_file(path, identity, exc)
        except errors.CheckpointError as exc:
            return self._reject(path, exc.reason, exc.message)
        except Exception as exc:
            if (cause := retry_cause(exc)) is not None:
                # Not the file's fault (disk full, permissions, a broken basis, a writer not done): keep it for a retry.
                if self.metrics:
                    self.metrics.fold_failed(cause)
                return self._report(Outcome(path.name, "error", f"left in place for a retry ({cause}): {exc}"))
            log.error("internal error folding %s:\n%s", printable(path.name),
                      "\n".join(map(printable, traceback.format_exc().rstrip().splitlines())))
            return self._reject(path, "internal_error", f"{type(exc).__name__}: {exc}", internal=True)
        self._short.pop(path, None)
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
        if record.architecture:
            log.warning("folded %s with another head, which is ignored (%s; basis.allow_other_architectures)",
                        printable(path.name), printable(record.architecture))
        return self._report(Outcome(path.name, "folded", f"into v{record.version} in {seconds:.2f} s ({kept})"
                                    + ("; it was replaced during the fold: the new file stays for the next "
                                       "rescan" if replaced else ""), version=record.version, seconds=seconds))

    def prefetch(self, path: Path | None) -> None:
        """Read and hash ``path`` (the file to fold after the next; None: none) in the background while
        the next ``process`` folds: one file ahead (``store.prefetch``)."""
        self._upcoming = path

    def _short_file(self, path: Path, identity: readers.Identity | None, exc: errors.CheckpointError) -> Outcome:
        """A file shorter than its header says: waiting while it may still be written (it changed
        since it was first seen short, or not for ``incomplete_timeout_s`` yet), else quarantined."""
        if not self.wait_incomplete or path.is_dir():     # a folder has waited in the watcher already
            return self._reject(path, exc.reason, exc.message)
        now, timeout = self.clock(), self.config.watch.incomplete_timeout_s
        since, seen = self._short.get(path, (now, identity))
        if seen != identity:            # it grew (or was replaced) since: the writer is not done
            since = now
        if now - since < timeout:
            self._short[path] = (since, identity)
            return self._report(Outcome(path.name, "waiting", f"{exc.message}: still being written? looked at "
                                        f"again later; quarantined if unchanged for {timeout:g} s "
                                        f"(watch.incomplete_timeout_s)", reason=exc.reason))
        self._short.pop(path, None)
        return self._reject(path, exc.reason, f"{exc.message} (unchanged for {now - since:.0f} s, "
                                              "watch.incomplete_timeout_s)")

    def waiting(self) -> dict[str, float]:
        """Short files left waiting, by name -> seconds since they last changed."""
        now = self.clock()
        for path in [p for p in list(self._short) if not p.exists()]:      # deleted while it waited
            self._short.pop(path, None)
        return {path.name: now - since for path, (since, _) in list(self._short.items())}

    def basis_stats(self) -> tuple[int, int, int]:
        """(version, sources folded, bytes on disk) of the current basis; zeros before the first fold."""
        if self.basis is None:
            return 0, 0, 0
        return self.basis.version, self.basis.count, self.basis.nbytes()

    def _fold(self, path: Path) -> FoldRecord:
        if self.basis is None:
            self.basis = Basis.create(self.paths.basis_dir, self.base_state, self.config.basis, self.identity)

        def matrix_done(done: int, total: int) -> None:
            self.fold_progress = (done, total)
            self._progress()

        try:
            hashed = self._ahead.take(path)
            self._ahead.start(self._upcoming)
            self._upcoming = None
            return self.basis.fold_checkpoint(path, progress=matrix_done, tick=self._progress, hashed=hashed,
                                              workers=self.fold_workers, memory_budget=self.memory_budget)
        finally:
            self.fold_progress = None

    def _folded_before_restart(self, path: Path) -> bool:
        """Decided with the ledger: the same bytes under the same name are already folded."""
        record = self.basis.has_source(readers.checkpoint_sha256(path, self._progress))
        return record is not None and record.file == path.name

    def _reject(self, path: Path, reason: str, message: str, internal: bool = False) -> Outcome:
        try:
            if self._quarantine(path, reason, message) is None:
                return self._report(Outcome(path.name, "vanished", "gone before it could be quarantined"))
        except OSError as exc:
            if self.metrics:
                self.metrics.fold_failed(retry_cause(exc) or "environment")
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
        named = f" [name={printable(path.name)}]" if dest.name != path.name else ""
        atomic_write_bytes(note, f"{printable(one_line(message))} [reason={reason}] [time={stamp}]{named}\n".encode())
        try:
            move_into(path, dest)
        except FileNotFoundError:
            note.unlink(missing_ok=True)
            return None
        except BaseException:       # disk full, permissions: the file stays where it was, no orphan note
            note.unlink(missing_ok=True)
            raise
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
                      printable(path.name), self.config.watch.discard, printable(exc))

    @staticmethod
    def _report(outcome: Outcome) -> Outcome:
        level = {"rejected": logging.WARNING, "error": logging.ERROR}.get(outcome.result, logging.INFO)
        verb = {"folded": "folded %s %s", "rejected": "rejected %s: %s", "error": "failed on %s: %s",
                "waiting": "waiting for %s: %s",
                "already_folded": "already folded %s: %s", "vanished": "skipped %s: %s"}[outcome.result]
        log.log(level, verb, printable(outcome.file), printable(outcome.message))
        return outcome


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def retry_cause(exc: BaseException) -> str | None:
    """Why a fold failed for a reason outside the file, so the file stays for a retry: ``no_space``
    (ENOSPC or a quota, however it arrives: ``OSError``, the safetensors writer's ``SafetensorError``
    "... (os error 28)", SQLite's "database or disk is full"), ``environment`` (any other I/O error),
    ``basis`` (a damaged or locked basis) or ``source_changed`` (a writer not done); None for a bug."""
    if isinstance(exc, errors.SourceChanged):
        return "source_changed"
    if isinstance(exc, errors.BasisError):
        return "basis"
    if isinstance(exc, OSError):
        return "no_space" if exc.errno in NO_SPACE else "environment"
    if isinstance(exc, SafetensorError) and (found := re.search(r"os error (\d+)", str(exc))):
        return "no_space" if int(found[1]) in NO_SPACE else "environment"
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if "disk is full" in text:
            return "no_space"
        if any(w in text for w in ("disk i/o", "unable to open", "readonly", "locked")):
            return "environment"
    return None


# the longest addition to a quarantined or archived name: ".<name>.reason" + mkstemp's "XXXXXXXX.tmp"
NAME_ROOM = len("..reason.") + 8 + len(".tmp")


def free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/<stem>-N<suffix>`` for the first N that is not taken; a name too long
    for ``folder``'s filesystem once ``.reason`` (and a temporary name) is added is shortened to
    ``<stem...>~<sha256 of the name, 8 hex><suffix>``, so that the quarantine never fails on it."""
    dest = folder / fit_name(folder, name)
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 1
    while dest.exists() or dest.with_name(dest.name + ".reason").exists():
        n += 1
        dest = folder / fit_name(folder, f"{stem}-{n}{suffix}")
    return dest


def fit_name(folder: Path, name: str) -> str:
    """``name``, shortened (bytes, on a UTF-8 boundary) when it and ``NAME_ROOM`` exceed NAME_MAX."""
    try:
        name_max = os.pathconf(folder if folder.exists() else folder.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    raw, limit = os.fsencode(name), name_max - NAME_ROOM
    if len(raw) <= limit:
        return name
    suffix = os.fsencode(Path(name).suffix)
    suffix = suffix if len(suffix) <= 16 else b""
    tag = b"~" + hashlib.sha256(raw).hexdigest()[:8].encode()
    keep = max(0, limit - len(tag) - len(suffix))
    while 0 < keep < len(raw) and raw[keep] & 0xC0 == 0x80:       # not inside a UTF-8 sequence
        keep -= 1
    return os.fsdecode(raw[:keep] + tag + suffix)


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


def special_kind(path: Path) -> str | None:
    """"FIFO", "socket", "device" for such a file (not followed), else None (also when it is gone)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return None


def move_into(src: Path, dest: Path) -> None:
    """Move a file or a model folder crash-safely: a rename when on one filesystem, else copy, fsync,
    rename, remove."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if special_kind(src) is not None:    # a FIFO or device has no bytes to copy: its note stands for it
            os.unlink(src)
            fsync_dir(src.parent)
            return
        tmp = dest.with_name(f".{dest.name}.tmp")
        try:
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
        except BaseException:       # e.g. the destination's disk is full: no partial copy left behind
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)
        remove(src)
    fsync_dir(dest.parent)
    fsync_dir(src.parent)
