"""Load: a flood of small checkpoints and concurrent control clients at once (status, jobs, malformed
lines, clients that never read their replies). Everything is folded in arrival order, every client
is answered or refused in one line, and the daemon's memory stays bounded. ``benchmarks/load.py``
runs ``load_run`` with 200 checkpoints."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from safetensors.torch import save_file
from test_daemon import files, read_ledger, start, stop, vm_kib, wait_for, wait_ready, write_config

from axis_stream import config
from axis_stream.service import api
from axis_stream.testing import finetuned_like

MALFORMED = [b"not json\n", b"[1, 2]\n", b'{"op": 5}\n', b'{"op": "nope"}\n', b'{"op": "jobs.show", "args": {}}\n',
             b"\xff\xfe\x00\n", b'{"op": "status", "args": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n",
             b"x" * (api.MAX_REQUEST_BYTES + 10) + b"\n"]


def _lines(conn: socket.socket, n: int) -> list[dict]:
    """Read ``n`` reply lines from ``conn``."""
    data = b""
    while data.count(b"\n") < n:
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("closed by the daemon")
        data += chunk
    return [json.loads(line) for line in data.splitlines()[:n]]


def load_run(root: Path, base_cfg: config.BaseConfig, base: dict, checkpoints: int, clients: int = 20) -> dict:
    """Drop ``checkpoints`` visual-only checkpoints in one burst while ``clients`` control clients run
    (kinds in turn: status, jobs, malformed, never-reads); check order, answers and memory; return figures."""
    cfg_path = write_config(root, base_cfg)
    cfg = config.load(cfg_path, env={})
    staging = root / "staging"
    staging.mkdir()
    names = [f"drop-{i:03d}.safetensors" for i in range(checkpoints)]
    for i, name in enumerate(names):
        save_file({k: v for k, v in finetuned_like(base, i).items() if k.startswith("visual.")}, staging / name)
    proc = start(cfg_path)
    stats: dict[str, dict[str, float]] = {}
    lock = threading.Lock()
    done = threading.Event()

    def record(kind: str, outcome: str, seconds: float = 0.0, n: int = 1) -> None:
        with lock:
            s = stats.setdefault(kind, {"clients": 0})
            s[outcome] = s.get(outcome, 0) + n
            s["max_s"] = max(s.get("max_s", 0.0), seconds)

    def status_client() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            api.request(cfg.paths.socket, "status")
            record("status", "answered", time.monotonic() - t0)

    def jobs_client() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            api.request(cfg.paths.socket, "jobs.list", limit=10)
            try:
                api.request(cfg.paths.socket, "jobs.show", id="j000000-000000-00")
            except api.AxisError as exc:
                assert "no job" in str(exc)
                record("jobs", "refused")
            record("jobs", "answered", time.monotonic() - t0)

    def malformed_client() -> None:
        while not done.is_set():
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(60)
                conn.connect(str(cfg.paths.socket))
                for line in MALFORMED:
                    t0 = time.monotonic()
                    conn.sendall(line)
                    (reply,) = _lines(conn, 1)
                    assert reply["ok"] is False and "\n" not in reply["error"], reply
                    record("malformed", "refused", time.monotonic() - t0)

    def silent_client() -> None:
        """Sends requests and never reads: the daemon's replies fill the socket buffers, then its send blocks."""
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(cfg.paths.socket))
        conn.setblocking(False)
        sent = 0
        request = json.dumps({"op": "status", "args": {}}).encode() + b"\n"
        while not done.is_set():
            try:
                sent += conn.send(request)
            except BlockingIOError:
                done.wait(0.05)
        record("never-reads", "requests sent", n=sent // len(request))
        conn.close()

    kinds = [("status", status_client), ("jobs", jobs_client), ("malformed", malformed_client),
             ("never-reads", silent_client)]
    errors: list[BaseException] = []

    def run(fn) -> None:
        try:
            fn()
        except BaseException as exc:          # reported by the caller, with the kind
            errors.append(exc)

    try:
        wait_ready(proc, cfg)
        rss_ready = vm_kib(proc.pid, "VmRSS")
        threads = []
        for i in range(clients):
            kind, fn = kinds[i % len(kinds)]
            stats.setdefault(kind, {"clients": 0})["clients"] += 1
            threads.append(threading.Thread(target=run, args=(fn,), daemon=True))
        [t.start() for t in threads]
        t0 = time.monotonic()
        for name in names:                    # renamed in one after another: arrival order = this order
            os.rename(staging / name, cfg.paths.watch_dir / name)
        wait_for(lambda: len(read_ledger(cfg)) == checkpoints or errors, 60 + 3 * checkpoints, "every fold", proc)
        fold_s = time.monotonic() - t0
        hwm = vm_kib(proc.pid, "VmHWM")
        daemon_threads = len(os.listdir(f"/proc/{proc.pid}/task"))
        done.set()
        [t.join(60) for t in threads]
        t1 = time.monotonic()
        assert stop(proc) == 0                # with the never-reading clients' replies still unsent
        stop_s = time.monotonic() - t1
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
    assert not errors, errors
    assert [e["file"] for e in read_ledger(cfg)] == names
    assert files(cfg.paths.watch_dir) == [] and files(cfg.paths.quarantine) == []
    assert all(s.get("answered", 0) + s.get("refused", 0) + s.get("requests sent", 0) > 0 for s in stats.values())
    return {"checkpoints": checkpoints, "fold_s": fold_s, "rss_ready_kib": rss_ready, "hwm_kib": hwm,
            "daemon_threads": daemon_threads, "stop_s": stop_s, "clients": stats}


def test_a_flood_of_checkpoints_and_twenty_clients_at_once(tiny_base, tmp_path):
    base_cfg, base = tiny_base
    figures = load_run(tmp_path, base_cfg, base, checkpoints=30)
    assert (figures["hwm_kib"] - figures["rss_ready_kib"]) < 256 * 1024, figures     # bounded: no growth per file
    assert figures["stop_s"] < 30, figures
