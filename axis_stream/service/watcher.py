"""Arrival detection in the watched folder: when is a checkpoint file complete?

A file counts as arrived on the first of three triggers (watchdog on Linux gives no single one that
covers every writer):
- close-after-write (``FileClosedEvent``, inotify only): ``cp``, ``torch.save``, ``save_file``;
- a rename into the folder (``FileMovedEvent`` with its destination here): ``cp x.partial && mv``,
  ``rsync`` (which writes a dot-file and renames it);
- otherwise, created or modified and then unchanged (size and mtime) for ``stable_interval_s``,
  checked by a timer thread: files moved in from another filesystem, the polling observer,
  network filesystems, and files found by a rescan.
Only regular files directly in the folder whose name ends in an accepted suffix count; dot-files,
``*.partial`` and ``*.tmp`` are ignored (suffix checks by hand: watchdog 7 matches patterns with
``full_match``).

A subfolder directly in the folder is one checkpoint (a Hugging Face model folder), arriving as a
unit: renamed into place (``name.partial/`` -> ``name/``, the safe way) it arrives at once; otherwise
(copied in, found by a rescan) once its weights are complete (``readers.hf_folder_complete``: the
index names shards that are all present and whole) and nothing in it, recursively, changed size or
mtime for ``stable_interval_s``. A folder unchanged but incomplete is listed by ``waiting()`` (with
what it lacks) and, once unchanged for ``incomplete_timeout_s`` more, reported anyway, so that the
fold rejects it into the quarantine with its real cause instead of it waiting forever unseen. Files written inside a subfolder give no events here (the observer
is not recursive), so the timer polls such folders. Dot-folders and ``*.partial``/``*.tmp`` folders
are ignored. The observer starts before the first listing, and the folder is
rescanned periodically, because inotify drops events when its queue overflows.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from axis_stream.service.foldworker import special_kind
from axis_stream.store.readers import CHECKPOINT_SUFFIXES, hf_folder_incomplete
from axis_stream.text import printable

log = logging.getLogger(__name__)

IGNORED_FOLDER_SUFFIXES = (".partial", ".tmp")


def is_candidate(path: str | Path, folder: Path) -> bool:
    """True for a checkpoint name directly inside ``folder``: accepted suffix, not a dot-file."""
    path = Path(path)
    return (path.parent == folder and not path.name.startswith(".")
            and path.name.lower().endswith(CHECKPOINT_SUFFIXES))


def is_folder_candidate(path: str | Path, folder: Path) -> bool:
    """True for a subfolder directly inside ``folder`` that may be a model: not a dot-, .partial or .tmp folder."""
    path = Path(path)
    return (path.parent == folder and not path.name.startswith(".")
            and not path.name.lower().endswith(IGNORED_FOLDER_SUFFIXES) and path.is_dir())


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float        # clock time at which this (size, mtime) was first observed
    lacks: str | None = None    # a stable folder whose weights are incomplete: what it lacks (logged once)


def _stat(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of a regular file; for a folder, the total size and the newest mtime of it and
    everything under it (an added, removed, renamed or growing file changes one of them)."""
    try:
        st = path.stat()
        if stat.S_ISREG(st.st_mode):
            return st.st_size, st.st_mtime_ns
        if not stat.S_ISDIR(st.st_mode):
            return None
        size, mtime = 0, st.st_mtime_ns
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                sub = os.stat(os.path.join(root, name), follow_symlinks=False)
                size, mtime = size + (sub.st_size if stat.S_ISREG(sub.st_mode) else 0), max(mtime, sub.st_mtime_ns)
        return size, mtime
    except OSError:
        return None


