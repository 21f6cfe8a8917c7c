"""The next checkpoint is read and hashed while the current one folds (backfill and the daemon's
worker), one file ahead, and its fold uses that hash only for the very bytes it hashed."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from test_backfill import write_config
from test_basis import snapshot_equal

from axis_stream import config
from axis_stream.service import foldworker
from axis_stream.service.backfill import backfill
from axis_stream.service.daemon import FoldQueue
from axis_stream.store import ingest, prefetch, readers
from axis_stream.store.basis import Basis
from axis_stream.store.models import load_base

WAIT = 60  # seconds an event may take before the test fails instead of hanging (never slept on)


def record_hashes(monkeypatch, events: list[tuple[str, str]], inside_first_fold: threading.Event | None = None,
                  ahead_done: threading.Event | None = None) -> None:
    """Log ("ahead", file) for hashes taken by the prefetch and ("inline", file) for those the fold takes."""
    ahead, inline = readers.checkpoint_sha256, ingest.checkpoint_sha256

    def hashed_ahead(path, tick=readers._no_tick):
        if inside_first_fold is not None:
            assert inside_first_fold.wait(WAIT), "the first fold never started while the next file was hashed"
        events.append(("ahead", Path(path).name))
        sha = ahead(path, tick)
        if ahead_done is not None:
            ahead_done.set()
        return sha

    def hashed_inline(path, tick=readers._no_tick):
        events.append(("inline", Path(path).name))
        return inline(path, tick)

    monkeypatch.setattr(readers, "checkpoint_sha256", hashed_ahead)
    monkeypatch.setattr(ingest, "checkpoint_sha256", hashed_inline)


def test_backfill_hashes_the_next_file_during_the_current_fold(tiny_base, make_checkpoint, tmp_path, monkeypatch):
    base_cfg, _ = tiny_base
    folder = tmp_path / "zoo"
    folder.mkdir()
    files = [make_checkpoint(s, name=f"{i}-ckpt.safetensors", directory=folder) for i, s in enumerate((61, 62, 63))]
    reference_cfg = config.load(write_config(tmp_path, base_cfg, "reference"))
    backfill(reference_cfg, files, lambda _: None, workers=1)    # without the test's hooks: the basis to match

    events: list[tuple[str, str]] = []
    inside_first_fold, ahead_done = threading.Event(), threading.Event()
    record_hashes(monkeypatch, events, inside_first_fold, ahead_done)
    fold = Basis.fold_checkpoint

    def logged_fold(basis, path, **kwargs):
        events.append(("fold", Path(path).name))
        if path == files[0]:
            # the first fold cannot end before the second file was hashed: a prefetch run after the
            # fold, not during it, would fail this wait instead of passing
            inside_first_fold.set()
            assert ahead_done.wait(WAIT), "the next file was not hashed during the fold"
        out = fold(basis, path, **kwargs)
        events.append(("folded", Path(path).name))
        return out

    monkeypatch.setattr(Basis, "fold_checkpoint", logged_fold)
    cfg = config.load(write_config(tmp_path, base_cfg, "ahead"))
    counts = backfill(cfg, files, lambda _: None, workers=1)
    assert counts["folded"] == 3
    names = [p.name for p in files]
    at = {event: i for i, event in enumerate(events)}
    assert [e for e in events if e[0] == "inline"] == [("inline", names[0])]   # the others were hashed ahead
    assert at["fold", names[0]] < at["ahead", names[1]] < at["folded", names[0]]   # during the first fold
    assert at["folded", names[0]] < at["ahead", names[2]] < at["folded", names[2]]  # one file ahead, no more
    assert len(events) == 9
    ours, reference = Basis.open(cfg.paths.basis_dir), Basis.open(reference_cfg.paths.basis_dir)
    assert snapshot_equal(ours.load(), reference.load())
    assert [r.sha256 for r in ours.ledger()] == [r.sha256 for r in reference.ledger()]


def test_a_file_changed_after_its_prefetch_is_hashed_again(tiny_base, make_checkpoint, tmp_path, monkeypatch):
    base_cfg, _ = tiny_base
    first, second, other = (make_checkpoint(s) for s in (71, 72, 73))
    events: list[tuple[str, str]] = []
    record_hashes(monkeypatch, events)
    cfg = config.load(write_config(tmp_path, base_cfg, "changed"))
    worker = foldworker.FoldWorker(cfg, *load_base(cfg), keep=True)
    worker.prefetch(second)
    assert worker.process(first).result == "folded"
    shutil.copyfile(other, tmp_path / "new.tmp")
    os.replace(tmp_path / "new.tmp", second)   # other bytes under the prefetched name, after its hash
    assert worker.process(second).result == "folded"
    assert ("inline", second.name) in events
    assert worker.basis.ledger()[-1].sha256 == readers.file_sha256(other)


def test_the_prefetcher_hands_a_hash_only_to_its_own_file(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a" * 1000)
    b.write_bytes(b"b" * 1000)
    ahead = prefetch.Prefetcher()
    ahead.start(a)
    assert ahead.take(b) is None
    got = ahead.take(a)
    assert got is not None and got.sha256 == readers.file_sha256(a) and got.identity == readers.checkpoint_identity(a)
    assert ahead.take(a) is None             # used up


def test_the_daemon_queue_peeks_at_the_next_file_without_taking_it():
    q = FoldQueue()
    assert q.peek() is None
    q.put(Path("x"))
    q.put(Path("y"))
    assert q.peek() == Path("x") and len(q) == 2
    assert q.get(0) == Path("x") and q.peek() == Path("y")
