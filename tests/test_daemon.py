"""`axis-stream serve` as a real subprocess on a temporary config: arrival, folding, quarantine,
metrics, systemd notify, kill -9 recovery, and 50 checkpoints at once with bounded memory."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from axis_stream import config, errors
from axis_stream.service import api
from axis_stream.service.daemon import REJECT_REASONS, FoldQueue, FoldWorker, free_name, move_into
from axis_stream.service.metrics import Metrics
from axis_stream.store.basis import Basis
from axis_stream.testing import daemon_config, finetuned_like, wait_until

SERVE = [sys.executable, "-c", "from axis_stream.cli import main; main()", "serve", "--config"]


# -- helpers -------------------------------------------------------------------------------------

def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll ``cond()`` until it returns something truthy; fail with ``what`` (and the daemon's log) after
    ``timeout`` s, or at once if ``proc`` exits."""
    def gone() -> str | None:
        return (f"daemon exited with {proc.returncode}" if proc is not None and proc.poll() is not None else None)

    try:
        return wait_until(cond, timeout, what, alive=gone, error=AssertionError)
    except AssertionError as exc:
        pytest.fail(f"{exc}" + (f":\n{read_log(proc)}" if proc else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(root: Path, base_cfg: config.BaseConfig, **watch) -> Path:
    watch = {"stable_interval_s": 0.3, "poll_interval_s": 0.1, "rescan_interval_s": 2.0,
             "incomplete_timeout_s": 0.5, **watch}   # a short file is quarantined at the next look
    return daemon_config(root / "axis-stream.toml", base_section(base_cfg), watch, basis={"keep_versions": 3},
                         metrics=f"127.0.0.1:{free_port()}")


def base_section(base_cfg: config.BaseConfig) -> dict[str, str]:
    """The ``[base]`` table of an open_clip base built by the tests."""
    return {"model": base_cfg.model, "pretrained": str(base_cfg.pretrained), "model_config": str(base_cfg.model_config)}


def start(cfg_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(cfg_path.parent / f"serve-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 (the daemon's log)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}   # steady timings on a shared CPU
    proc = subprocess.Popen(SERVE + [str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def read_log(proc: subprocess.Popen | None) -> str:
    return Path(proc.log_path).read_text()[-6000:] if proc is not None else ""


def wait_ready(proc: subprocess.Popen, cfg: config.Config) -> None:
    wait_for(lambda: http(cfg, "/readyz")[0] == 200, 90, "/readyz", proc)


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def http(cfg: config.Config, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{cfg.metrics.address}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def metric_samples(cfg: config.Config) -> dict[tuple, float]:
    _, text = http(cfg, "/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def read_ledger(cfg: config.Config) -> list[dict]:
    """The current version's ledger, read as a plain reader (retrying if a version is pruned meanwhile)."""
    basis_dir = cfg.paths.basis_dir
    for _ in range(50):
        if not (basis_dir / "CURRENT").exists():
            return []
        try:
            basis = Basis.open(basis_dir)
        except errors.BasisError:
            continue
        try:
            return [r.to_json() for r in basis.ledger()]
        except errors.BasisError:
            pass
        finally:
            basis.close()
    raise AssertionError("could not read the ledger")


def drop(src: Path, folder: Path) -> None:
    """``cp src folder/name.partial && mv`` (keeps the original)."""
    shutil.copyfile(src, folder / (src.name + ".partial"))
    os.rename(folder / (src.name + ".partial"), folder / src.name)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


class NotifyListener:
    """A fake $NOTIFY_SOCKET: collects the datagrams the daemon sends."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def setup(tiny_base, tmp_path):
    base_cfg, base = tiny_base
    cfg_path = write_config(tmp_path, base_cfg)
    cfg = config.load(cfg_path, env={})
    staging = tmp_path / "staging"          # same filesystem as the watched folder
    staging.mkdir()

    def checkpoint(seed: int, name: str | None = None) -> Path:
        path = staging / (name or f"ckpt-{seed:02d}.safetensors")
        save_file(finetuned_like(base, seed), path)
        return path

    return cfg_path, cfg, staging, checkpoint, base


# -- the end-to-end test --------------------------------------------------------------------------

def test_serve_folds_good_files_once_quarantines_bad_ones_and_reports(setup, tmp_path):
    cfg_path, cfg, staging, checkpoint, base = setup
    listener = NotifyListener(tmp_path / "notify.sock")
    proc = start(cfg_path, {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"})
    try:
        good = [checkpoint(seed) for seed in range(5)]        # made while the daemon starts
        truncated = staging / "truncated.safetensors"
        truncated.write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
        nan_sd = finetuned_like(base, 99)
        nan_sd["visual.transformer.resblocks.0.mlp.c_fc.weight"][3, 5] = float("nan")
        save_file(nan_sd, staging / "nan.safetensors")
        wait_ready(proc, cfg)
        assert "READY=1" in listener.messages[0].split("\n")
        inbox = cfg.paths.watch_dir

        # 1: written slowly in chunks through one handle (complete at close-after-write)
        data = good[0].read_bytes()
        with open(inbox / good[0].name, "wb") as fh:
            for i in range(0, len(data), len(data) // 8 + 1):
                fh.write(data[i:i + len(data) // 8 + 1])
                fh.flush()
                time.sleep(0.05)            # a slow writer, not a wait for the daemon
        # 2: `cp x.partial && mv` (the .partial name is ignored)
        drop(good[1], inbox)
        # 3, 4: two at once
        threads = [threading.Thread(target=shutil.copyfile, args=(g, inbox / g.name)) for g in good[2:4]]
        [t.start() for t in threads]
        [t.join() for t in threads]
        # the bad ones, and 5 last
        shutil.copyfile(truncated, inbox / truncated.name)
        shutil.copyfile(staging / "nan.safetensors", inbox / "nan.safetensors")
        shutil.copyfile(good[4], inbox / good[4].name)
        wait_for(lambda: good[1].name in {e["file"] for e in read_ledger(cfg)}, 60, "the renamed file", proc)
        shutil.copyfile(good[1], inbox / "again-ckpt-01.safetensors")       # a duplicate of a folded one

        quarantine = cfg.paths.quarantine
        wait_for(lambda: len(read_ledger(cfg)) == 5 and len(files(quarantine)) == 6 and not files(inbox),
                 60, "5 folds and 3 rejects", proc)
        ledger = read_ledger(cfg)
        sha = {g.name: hashlib.sha256(g.read_bytes()).hexdigest() for g in good}
        assert sorted(e["file"] for e in ledger) == sorted(sha)
        assert all(e["sha256"] == sha[e["file"]] for e in ledger)          # each exactly once
        assert files(quarantine) == sorted(["truncated.safetensors", "truncated.safetensors.reason",
                                            "nan.safetensors", "nan.safetensors.reason",
                                            "again-ckpt-01.safetensors", "again-ckpt-01.safetensors.reason"])
        reasons = {name: (quarantine / f"{name}.reason").read_text()
                   for name in ("truncated.safetensors", "nan.safetensors", "again-ckpt-01.safetensors")}
        assert "[reason=truncated]" in reasons["truncated.safetensors"]
        assert "[reason=non_finite]" in reasons["nan.safetensors"]
        assert "[reason=duplicate]" in reasons["again-ckpt-01.safetensors"]
        assert all(r.count("\n") == 1 and "[time=" in r for r in reasons.values())

        m = metric_samples(cfg)
        assert m[("axis_stream_folds_total", (("result", "folded"),))] == 5
        assert m[("axis_stream_folds_total", (("result", "rejected"),))] == 3
        for reason in ("truncated", "non_finite", "duplicate"):
            assert m[("axis_stream_rejects_total", (("reason", reason),))] == 1, reason
        version = int((cfg.paths.basis_dir / "CURRENT").read_text().strip()[1:])
        assert m[("axis_stream_basis_version", ())] == version == ledger[-1]["version"]
        assert m[("axis_stream_sources_folded", ())] == 5
        assert m[("axis_stream_basis_size_bytes", ())] > 0
        assert m[("axis_stream_fold_duration_seconds_count", ())] == 5
        assert m[("axis_stream_watch_queue_depth", ())] == 0
        assert 0 < m[("axis_stream_last_fold_energy_kept_ratio", ())] <= 1
        assert m[("axis_stream_last_fold_success_timestamp_seconds", ())] > time.time() - 120
        assert any(k[0] == "axis_stream_build_info" for k in m)
        assert http(cfg, "/healthz")[0] == 200

        status = api.request(cfg.paths.socket, "status")
        assert status["basis"]["version"] == version and status["folds"]["folded"] == 5
        history = api.request(cfg.paths.socket, "basis.history")
        assert [e["file"] for e in history["ledger"]] == [e["file"] for e in ledger]

        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    assert "STOPPING=1" in listener.messages and "WATCHDOG=1" in listener.messages
    assert not cfg.paths.socket.exists()

    # The same five files folded offline in the ledger's order give the same basis.
    offline_dir = tmp_path / "offline"
    offline = Basis.create(offline_dir, base, cfg.basis, {"name": "axis-tiny", "pretrained": ""})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                # as in the daemon (OMP_NUM_THREADS=1): same float32 rounding
    try:
        for entry in ledger:
            offline.fold_checkpoint(staging / entry["file"])
    finally:
        torch.set_num_threads(threads)
    daemon_basis, ref = Basis.open(cfg.paths.basis_dir).load(), offline.load()
    assert daemon_basis.count == ref.count == 5
    for name, f in ref.factors.items():
        torch.testing.assert_close(daemon_basis.factors[name].to_dense().double(), f.to_dense().double(),
                                   rtol=0, atol=1e-7)
    assert sorted(daemon_basis.means) == sorted(ref.means)
    for name, mean in ref.means.items():
        torch.testing.assert_close(daemon_basis.means[name].double(), mean.double(), rtol=0, atol=1e-8)


# -- crash recovery ---------------------------------------------------------------------------------

def folding(cfg: config.Config, at_least: int) -> str | None:
    """The file being folded, if the ledger holds ``at_least`` files but not that one yet."""
    ledger = [e["file"] for e in read_ledger(cfg)]
    current = api.request(cfg.paths.socket, "status")["queue"]["current"]
    return current if len(ledger) >= at_least and current is not None and current not in ledger else None


def test_kill_9_and_sigterm_during_folds_lose_nothing_and_fold_nothing_twice(setup):
    cfg_path, cfg, staging, checkpoint, _ = setup
    proc = start(cfg_path)
    try:
        sources = [checkpoint(seed) for seed in range(8)]
        names = {s.name for s in sources}
        wait_ready(proc, cfg)
        for src in sources:
            drop(src, cfg.paths.watch_dir)
        wait_for(lambda: folding(cfg, 2), 60, "a fold in progress", proc)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    folded = [e["file"] for e in read_ledger(cfg)]
    assert len(folded) == len(set(folded)) < len(sources)
    assert names == set(folded) | set(files(cfg.paths.watch_dir))           # nothing lost

    # The state a kill between "version durable" and "file discarded" leaves: a folded file is still there.
    first = folded[0]
    shutil.copyfile(staging / first, cfg.paths.watch_dir / first)

    # Restart, then SIGTERM during a fold: that fold finishes, no other starts, the rest stay.
    proc = start(cfg_path)
    try:
        wait_ready(proc, cfg)
        in_progress = wait_for(lambda: folding(cfg, len(folded) + 1), 60, "a fold after the restart", proc)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    second_log = read_log(proc)
    folded = [e["file"] for e in read_ledger(cfg)]
    assert in_progress in folded and in_progress not in files(cfg.paths.watch_dir)
    assert len(folded) == len(set(folded)) and names == set(folded) | set(files(cfg.paths.watch_dir))

    proc = start(cfg_path)                  # and once more: the rest is folded
    try:
        wait_ready(proc, cfg)
        wait_for(lambda: len(read_ledger(cfg)) == len(sources) and not files(cfg.paths.watch_dir),
                 60, "the rest folded after the second restart", proc)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    ledger = [e["file"] for e in read_ledger(cfg)]
    assert sorted(ledger) == sorted(names)                                   # each exactly once
    assert files(cfg.paths.quarantine) == []                                 # the folded file was no duplicate
    assert "already folded" in second_log + read_log(proc)


# -- many at once -------------------------------------------------------------------------------------

def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_fifty_checkpoints_at_once_fold_in_arrival_order_with_bounded_memory(setup):
    cfg_path, cfg, staging, checkpoint, _ = setup
    proc = start(cfg_path)
    try:
        sources = [checkpoint(seed, f"drop-{49 - seed:02d}.safetensors") for seed in range(50)]
        total_bytes = sum(s.stat().st_size for s in sources)
        wait_ready(proc, cfg)
        rss_ready = vm_kib(proc.pid, "VmRSS")
        for src in sources:                 # renamed in one after another: arrival order = this order
            os.rename(src, cfg.paths.watch_dir / src.name)
        wait_for(lambda: len(read_ledger(cfg)) >= 10, 60, "10 folds", proc)
        hwm_10 = vm_kib(proc.pid, "VmHWM")
        wait_for(lambda: len(read_ledger(cfg)) == 50, 90, "50 folds", proc)
        hwm_50 = vm_kib(proc.pid, "VmHWM")
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [e["file"] for e in read_ledger(cfg)] == [s.name for s in sources]
    assert files(cfg.paths.watch_dir) == [] and files(cfg.paths.quarantine) == []
    # Folding reads one tensor at a time and keeps nothing of a folded file: the peak after 50
    # folds is what it was after 10 (the first folds already saw every code path), and the whole
    # run stays far below holding the 50 files (about 300 MB) in memory.
    assert (hwm_50 - hwm_10) * 1024 < 32 * 2**20, (hwm_10, hwm_50)
    assert (hwm_50 - rss_ready) * 1024 < total_bytes / 4, (rss_ready, hwm_50, total_bytes)


# -- pieces of the fold path, in process ------------------------------------------------------------

def test_fold_queue_is_fifo_and_holds_a_path_once():
    q = FoldQueue()
    a, b = Path("/x/a.pt"), Path("/x/b.pt")
    assert q.put(a) and q.put(b) and not q.put(a)
    assert len(q) == 2 and q.get(0.01) == a
    assert not q.put(a) and a in q                         # being folded: still held
    q.done(a)
    assert q.put(a)
    assert [q.get(0.01), q.get(0.01), q.get(0.01)] == [b, a, None]


def test_free_name_and_move_into(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "a.pt").write_bytes(b"old")
    assert free_name(tmp_path / "q", "a.pt") == tmp_path / "q" / "a-2.pt"
    assert free_name(tmp_path / "q", "b.pt") == tmp_path / "q" / "b.pt"
    src = tmp_path / "a.pt"
    src.write_bytes(b"new")
    dest = free_name(tmp_path / "q", "a.pt")
    move_into(src, dest)
    assert not src.exists() and dest.read_bytes() == b"new" and (tmp_path / "q" / "a.pt").read_bytes() == b"old"


@pytest.fixture
def worker_setup(tiny_base, tmp_path):
    """A FoldWorker on a temporary state folder, without the daemon around it."""
    base_cfg, base = tiny_base

    def make(**watch) -> tuple[FoldWorker, config.Config]:
        cfg = config.load(write_config(tmp_path, base_cfg, **watch), env={})
        cfg.paths.watch_dir.mkdir(exist_ok=True)
        return FoldWorker(cfg, base, {"name": "axis-tiny", "pretrained": ""}, Metrics(REJECT_REASONS)), cfg

    def ckpt(folder: Path, seed: int, name: str) -> Path:
        save_file(finetuned_like(base, seed), folder / name)
        return folder / name

    return make, ckpt


def test_worker_archives_and_sorts_out_duplicates_by_the_ledger(worker_setup):
    make, ckpt = worker_setup
    worker, cfg = make(discard="archive")
    inbox = cfg.paths.watch_dir
    a = ckpt(inbox, 1, "a.safetensors")
    keep = a.read_bytes()
    assert worker.process(a).result == "folded"
    assert not a.exists() and (cfg.paths.archive / "a.safetensors").read_bytes() == keep
    a.write_bytes(keep)                      # same name, same bytes: a fold whose discard was lost
    out = worker.process(a)
    assert out.result == "already_folded" and (cfg.paths.archive / "a-2.safetensors").exists()
    (inbox / "copy-of-a.safetensors").write_bytes(keep)      # same bytes, another name: a duplicate
    out = worker.process(inbox / "copy-of-a.safetensors")
    assert (out.result, out.reason) == ("rejected", "duplicate")
    assert (cfg.paths.quarantine / "copy-of-a.safetensors.reason").read_text().startswith("already folded")
    assert worker.basis.count == 1 and len(worker.basis.ledger()) == 1
    assert worker.process(inbox / "gone.safetensors").result == "vanished"


def test_worker_quarantines_internal_errors_and_keeps_files_on_environment_errors(worker_setup, monkeypatch):
    make, ckpt = worker_setup
    worker, cfg = make()
    inbox = cfg.paths.watch_dir
    assert worker.process(ckpt(inbox, 1, "a.safetensors")).result == "folded"
    version = worker.basis.version

    def boom(exc):
        def fold_checkpoint(path, **options):
            raise exc
        return fold_checkpoint

    monkeypatch.setattr(worker.basis, "fold_checkpoint", boom(OSError(28, "No space left on device")))
    b = ckpt(inbox, 2, "b.safetensors")
    out = worker.process(b)
    assert out.result == "error" and b.exists() and "No space left" in out.message      # kept for a retry
    monkeypatch.setattr(worker.basis, "fold_checkpoint", boom(RuntimeError("a bug")))
    out = worker.process(b)
    assert (out.result, out.reason) == ("error", "internal_error") and not b.exists()
    assert "RuntimeError: a bug [reason=internal_error]" in (cfg.paths.quarantine / "b.safetensors.reason").read_text()
    assert worker.basis.version == version
    m = worker.metrics
    assert m.folds.labels("error")._value.get() == 2 and m.rejects.labels("internal_error")._value.get() == 1
