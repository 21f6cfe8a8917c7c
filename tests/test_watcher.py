"""Arrival detection: which names count, the three triggers, the stability clock, rescans, real observers."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from watchdog.events import FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent

from axis_stream.service.watcher import Watcher, is_candidate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Arrivals:
    """Collects reported paths, with the file size seen at the moment of arrival."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> None:
        with self._lock:
            self.paths.append(path)
            self.sizes.append(path.stat().st_size)

    def names(self) -> list[str]:
        with self._lock:
            return [p.name for p in self.paths]

    def wait_for(self, count: int, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.names()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.names()


def make_watcher(folder: Path, arrivals: Arrivals, clock: Clock | None = None, **kw) -> Watcher:
    kw.setdefault("stable_interval_s", 2.0)
    kw.setdefault("rescan_interval_s", 60.0)
    return Watcher(folder, arrivals, clock=clock or time.monotonic, **kw)


def test_candidate_names(tmp_path):
    folder = tmp_path.resolve()
    for good in ("a.safetensors", "b.pt", "c.pth", "d.bin", "E.SAFETENSORS"):
        assert is_candidate(folder / good, folder), good
    for bad in ("a.safetensors.partial", "a.safetensors.tmp", ".a.safetensors", ".hidden.pt",
                "notes.txt", "a.partial", "model.safetensors~"):
        assert not is_candidate(folder / bad, folder), bad
    assert not is_candidate(folder / "sub" / "a.safetensors", folder)


def test_created_file_arrives_only_after_size_and_mtime_are_stable(tmp_path):
    clock, arrivals = Clock(), Arrivals()
    w = make_watcher(tmp_path, arrivals, clock, stable_interval_s=2.0)
    path = w.folder / "slow.safetensors"
    path.write_bytes(b"x" * 10)
    w.on_event(FileCreatedEvent(str(path)))
    clock.now += 1.5
    w.tick()
    assert arrivals.names() == []
    with open(path, "ab") as fh:           # the writer is still going: the clock restarts
        fh.write(b"y" * 10)
    w.on_event(FileModifiedEvent(str(path)))
    clock.now += 1.5
    w.tick()
    assert arrivals.names() == []
    clock.now += 0.6
    w.tick()
    assert arrivals.names() == ["slow.safetensors"] and arrivals.sizes == [20]
    clock.now += 5
    w.tick()
    assert arrivals.names() == ["slow.safetensors"]       # reported once


def test_a_change_seen_only_by_tick_restarts_the_clock(tmp_path):
    clock, arrivals = Clock(), Arrivals()
    w = make_watcher(tmp_path, arrivals, clock, stable_interval_s=2.0)
    path = w.folder / "a.pt"
    path.write_bytes(b"1")
    w.observe(path)
    clock.now += 1.9
    path.write_bytes(b"22")                # no event delivered (e.g. a network filesystem)
    w.tick()
    clock.now += 1.9
    w.tick()
    assert arrivals.names() == []
    clock.now += 0.2
    w.tick()
    assert arrivals.sizes == [2]


def test_closed_and_moved_in_arrive_at_once_and_others_are_ignored(tmp_path):
    clock, arrivals = Clock(), Arrivals()
    w = make_watcher(tmp_path, arrivals, clock)
    f = w.folder
    for name in ("a.safetensors", "b.pt", "c.pt.partial", ".d.pt", "e.txt"):
        (f / name).write_bytes(b"0")
    w.on_event(FileClosedEvent(str(f / "a.safetensors")))
    w.on_event(FileMovedEvent(str(f / "c.pt.partial"), str(f / "b.pt")))
    w.on_event(FileMovedEvent("", str(f / "b.pt")))        # unmatched move-in from elsewhere
    w.on_event(FileClosedEvent(str(f / ".d.pt")))
    w.on_event(FileClosedEvent(str(f / "e.txt")))
    w.on_event(FileMovedEvent(str(f / "b.pt"), str(f / "archive" / "b.pt")))
    assert arrivals.names() == ["a.safetensors", "b.pt", "b.pt"]   # the caller's queue de-duplicates


def test_pending_files_are_not_reported_again(tmp_path):
    clock, arrivals = Clock(), Arrivals()
    held: set[Path] = set()
    w = make_watcher(tmp_path, arrivals, clock, is_pending=lambda p: p in held)
    path = w.folder / "a.pt"
    path.write_bytes(b"0")
    held.add(path)
    w.scan()
    clock.now += 10
    w.tick()
    w.on_event(FileClosedEvent(str(path)))
    assert arrivals.names() == []


def test_scan_reports_existing_files_in_mtime_order_and_periodic_rescan_finds_missed_ones(tmp_path):
    clock, arrivals = Clock(), Arrivals()
    w = make_watcher(tmp_path, arrivals, clock, stable_interval_s=1.0, rescan_interval_s=30.0)
    for i, name in enumerate(["c.pt", "a.pt", "b.pt"]):
        p = w.folder / name
        p.write_bytes(b"0")
        os.utime(p, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    w.scan()
    clock.now += 1.0
    w.tick()
    assert arrivals.names() == ["c.pt", "a.pt", "b.pt"]
    for p in list(arrivals.paths):
        p.unlink()
    (w.folder / "missed.safetensors").write_bytes(b"0")       # its events were lost
    clock.now += 10
    w.tick()
    assert arrivals.names() == ["c.pt", "a.pt", "b.pt"]
    clock.now += 20                         # rescan due: found, then stable one interval later
    w.tick()
    clock.now += 1.0
    w.tick()
    assert arrivals.names()[-1] == "missed.safetensors"


def test_inotify_close_rename_and_chunked_writes(tmp_path):
    arrivals = Arrivals()
    # A long stable interval: only close-after-write and renames can report these in time.
    w = make_watcher(tmp_path, arrivals, observer="inotify", stable_interval_s=120.0)
    w.start()
    try:
        f = w.folder
        (f / "copied.safetensors").write_bytes(b"a" * 1000)
        assert arrivals.wait_for(1) == ["copied.safetensors"]
        (f / "renamed.pt.partial").write_bytes(b"b" * 500)
        (f / ".hidden.pt").write_bytes(b"c")
        os.rename(f / "renamed.pt.partial", f / "renamed.pt")
        assert arrivals.wait_for(2) == ["copied.safetensors", "renamed.pt"]
        outside = tmp_path.parent / f"{tmp_path.name}-outside.pt"
        outside.write_bytes(b"d" * 10)
        os.rename(outside, f / "moved-in.pt")
        assert arrivals.wait_for(3)[-1] == "moved-in.pt"
        with open(f / "chunked.safetensors", "wb") as fh:
            for _ in range(5):
                fh.write(b"e" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
            assert "chunked.safetensors" not in arrivals.names()
        assert arrivals.wait_for(4)[-1] == "chunked.safetensors"
        assert arrivals.sizes == [1000, 500, 10, 5 * 4096]
    finally:
        w.stop()


def test_polling_observer_waits_for_a_slow_writer(tmp_path):
    arrivals = Arrivals()
    w = make_watcher(tmp_path, arrivals, observer="polling", poll_interval_s=0.05, stable_interval_s=0.5)
    (w.folder / "early.pt").write_bytes(b"0" * 7)        # there before start: the start-up scan
    w.start()
    try:
        assert w.observer_name == "polling"
        path = w.folder / "slow.safetensors"
        with open(path, "wb") as fh:
            for _ in range(4):                 # pauses well inside the stable interval
                fh.write(b"x" * 1000)
                fh.flush()
                time.sleep(0.1)
        names = arrivals.wait_for(2)
        assert sorted(names) == ["early.pt", "slow.safetensors"]
        assert dict(zip(names, arrivals.sizes)) == {"early.pt": 7, "slow.safetensors": 4000}
    finally:
        w.stop()


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_stop_is_prompt(tmp_path, observer):
    w = make_watcher(tmp_path, Arrivals(), observer=observer, poll_interval_s=0.05)
    w.start()
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 5


def test_the_start_up_backlog_arrives_oldest_first_before_a_file_renamed_in_after_the_start(tmp_path):
    """Files found by the start-up listing and untouched for stable_interval_s (by mtime) arrive at
    start, oldest mtime first, not a stable interval later behind a file renamed in meanwhile."""
    arrivals = Arrivals()
    w = make_watcher(tmp_path, arrivals, observer="inotify", stable_interval_s=120.0)
    now = time.time()
    for name, age in (("newer.pt", 300), ("oldest.pt", 900), ("middle.pt", 600)):
        (w.folder / name).write_bytes(b"x" * 10)
        os.utime(w.folder / name, (now - age, now - age))
    (w.folder / "fresh.pt").write_bytes(b"y")            # just written: waits for the stable interval
    w.start()
    try:
        outside = tmp_path.parent / f"{tmp_path.name}-late.pt"
        outside.write_bytes(b"z")
        os.rename(outside, w.folder / "late.pt")
        assert arrivals.wait_for(4) == ["oldest.pt", "middle.pt", "newer.pt", "late.pt"]
    finally:
        w.stop()


def test_the_watcher_accepts_exactly_the_suffixes_the_readers_read(tmp_path):
    from axis_stream.errors import NotACheckpoint
    from axis_stream.store import readers

    for suffix in (*readers.CHECKPOINT_SUFFIXES, ".SafeTensors", ".npz", ".ckpt"):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(b"not a checkpoint at all")
        accepted = is_candidate(path, tmp_path)
        assert accepted == (suffix.lower() in readers.CHECKPOINT_SUFFIXES)
        try:
            readers.open_source(path, trust_pickles=False).close()
        except NotACheckpoint as exc:   # every accepted file reaches its reader; the others are refused by name
            assert ("unsupported file type" in str(exc)) == (not accepted), exc