class Watcher:
    """Calls ``on_arrival(path)`` once a checkpoint in ``folder`` is complete, roughly in arrival order.

    ``is_pending(path)`` tells it which files the caller already holds (queued or being folded), so
    rescans do not report them again. ``clock`` is injectable so tests can drive the stability timer.
    """

    def __init__(self, folder: Path, on_arrival: Callable[[Path], None], *,
                 observer: str = "auto", poll_interval_s: float = 1.0, stable_interval_s: float = 2.0,
                 rescan_interval_s: float = 60.0, is_pending: Callable[[Path], bool] = lambda p: False,
                 incomplete_timeout_s: float = float("inf"), clock: Callable[[], float] = time.monotonic):
        self.folder = Path(folder).resolve()
        self.on_arrival = on_arrival
        self.observer_kind = observer
        self.poll_interval_s = poll_interval_s
        self.stable_interval_s = stable_interval_s
        self.rescan_interval_s = rescan_interval_s
        self.incomplete_timeout_s = incomplete_timeout_s
        self.is_pending = is_pending
        self.clock = clock
        self._seen: dict[Path, _Seen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self._timer: threading.Thread | None = None
        self._last_scan = float("-inf")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observer, then list the folder (so nothing falls between), then the stability timer."""
        self._observer = self._make_observer()
        self.scan()
        self._arrive_settled()
        self._timer = threading.Thread(target=self._run_timer, name="watch-timer", daemon=True)
        self._timer.start()

    def stop(self) -> None:
        """Stop watching; files not yet reported stay in the folder and are found again at restart."""
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
        if self._timer is not None:
            self._timer.join(timeout=10)

    @property
    def observer_name(self) -> str:
        return "polling" if isinstance(self._observer, PollingObserver) else "inotify"

    def _make_observer(self) -> BaseObserver:
        handler = _Handler(self.on_event)
        if self.observer_kind != "polling":
            try:
                from watchdog.observers.inotify import InotifyObserver

                observer = InotifyObserver(generate_full_events=True)
                observer.schedule(handler, str(self.folder), recursive=False)
                observer.start()
                return observer
            except (ImportError, OSError) as exc:
                if self.observer_kind == "inotify":
                    raise
                log.warning("inotify unavailable (%s); watching %s by polling every %.1f s",
                            exc, self.folder, self.poll_interval_s)
        observer = PollingObserver(timeout=self.poll_interval_s)
        observer.schedule(handler, str(self.folder), recursive=False)
        observer.start()
        return observer

    # -- triggers --------------------------------------------------------------------------------

    def on_event(self, event: FileSystemEvent) -> None:
        """Route one watchdog event: closed and moved-in arrive now; created/modified wait until stable."""
        src = Path(os.fsdecode(event.src_path))
        if isinstance(event, (DirMovedEvent, FileMovedEvent)):
            self._forget(src)
            dest = os.fsdecode(event.dest_path)
            candidate = is_folder_candidate if event.is_directory else is_candidate
            if dest and candidate(dest, self.folder):
                self._arrive([Path(dest)])
        elif isinstance(event, (DirDeletedEvent, FileDeletedEvent)):
            self._forget(src)
        elif isinstance(event, (DirCreatedEvent, FileCreatedEvent, FileModifiedEvent)):
            self.observe(src)
        elif isinstance(event, FileClosedEvent) and is_candidate(src, self.folder):
            self._arrive([src])

    def observe(self, path: Path) -> None:
        """Start (or restart) the stability clock of ``path`` if it is a candidate we do not hold yet."""
        if not (is_candidate(path, self.folder) or is_folder_candidate(path, self.folder)) or self.is_pending(path):
            return
        st = _stat(path)
        if st is None:
            if special_kind(path) is not None:     # a FIFO or device never completes: the fold quarantines it
                self._arrive([path])
            return
        with self._lock:
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != st:
                self._seen[path] = _Seen(*st, since=self.clock())

    def scan(self) -> None:
        """List the folder and put every candidate not yet held on the stability clock."""
        self._last_scan = self.clock()
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            log.error("cannot list %s: %s", self.folder, exc)
            return
        for entry in entries:
            self.observe(Path(entry.path))

    def _arrive_settled(self) -> None:
        """At start, report at once (oldest mtime first) what the first listing found untouched for
        ``stable_interval_s`` already by its mtime, so that a file renamed in just after the start does
        not overtake the backlog; the rest waits on the stability clock as usual."""
        now = time.time()
        with self._lock:
            settled = [(seen.mtime_ns, path.name, path) for path, seen in self._seen.items()
                       if now - seen.mtime_ns / 1e9 >= self.stable_interval_s]
        self._arrive([p for _, _, p in sorted(settled)
                      if not p.is_dir() or hf_folder_incomplete(p) is None])

    def tick(self) -> None:
        """Report files (and complete folders) whose size and mtime have not changed for the stable
        interval; rescan when due."""
        now = self.clock()
        if now - self._last_scan >= self.rescan_interval_s:
            self.scan()
        ready: list[tuple[int, str, Path]] = []
        with self._lock:
            for path, seen in list(self._seen.items()):
                st = _stat(path)
                if st is None:
                    del self._seen[path]
                elif st != (seen.size, seen.mtime_ns):
                    self._seen[path] = _Seen(*st, since=now)
                elif now - seen.since >= self.stable_interval_s:
                    lacks = hf_folder_incomplete(path) if path.is_dir() else None
                    if lacks is None or now - seen.since >= self.stable_interval_s + self.incomplete_timeout_s:
                        ready.append((seen.mtime_ns, path.name, path))     # (the fold rejects what still lacks)
                    elif seen.lacks != lacks:
                        seen.lacks = lacks
                        log.warning("%s: unchanged, but its weights are incomplete (%s); waiting for them, "
                                    "quarantined if unchanged for %g s (watch.incomplete_timeout_s)",
                                    printable(path.name), printable(lacks), self.incomplete_timeout_s)
        self._arrive([p for _, _, p in sorted(ready)])

    def waiting(self) -> dict[str, dict[str, float | str]]:
        """Folders unchanged but incomplete, by name: seconds unchanged and what they lack."""
        now = self.clock()
        with self._lock:
            return {p.name: {"seconds": now - s.since, "cause": s.lacks} for p, s in self._seen.items() if s.lacks}

    def _arrive(self, paths: list[Path]) -> None:
        with self._lock:
            for path in paths:
                self._seen.pop(path, None)
        for path in paths:
            if not self.is_pending(path):
                self.on_arrival(path)

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._seen.pop(path, None)

    def _run_timer(self) -> None:
        period = max(0.02, min(self.stable_interval_s / 4, self.poll_interval_s, 1.0))
        while not self._stop.wait(period):
            try:
                self.tick()
            except Exception:  # the timer must outlive any one bad file
                log.exception("watch timer")


class _Handler(FileSystemEventHandler):
    def __init__(self, route: Callable[[FileSystemEvent], None]):
        self._route = route

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._route(event)
        except Exception:
            log.exception("watch event %r", event)
