"""service/foldworker.py without the daemon around it: what each thing a folder can hold or a disk can
do makes of a file (folded, left for a retry, quarantined and why), with faults injected where they
happen (the safetensors writer, the quarantine move) and the clock driven by hand."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest
from safetensors import SafetensorError
from safetensors.torch import save_file

from axis_stream import config
from axis_stream.service import foldworker
from axis_stream.service.foldworker import REJECT_REASONS, FoldWorker, retry_cause
from axis_stream.service.metrics import Metrics
from axis_stream.testing import daemon_config, finetuned_like
from tests.test_daemon import base_section

# what the safetensors writer raises on a full disk (as seen on a 1 MB tmpfs)
ENOSPC_FROM_WRITER = "Error while serializing: I/O error: No space left on device (os error 28)"


def write_config(root: Path, base_cfg: config.BaseConfig, **watch) -> Path:
    return daemon_config(root / "axis-stream.toml", base_section(base_cfg), watch)


@pytest.fixture
def worker_setup(tiny_base, tmp_path):
    """``make(**watch) -> (worker, cfg)`` and ``ckpt(seed, name) -> path`` in the watched folder."""
    base_cfg, base = tiny_base

    def make(**watch) -> tuple[FoldWorker, config.Config]:
        cfg = config.load(write_config(tmp_path, base_cfg, **watch), env={})
        cfg.paths.watch_dir.mkdir(parents=True, exist_ok=True)
        return FoldWorker(cfg, base, {"name": "axis-tiny", "pretrained": ""}, Metrics(REJECT_REASONS)), cfg

    def ckpt(cfg: config.Config, seed: int, name: str) -> Path:
        path = cfg.paths.watch_dir / name
        save_file(finetuned_like(base, seed), path)
        return path

    return make, ckpt


def quarantine_entries(cfg: config.Config) -> list[str]:
    q = cfg.paths.quarantine
    return sorted(os.listdir(q)) if q.exists() else []


# -- 1. disk full -----------------------------------------------------------------------------------

def test_disk_full_in_the_safetensors_writer_leaves_the_file_for_a_retry(worker_setup, monkeypatch):
    make, ckpt = worker_setup
    worker, cfg = make()
    assert worker.process(ckpt(cfg, 1, "a.safetensors")).result == "folded"
    version = worker.basis.version

    def full(*args, **kwargs):
        raise SafetensorError(ENOSPC_FROM_WRITER)

    monkeypatch.setattr("axis_stream.store.basis.save_file", full)
    b = ckpt(cfg, 2, "b.safetensors")
    out = worker.process(b)
    assert (out.result, out.reason) == ("error", None) and b.exists(), out
    assert "no_space" in out.message and "os error 28" in out.message
    assert quarantine_entries(cfg) == []
    m = worker.metrics
    assert m.retries.labels("no_space")._value.get() == 1 and m.rejects.labels("internal_error")._value.get() == 0
    monkeypatch.undo()
    assert worker.process(b).result == "folded" and worker.basis.version == version + 1    # the retry folds it


@pytest.mark.parametrize("exc, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "no_space"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "no_space"),
    (PermissionError(errno.EACCES, "Permission denied"), "environment"),
    (SafetensorError(ENOSPC_FROM_WRITER), "no_space"),
    (SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)"), "environment"),
    (sqlite3.OperationalError("database or disk is full"), "no_space"),
    (sqlite3.OperationalError("disk I/O error"), "environment"),
    (RuntimeError("a bug"), None),
    (SafetensorError("invalid header"), None),
])
def test_retry_cause_names_every_environmental_failure(exc, cause):
    assert retry_cause(exc) == cause


def test_a_failed_quarantine_move_leaves_no_debris_and_the_file_in_place(worker_setup, monkeypatch):
    """An internal error whose quarantine is on another filesystem that is full: no partial ``.X.tmp``,
    no orphan ``.reason``, the file stays where it was (counted as a retry)."""
    make, ckpt = worker_setup
    worker, cfg = make()
    a = ckpt(cfg, 1, "a.safetensors")
    monkeypatch.setattr(worker, "_fold", lambda path: (_ for _ in ()).throw(RuntimeError("a bug")))
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == a:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    def copyfile(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(foldworker.os, "replace", replace)
    monkeypatch.setattr(foldworker.shutil, "copyfile", copyfile)
    out = worker.process(a)
    assert out.result == "error" and a.exists() and "could not be quarantined" in out.message
    assert quarantine_entries(cfg) == []
    assert worker.metrics.retries.labels("no_space")._value.get() == 1


def test_a_folder_copied_across_filesystems_into_a_full_quarantine_leaves_no_partial_copy(tmp_path, monkeypatch):
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "q").mkdir()
    real_replace = os.replace
    monkeypatch.setattr(foldworker.os, "replace", lambda s, d: (_ for _ in ()).throw(
        OSError(errno.EXDEV, "cross-device")) if Path(s) == src else real_replace(s, d))

    def copytree(s, d):
        Path(d).mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(foldworker.shutil, "copytree", copytree)
    with pytest.raises(OSError):
        foldworker.move_into(src, tmp_path / "q" / "model")
    assert os.listdir(tmp_path / "q") == [] and (src / "model.safetensors").exists()


# -- 2. a file written slowly in place -------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_file_written_slowly_in_place_waits_and_folds_once_whole(worker_setup):
    """Pauses longer than stable_interval_s: every look at the short file says "waiting", never
    quarantined while it keeps growing, even past incomplete_timeout_s in all; folded once whole."""
    make, ckpt = worker_setup
    worker, cfg = make(incomplete_timeout_s=30.0)
    worker.wait_incomplete, worker.clock = True, Clock()
    whole = ckpt(cfg, 1, "slow.safetensors").read_bytes()
    path = cfg.paths.watch_dir / "slow.safetensors"
    for n in range(1, 10):                   # 9 chunks, 20 s apart: 180 s > incomplete_timeout_s in all
        path.write_bytes(whole[: len(whole) * n // 10])
        out = worker.process(path)
        assert (out.result, out.reason) == ("waiting", "truncated") and path.exists(), out
        assert "slow.safetensors" in worker.waiting()
        worker.clock.now += 20
    assert quarantine_entries(cfg) == [] and worker.metrics.rejects.labels("truncated")._value.get() == 0
    path.write_bytes(whole)
    assert worker.process(path).result == "folded" and worker.waiting() == {}


def test_a_short_file_unchanged_for_incomplete_timeout_s_is_quarantined_as_truncated(worker_setup):
    make, ckpt = worker_setup
    worker, cfg = make(incomplete_timeout_s=30.0)
    worker.wait_incomplete, worker.clock = True, Clock()
    path = ckpt(cfg, 1, "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    assert worker.process(path).result == "waiting"
    worker.clock.now += 29
    assert worker.process(path).result == "waiting" and worker.waiting() == {"cut.safetensors": 29.0}
    worker.clock.now += 1
    out = worker.process(path)
    assert (out.result, out.reason) == ("rejected", "truncated") and not path.exists()
    assert "watch.incomplete_timeout_s" in (cfg.paths.quarantine / "cut.safetensors.reason").read_text()
    assert worker.waiting() == {}


def test_backfill_and_other_callers_without_wait_incomplete_quarantine_a_short_file_at_once(worker_setup):
    make, ckpt = worker_setup
    worker, cfg = make()
    path = ckpt(cfg, 1, "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    assert (worker.process(path).result, cfg.watch.incomplete_timeout_s) == ("rejected", 600.0)


# -- 3. an incomplete Hugging Face folder ---------------------------------------------------------

def test_an_incomplete_folder_is_shown_waiting_with_its_cause_then_quarantined(worker_setup, tmp_path):
    """config.json and no weights, copied in without a rename: listed as waiting (status, the gauge)
    with the real cause, reported after incomplete_timeout_s, and quarantined naming it."""
    from axis_stream.service.daemon import Daemon
    from axis_stream.service.watcher import Watcher

    make, _ = worker_setup
    worker, cfg = make(incomplete_timeout_s=30.0)
    folder = cfg.paths.watch_dir / "half-copied"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "clip"}')
    clock = Clock()
    arrived: list[Path] = []
    w = Watcher(cfg.paths.watch_dir, arrived.append, stable_interval_s=2.0, rescan_interval_s=1e9,
                incomplete_timeout_s=30.0, clock=clock)
    w.scan()
    clock.now += 3
    w.tick()
    assert arrived == [] and w.waiting()["half-copied"]["cause"].startswith("no weights: none of model.safetensors")
    daemon = Daemon(cfg, env={})
    daemon.watcher, daemon.worker = w, worker
    assert daemon.status()["waiting"]["half-copied"]["cause"].startswith("no weights")
    daemon.metrics.waiting.set_function(lambda: len(daemon.waiting()))
    assert b"axis_stream_watch_waiting 1.0" in daemon.metrics.exposition()
    clock.now += 28                  # unchanged 31 s: the stable interval + 29 s
    w.tick()
    assert arrived == []
    clock.now += 1
    w.tick()
    assert arrived == [folder] and w.waiting() == {}
    out = worker.process(folder)
    assert (out.result, out.reason) == ("rejected", "not_a_checkpoint") and "no weights" in out.message
    assert (cfg.paths.quarantine / "half-copied.reason").read_text().startswith("no weights")


def test_a_folder_lacking_config_json_says_so(tmp_path, tiny_base):
    from axis_stream.store import readers

    _, base = tiny_base
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(finetuned_like(base, 1), folder / "model.safetensors")
    assert readers.hf_folder_incomplete(folder) == "no config.json"
    (folder / "config.json").write_text("{}")
    assert readers.hf_folder_incomplete(folder) is None and readers.hf_folder_complete(folder)


# -- 4. a file name that is not UTF-8 --------------------------------------------------------------

def test_a_file_name_that_is_not_utf8_folds_and_is_stored_and_logged_safely(worker_setup, tmp_path, caplog):
    import logging

    from axis_stream.service.daemon import setup_logging
    from axis_stream.store.ledger import FILE

    make, ckpt = worker_setup
    worker, cfg = make()
    raw = b"\xff\xfe\x80good.safetensors"
    tmp = ckpt(cfg, 1, ".tmp-upload")
    os.rename(tmp, os.path.join(os.fsencode(cfg.paths.watch_dir), raw))
    path = cfg.paths.watch_dir / os.fsdecode(raw)
    log_file = tmp_path / "axis.log"
    cfg.paths.log_file = log_file
    setup_logging(cfg, stderr=False)
    try:
        out = worker.process(path)
        logging.getLogger().handlers[0].flush()
    finally:
        logging.getLogger().handlers.clear()
    assert out.result == "folded", out
    assert not os.path.exists(os.path.join(os.fsencode(cfg.paths.watch_dir), raw))
    (record,) = worker.basis.ledger()
    assert record.file == os.fsdecode(raw)                     # the ledger's JSON keeps the name exactly
    rows = sqlite3.connect(next(cfg.paths.basis_dir.rglob(FILE))).execute("SELECT file FROM sources").fetchall()
    assert rows == [("\\xff\\xfe\\x80good.safetensors",)]
    assert "folded \\xff\\xfe\\x80good.safetensors into v1" in log_file.read_text(encoding="utf-8")
    # the same bytes under the same name again (a discard lost to a crash): found in the ledger
    ckpt(cfg, 1, ".tmp-upload").rename(path)
    assert worker.process(path).result == "already_folded"
    from axis_stream import render

    assert "\\xff\\xfe\\x80good.safetensors" in "\n".join(render.history_lines(worker.basis))


# -- 5. a name at NAME_MAX, 6. a FIFO -------------------------------------------------------------

def test_a_bad_file_with_a_255_byte_name_is_quarantined_under_a_name_that_fits(worker_setup):
    make, _ = worker_setup
    worker, cfg = make()
    name = "é" * 60 + "x" * (255 - 120 - len(".safetensors")) + ".safetensors"
    assert len(os.fsencode(name)) == 255
    path = cfg.paths.watch_dir / name
    path.write_bytes(b"not a checkpoint at all" * 10)
    for _ in range(2):                       # the second of the same name gets its own shortened name
        out = worker.process(path)
        assert (out.result, out.reason) == ("rejected", "not_a_checkpoint") and not path.exists(), out
        path.write_bytes(b"not a checkpoint at all" * 10)
    names = quarantine_entries(cfg)
    assert len(names) == 4 and all(len(os.fsencode(n)) <= 255 - 14 for n in names), names
    notes = [n for n in names if n.endswith(".reason")]
    assert all(n.endswith(".safetensors.reason") and "~" in n for n in notes)
    assert all(f"[name={name}]" in (cfg.paths.quarantine / n).read_text() for n in notes)
    assert foldworker.fit_name(cfg.paths.quarantine, "short.pt") == "short.pt"


def test_a_fifo_named_like_a_checkpoint_is_quarantined_unread(worker_setup):
    from axis_stream.service.watcher import Watcher

    make, _ = worker_setup
    worker, cfg = make()
    path = cfg.paths.watch_dir / "pipe.safetensors"
    os.mkfifo(path)
    arrived: list[Path] = []
    Watcher(cfg.paths.watch_dir, arrived.append, rescan_interval_s=1e9).scan()
    assert arrived == [path]                 # reported, not left on the stability clock forever
    out = worker.process(path)               # (opening a FIFO for reading would block this test)
    assert (out.result, out.reason) == ("rejected", "special_file") and "FIFO" in out.message
    assert quarantine_entries(cfg) == ["pipe.safetensors", "pipe.safetensors.reason"]
    assert os.path.exists(cfg.paths.quarantine / "pipe.safetensors") and not os.path.lexists(path)


# -- 7. log injection -------------------------------------------------------------------------------

def test_printable_escapes_what_could_forge_a_line_or_drive_a_terminal():
    from axis_stream.text import printable

    assert printable("cars.safetensors") == "cars.safetensors" and printable("été.pt") == "été.pt"
    assert printable("a\nINFO x: folded FAKE") == "a\\nINFO x: folded FAKE"
    assert printable("\x1b[31mred\r\t\u202e") == "\\x1b[31mred\\r\\t\\u202e"
    assert printable(os.fsdecode(b"\xffa")) == "\\xffa"


def test_a_newline_or_ansi_escape_in_a_file_name_reaches_no_log_line_raw(worker_setup, caplog):
    from axis_stream import render

    make, ckpt = worker_setup
    worker, cfg = make()
    forged = "x.safetensors\nINFO axis_stream.service.daemon: folded FAKE.safetensors \x1b[2J.safetensors"
    bad = cfg.paths.watch_dir / forged
    bad.write_bytes(b"garbage" * 20)
    good = ckpt(cfg, 1, "ok\x1b[31m\n.safetensors")
    with caplog.at_level("INFO", logger="axis_stream"):
        assert worker.process(bad).result == "rejected"
        assert worker.process(good).result == "folded"
    messages = [r.getMessage() for r in caplog.records]
    assert messages and not any("\n" in m or "\x1b" in m for m in messages), messages
    assert any(m.startswith("rejected x.safetensors\\nINFO axis_stream") for m in messages)
    history = "\n".join(render.history_lines(worker.basis))
    assert "ok\\x1b[31m\\n.safetensors" in history and "\x1b" not in history
    notes = [n for n in quarantine_entries(cfg) if n.endswith(".reason")]
    assert all("\n" not in (cfg.paths.quarantine / n).read_text().rstrip("\n") for n in notes)


# -- 8. file modes and byte-identical exports ------------------------------------------------------

def test_state_files_get_owner_and_group_modes_whatever_the_umask(worker_setup):
    from axis_stream.service.jobs.records import JobStore
    from axis_stream.store.statelock import lock_state

    make, ckpt = worker_setup
    old = os.umask(0o022)
    try:
        worker, cfg = make()
        assert worker.process(ckpt(cfg, 1, "a.safetensors")).result == "folded"
        bad = cfg.paths.watch_dir / "bad.safetensors"
        bad.write_bytes(b"garbage" * 20)
        assert worker.process(bad).result == "rejected"
        JobStore(cfg.paths.state_dir / "jobs.sqlite")
        with lock_state(cfg.paths.state_dir, "test"):
            pass
    finally:
        os.umask(old)
    basis = cfg.paths.basis_dir
    version = next(basis.rglob("manifest.json")).parent      # the manifest and the version's tensor files
    files = [next(basis.rglob("ledger.sqlite")), basis / "CURRENT", *version.iterdir(),
             cfg.paths.quarantine / "bad.safetensors.reason", cfg.paths.state_dir / "jobs.sqlite",
             cfg.paths.state_dir / "axis-stream.lock"]
    modes = {str(f.relative_to(cfg.paths.state_dir)): oct(f.stat().st_mode & 0o777) for f in files}
    assert len(files) > 6 and set(modes.values()) == {"0o640"}, modes
    assert oct(version.stat().st_mode & 0o777) == "0o750"


def test_exports_of_the_same_tensors_and_metadata_are_byte_identical(tmp_path):
    import hashlib

    import torch

    from axis_stream.store.export import save_sorted

    state = {"b": torch.ones(3), "a": torch.zeros(2, 2)}
    meta = {"format": "pt", "basis_version": "3", "base_sha256": "ab" * 32, "calibration": "spectral"}
    digests = set()
    for i in range(8):
        save_sorted(state, tmp_path / f"{i}.safetensors", dict(reversed(meta.items())) if i % 2 else meta)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("b"), torch.ones(3))


def test_serve_chooses_its_umask_before_it_creates_anything(monkeypatch, tmp_path):
    from axis_stream.service import daemon

    calls = []

    def stop(config, stderr=True):
        calls.append("logging")
        raise SystemExit(0)

    monkeypatch.setattr(daemon.os, "umask", lambda mask: calls.append(oct(mask)) or 0o022)
    monkeypatch.setattr(daemon, "setup_logging", stop)
    with pytest.raises(SystemExit):
        daemon.serve(config.Config())
    assert calls == ["0o27", "logging"]
