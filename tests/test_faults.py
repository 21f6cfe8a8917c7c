"""Faults injected into a running daemon: kill -9 at random points of a stream and of a job, and
inside folds (at a matrix chosen at random, seen in ``status``), a full and a read-only state folder,
the watched folder deleted and recreated, a checkpoint replaced while it is folded, and symlinks and
hard links in the watched folder. ``benchmarks/faults.py`` runs the kill campaigns at length
(``kill_campaign`` here, with more kills and, inside folds, a larger model whose folds take seconds)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file
from test_basis import snapshot_equal
from test_daemon import SERVE, drop, files, read_ledger, start, stop, wait_for, wait_ready, write_config
from test_jobs import process_gone

from axis_stream import config, errors
from axis_stream.cli import main
from axis_stream.service import api
from axis_stream.service.daemon import REJECT_REASONS, FoldWorker
from axis_stream.service.jobs.records import FINAL_STATES, RESTART_ERROR, JobStore
from axis_stream.service.jobs.runner import JobRunner
from axis_stream.service.metrics import Metrics
from axis_stream.store import export, ingest, readers
from axis_stream.store.basis import Basis
from axis_stream.testing import finetuned_like, wait_until

IDENTITY = {"name": "axis-tiny", "pretrained": ""}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- kill -9 at random points of a stream and of a job ----------------------------------------------

def queue_job(cfg: config.Config, rng: random.Random) -> str:
    """Queue a selftest job for the next daemon start: long enough to be running at a kill, or short."""
    runner = JobRunner(cfg, cfg.paths.basis_dir)
    try:
        return runner.submit("selftest", {"steps": rng.choice([5, 400]), "sleep_s": 0.01, "seed": rng.randrange(99)})
    finally:
        runner.shutdown()


def check_jobs_true(cfg: config.Config, daemon_alive: bool) -> dict[str, int]:
    """Every job's record says what happened: a succeeded job wrote its result, a failed one's process is
    gone, and nothing is running or queued unless a daemon lives. Returns the states counted."""
    store = JobStore(cfg.paths.state_dir / "jobs.sqlite")
    try:
        records = store.list()
    finally:
        store.close()
    counts: dict[str, int] = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
        if r.state == "succeeded":
            assert (Path(r.log_path).parent / "selftest.json").is_file(), r
        elif r.state == "failed":
            assert r.error == RESTART_ERROR, r
        elif r.state == "running" and not daemon_alive:
            wait_for(lambda r=r: r.pid is None or process_gone(r.pid), 30,
                     f"job {r.id}'s process to die with the daemon")
        assert r.state in FINAL_STATES or r.state in ("queued", "running"), r
    return counts


def check_sources(cfg: config.Config, names: set[str]) -> list[str]:
    """Every source dropped so far is in the ledger exactly once or still in the folder; returns the ledger."""
    ledger = [e["file"] for e in read_ledger(cfg)]
    assert len(ledger) == len(set(ledger)), ledger
    assert names == set(ledger) | set(files(cfg.paths.watch_dir)), (names, ledger, files(cfg.paths.watch_dir))
    assert files(cfg.paths.quarantine) == []
    return ledger


def kill_inside_a_fold(proc: subprocess.Popen, cfg: config.Config, rng: random.Random) -> tuple[str, int, int]:
    """After 0-2 folds were let finish, kill -9 the daemon once the fold in progress has folded at least m
    of its N matrices (``status``'s ``queue.progress``; m drawn from 1..N; at N/N, while its version is
    written, not once it is in the ledger); returns (file, matrices done, N)."""
    wait_ready(proc, cfg)
    target = len(read_ledger(cfg)) + rng.randint(0, 2)
    wait_for(lambda: len(read_ledger(cfg)) >= target, 300, "folds before the kill", proc)
    chosen: list[int] = []

    def reached() -> tuple[str, int, int] | None:
        queue = api.request(cfg.paths.socket, "status")["queue"]
        if not queue["progress"]:
            return None
        done, total = queue["progress"]
        if not chosen:
            chosen.append(rng.randint(1, total))
        if done < chosen[0] or (done == total and queue["current"] in {e["file"] for e in read_ledger(cfg)}):
            return None                 # not there yet, or that fold is durable already: the next one's
        return queue["current"], done, total

    seen = wait_until(reached, 300, "the fold in progress at the chosen matrix", interval=0.01, error=AssertionError,
                      alive=lambda: f"daemon exited with {proc.returncode}" if proc.poll() is not None else None)
    proc.kill()
    proc.wait(30)
    return seen


def kill_campaign(root: Path, base_cfg: config.BaseConfig, base: dict, kills: int, seed: int = 0,
                  log=lambda line: None, inside_folds: bool = False) -> dict[str, object]:
    """Start the daemon, kill -9 it at a random point, check, restart... ``kills`` times while it folds a
    stream and runs jobs; then fold the rest without kills and compare the basis with a kill-free fold of
    the same files in the ledger's order, bit for bit. Returns the figures. ``inside_folds``: every kill
    lands inside a fold (``kill_inside_a_fold``), and a fold killed before its last matrix must have
    left its file in the folder and nothing in the ledger; ``interrupted`` counts those."""
    rng = random.Random(seed)
    cfg_path = write_config(root, base_cfg)
    cfg = config.load(cfg_path, env={})
    staging = root / "staging"
    staging.mkdir()
    cfg.paths.watch_dir.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    where = {"start-up": 0, "fold": 0, "after a fold": 0} if not inside_folds else {}
    interrupted = 0
    next_seed, fold_s = 0, 0.5

    def top_up(n: int) -> None:
        nonlocal next_seed
        while len(files(cfg.paths.watch_dir)) < n:
            src = staging / f"ckpt-{next_seed:03d}.safetensors"
            save_file(finetuned_like(base, next_seed), src)
            drop(src, cfg.paths.watch_dir)
            names.add(src.name)
            next_seed += 1

    t0 = time.monotonic()
    for k in range(kills):
        top_up(5)                                # enough waiting files that a fold is caught in progress
        queue_job(cfg, rng)
        proc = start(cfg_path)
        try:
            point = "inside" if inside_folds else rng.choice(["start-up", "fold", "fold", "fold", "after a fold"])
            if point == "inside":
                victim, done, total = kill_inside_a_fold(proc, cfg, rng)
                point = f"matrix {done}/{total}"
            elif point == "start-up":
                time.sleep(rng.uniform(0, 6.0))          # a random instant of start-up (or just after)
            else:
                wait_ready(proc, cfg)
                target = len(read_ledger(cfg)) + rng.randint(0, 2)       # let 0-2 folds finish first
                wait_for(lambda target=target: len(read_ledger(cfg)) >= target, 120, "folds before the kill", proc)
                if point == "fold":                      # a random instant of the next fold
                    wait_for(lambda: api.request(cfg.paths.socket, "status")["queue"]["current"], 60,
                             "a fold in progress", proc)
                    time.sleep(rng.uniform(0, 1.5 * fold_s))
            proc.kill()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        last = [e for e in read_ledger(cfg) if e.get("seconds")]
        fold_s = float(last[-1]["seconds"]) if last else fold_s
        ledger = check_sources(cfg, names)
        check_jobs_true(cfg, daemon_alive=False)
        if inside_folds and (victim not in ledger or done < total):    # before its last matrix: not durable
            assert victim not in ledger and victim in files(cfg.paths.watch_dir), (point, victim, ledger)
            interrupted += 1
        elif inside_folds:                              # durable between the last look and the kill
            point += " (durable before the kill)"
        where[point] = where.get(point, 0) + 1
        log(f"kill {k + 1}/{kills} at {point}: {len(ledger)} folded, {len(files(cfg.paths.watch_dir))} waiting")
    proc = start(cfg_path)                       # the end: no kill, everything folds, jobs end
    try:
        wait_ready(proc, cfg)
        wait_for(lambda: len(read_ledger(cfg)) == len(names) and not files(cfg.paths.watch_dir), 120,
                 "every source folded", proc)
        wait_for(lambda: all(j["state"] in FINAL_STATES for j in api.request(cfg.paths.socket, "jobs.list",
                                                                             limit=10_000)["jobs"]),
                 120, "every job ended", proc)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    ledger = check_sources(cfg, names)
    assert sorted(ledger) == sorted(names)
    jobs = check_jobs_true(cfg, daemon_alive=False)
    campaign_s = time.monotonic() - t0

    # The kill-free run: the same files folded by `axis-stream fold` in the ledger's order, with the
    # daemon's thread setting (OMP_NUM_THREADS=1), into a fresh state folder.
    ref_dir = root / "reference" / "basis"
    fold = [sys.executable, "-c", "from axis_stream.cli import main; main()", "fold",
            *[str(staging / name) for name in ledger], "--config", str(cfg_path), "--basis", str(ref_dir)]
    done = subprocess.run(fold, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    daemon_basis, reference = Basis.open(cfg.paths.basis_dir), Basis.open(ref_dir)
    assert [r.sha256 for r in daemon_basis.ledger()] == [r.sha256 for r in reference.ledger()]
    assert snapshot_equal(daemon_basis.load(), reference.load())          # bit for bit
    return {"kills": kills, "where": where, "interrupted": interrupted, "sources": len(names), "jobs": jobs,
            "seconds": campaign_s, "fold_s": fold_s}


def test_kill_9_at_random_points_loses_nothing_folds_nothing_twice_and_jobs_stay_true(tiny_base, tmp_path):
    base_cfg, base = tiny_base
    figures = kill_campaign(tmp_path, base_cfg, base, kills=2, seed=7)
    assert figures["sources"] >= 3 and sum(figures["jobs"].values()) == 2


def test_kill_9_inside_folds_loses_nothing_and_folds_nothing_twice(tiny_base, tmp_path):
    """Each kill lands while a fold is in progress (at a matrix drawn at random, seen in ``status``):
    the killed fold leaves its file in the folder and nothing in the ledger; every file folds once."""
    base_cfg, base = tiny_base
    figures = kill_campaign(tmp_path, base_cfg, base, kills=2, seed=3, inside_folds=True)
    assert sum(figures["where"].values()) == 2 and all(p.startswith("matrix ") for p in figures["where"])
    assert figures["interrupted"] >= 1 and figures["sources"] >= 5


# -- a full and a read-only state folder ------------------------------------------------------------

@pytest.fixture
def small_state(tmp_path):
    """A 16 MiB tmpfs as the state folder (needs root and mount; skipped where it is not permitted)."""
    state = tmp_path / "state"
    state.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the state folder (needs root): {mount.stderr.strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its filesystem is full."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def test_a_full_then_read_only_state_folder_fails_the_fold_keeps_the_file_and_folds_it_later(
        tiny_base, tmp_path, small_state):
    base_cfg, base = tiny_base
    cfg_path = write_config(tmp_path, base_cfg)
    cfg = config.load(cfg_path, env={})
    staging = tmp_path / "staging"
    staging.mkdir()
    sources = []
    for seed in range(3):
        sources.append(staging / f"ckpt-{seed}.safetensors")
        save_file(finetuned_like(base, seed), sources[-1])
    proc = start(cfg_path)
    try:
        wait_ready(proc, cfg)
        drop(sources[0], cfg.paths.watch_dir)
        wait_for(lambda: len(read_ledger(cfg)) == 1, 60, "the first fold", proc)
        current = (cfg.paths.basis_dir / "CURRENT").read_text()

        filler = fill(small_state)                       # disk full
        drop(sources[1], cfg.paths.watch_dir)
        wait_for(lambda: api.request(cfg.paths.socket, "status")["folds"]["error"] >= 1, 60, "the failed fold", proc)
        assert files(cfg.paths.watch_dir) == [sources[1].name]                  # the file stays
        assert (cfg.paths.basis_dir / "CURRENT").read_text() == current          # the old version
        status = api.request(cfg.paths.socket, "status")
        assert "No space left on device" in status["last_error"] and status["basis"]["version"] == 1
        filler.unlink()                                   # space returns: the next rescan folds it
        wait_for(lambda: len(read_ledger(cfg)) == 2 and not files(cfg.paths.watch_dir), 60, "the retried fold", proc)

        # Read-only under the running daemon (a read-only bind mount over the basis: the kernel refuses
        # to remount the whole folder read-only while the daemon has files open for writing).
        basis = str(cfg.paths.basis_dir)
        subprocess.run(["mount", "--bind", basis, basis], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", basis], check=True)
            drop(sources[2], cfg.paths.watch_dir)
            wait_for(lambda: api.request(cfg.paths.socket, "status")["folds"]["error"] >= 2, 60, "the refused fold",
                     proc)
            assert files(cfg.paths.watch_dir) == [sources[2].name] and len(read_ledger(cfg)) == 2
            assert "Read-only file system" in api.request(cfg.paths.socket, "status")["last_error"]
        finally:
            subprocess.run(["umount", basis], check=True)
        wait_for(lambda: len(read_ledger(cfg)) == 3 and not files(cfg.paths.watch_dir), 60, "the fold once writable",
                 proc)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [e["file"] for e in read_ledger(cfg)] == [s.name for s in sources]
    assert not [p for p in (cfg.paths.basis_dir / "versions").iterdir() if p.name.startswith(".")]

    # Starting on a read-only state folder: one line, nothing changed. Inspecting it there works (no daemon,
    # so no -shm beside the ledger, which SQLite cannot create there); a rollback refuses with one line.
    subprocess.run(["mount", "-o", "remount,ro", str(small_state)], check=True)
    try:
        refused = subprocess.run(SERVE + [str(cfg_path)], capture_output=True, text=True, timeout=60)
        runner, where = CliRunner(), ["--basis", str(cfg.paths.basis_dir)]
        history = runner.invoke(main, ["basis", "history", *where])
        show = runner.invoke(main, ["basis", "show", *where])
        rollback = runner.invoke(main, ["basis", "rollback", "1", *where])
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_state)], check=True)
    assert refused.returncode == 1
    assert refused.stderr.endswith("cannot open the state-folder lock: Read-only file system\n")
    assert refused.stderr.count("\n") == 1
    assert history.exit_code == 0 and all(s.name in history.output for s in sources), history.output
    assert show.exit_code == 0 and "share of the kept energy by source" in show.output, show.output
    assert rollback.exit_code == 1 and rollback.output.strip().endswith("Read-only file system")


# -- the watched folder: deleted and recreated, symlinks, hard links, a file replaced mid-fold ----------

def test_the_watched_folder_deleted_and_recreated_while_running_keeps_folding(tiny_base, tmp_path):
    base_cfg, base = tiny_base
    cfg_path = write_config(tmp_path, base_cfg)
    cfg = config.load(cfg_path, env={})
    staging = tmp_path / "staging"
    staging.mkdir()
    proc = start(cfg_path)
    try:
        wait_ready(proc, cfg)
        shutil.rmtree(cfg.paths.watch_dir)
        wait_for(lambda: "cannot list" in Path(proc.log_path).read_text(), 30, "a rescan of the missing folder", proc)
        cfg.paths.watch_dir.mkdir()
        src = staging / "after.safetensors"
        save_file(finetuned_like(base, 5), src)
        drop(src, cfg.paths.watch_dir)
        wait_for(lambda: [e["file"] for e in read_ledger(cfg)] == [src.name], 60, "the fold after the recreate", proc)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def worker(tiny_base, tmp_path):
    """A FoldWorker on a temporary state folder (no daemon) and a function writing checkpoints."""
    base_cfg, base = tiny_base
    cfg = config.load(write_config(tmp_path, base_cfg), env={})
    cfg.paths.watch_dir.mkdir()

    def ckpt(folder: Path, seed: int, name: str) -> Path:
        folder.mkdir(exist_ok=True)
        save_file(finetuned_like(base, seed), folder / name)
        return folder / name

    return FoldWorker(cfg, base, IDENTITY, Metrics(REJECT_REASONS)), cfg, ckpt


def test_symlinks_are_quarantined_unread_and_hard_links_fold_as_files(worker, tmp_path):
    fw, cfg, ckpt = worker
    inbox, outside = cfg.paths.watch_dir, tmp_path / "outside"
    target = ckpt(outside, 1, "target.safetensors")
    keep = target.read_bytes()
    (inbox / "out.safetensors").symlink_to(target)                       # out of the folder
    inner = ckpt(inbox, 2, ".inner.safetensors")
    (inbox / "in.safetensors").symlink_to(inner)                         # inside it
    for name in ("out.safetensors", "in.safetensors"):
        out = fw.process(inbox / name)
        assert (out.result, out.reason) == ("rejected", "symlink"), out
        assert (cfg.paths.quarantine / name).is_symlink()                # the link moved, not its target
        assert "symbolic link" in (cfg.paths.quarantine / f"{name}.reason").read_text()
    assert target.read_bytes() == keep and inner.exists() and fw.basis is None     # nothing read or folded
    os.link(target, inbox / "hard.safetensors")                         # a hard link is an ordinary file
    assert fw.process(inbox / "hard.safetensors").result == "folded"
    assert not (inbox / "hard.safetensors").exists() and target.read_bytes() == keep   # its other name stays
    assert [r.sha256 for r in fw.basis.ledger()] == [hashlib.sha256(keep).hexdigest()]
    assert fw.metrics.rejects.labels("symlink")._value.get() == 2


def test_a_checkpoint_replaced_while_it_is_folded_is_kept_and_folded_next(worker, tmp_path, monkeypatch):
    fw, cfg, ckpt = worker
    inbox = cfg.paths.watch_dir
    assert fw.process(ckpt(inbox, 1, "first.safetensors")).result == "folded"
    path = ckpt(inbox, 2, "model.safetensors")
    old = sha(path)
    newer = ckpt(tmp_path / "staging", 3, "model.safetensors")
    new = sha(newer)
    real = fw.basis.fold_checkpoint

    def fold_then_replace(p, **kwargs):
        record = real(p, **kwargs)                   # the fold reads the file it opened...
        os.replace(newer, path)                      # ...while the name is given to another file
        return record

    monkeypatch.setattr(fw.basis, "fold_checkpoint", fold_then_replace)
    out = fw.process(path)
    assert out.result == "folded" and "replaced during the fold" in out.message
    assert path.exists() and sha(path) != old                          # the new file was not discarded
    monkeypatch.undo()
    assert fw.process(path).result == "folded" and not path.exists()   # and is folded next
    assert [r.sha256 for r in fw.basis.ledger()][1:] == [old, new]


def test_a_checkpoint_replaced_between_its_open_and_its_hash_is_left_for_a_retry(worker, tmp_path, monkeypatch):
    # the race: the reader holds the old file, the hash reads the new one; recorded, the new file's sha256
    # would stand for the old file's tensors, and the new file would later be discarded as "already folded"
    fw, cfg, ckpt = worker
    inbox = cfg.paths.watch_dir
    assert fw.process(ckpt(inbox, 1, "first.safetensors")).result == "folded"
    path = ckpt(inbox, 2, "model.safetensors")
    newer = ckpt(tmp_path / "staging", 3, "model.safetensors")
    new = sha(newer)
    real = ingest.checkpoint_sha256

    def replace_then_hash(p, tick):
        if newer.exists():
            os.replace(newer, path)
        return real(p, tick)

    monkeypatch.setattr(ingest, "checkpoint_sha256", replace_then_hash)
    out = fw.process(path)
    assert out.result == "error" and "model.safetensors: changed while it was being read" in out.message, out
    assert sha(path) == new and fw.basis.count == 1 and fw.basis.version == 1       # nothing folded or lost
    monkeypatch.undo()
    assert fw.process(path).result == "folded" and not path.exists()
    assert [r.sha256 for r in fw.basis.ledger()][1:] == [new]
    # and a folder whose shard is replaced the same way, read directly
    folder = tmp_path / "hf"
    folder.mkdir()
    export.write_hf_weights(finetuned_like(fw.base_state, 4), folder, {}, max_shard_bytes=2**18)
    (folder / "config.json").write_text("{}")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    monkeypatch.setattr(ingest, "checkpoint_sha256", lambda p, tick: (os.utime(shard, ns=(1, 1)), real(p, tick))[1])
    with pytest.raises(errors.SourceChanged, match="hf: changed while it was being read"):
        ingest.read_checkpoint(folder, fw.base_state)


def test_a_checkpoint_written_to_while_it_is_read_is_left_for_a_retry_and_one_renamed_over_is_not(
        worker, tmp_path, monkeypatch):
    fw, cfg, ckpt = worker
    inbox = cfg.paths.watch_dir
    path = ckpt(inbox, 1, "model.safetensors")
    real = readers.SafetensorsFile.read
    change = {"write": True}

    def read_then_change(self, key):
        t = real(self, key)
        if change:
            if change.pop("write", False):      # the last 4 bytes (a float of the last tensor) rewritten in place
                with open(self.path, "r+b") as fh:
                    fh.seek(-4, os.SEEK_END)
                    fh.write(struct.pack("<f", 0.123))
            elif change.pop("rename", False):   # another file renamed over the name: the reader keeps the old one
                os.replace(ckpt(tmp_path / "staging", 2, "model.safetensors"), self.path)
        return t

    monkeypatch.setattr(readers.SafetensorsFile, "read", read_then_change)
    out = fw.process(path)
    assert out.result == "error" and "model.safetensors: changed while it was being read" in out.message, out
    assert path.exists() and (fw.basis is None or fw.basis.count == 0)          # nothing folded, file kept
    written = sha(path)
    change["rename"] = True
    out = fw.process(path)                      # folds what it opened (the written file), keeps the new one
    assert out.result == "folded" and "replaced during the fold" in out.message, out
    assert [r.sha256 for r in fw.basis.ledger()] == [written] and sha(path) != written
