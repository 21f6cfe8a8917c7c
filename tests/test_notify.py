"""The sd_notify protocol against a fake NOTIFY_SOCKET that the test binds (plain and abstract)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import uuid

import pytest
import torch
from safetensors.torch import save_file

from axis_stream import config
from axis_stream.service import notify
from axis_stream.service.foldworker import FoldWorker
from axis_stream.store import readers
from axis_stream.testing import finetuned_like


@pytest.fixture(params=["plain", "abstract"])
def notify_socket(request, tmp_path):
    """A bound datagram socket and the NOTIFY_SOCKET value that reaches it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "plain":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        value = path
    else:
        name = f"axis-stream-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        value = "@" + name
    sock.settimeout(5)
    yield sock, value
    sock.close()


def test_ready_watchdog_stopping_reach_the_socket(notify_socket):
    sock, value = notify_socket
    env = {"NOTIFY_SOCKET": value}
    for message in ("READY=1", "WATCHDOG=1", "STOPPING=1"):
        assert notify.send(message, env)
        assert sock.recv(4096).decode() == message


def test_without_notify_socket_nothing_is_sent():
    assert notify.send("READY=1", {}) is False


def test_an_unreachable_socket_is_not_an_error(tmp_path):
    assert notify.send("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert notify.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert notify.watchdog_interval({}) is None


def test_watchdog_pings_at_most_once_per_interval(notify_socket):
    sock, value = notify_socket
    now = [100.0]
    dog = notify.Watchdog({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000"}, clock=lambda: now[0])
    assert dog.ping() is True
    assert sock.recv(4096) == b"WATCHDOG=1"
    now[0] += 0.5
    assert dog.ping() is False
    now[0] += 0.6
    assert dog.ping() is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_watchdog_without_systemd_is_silent():
    assert notify.Watchdog({}).ping() is False


# -- pings while a large file is hashed and read (issue 25 item 11) ---------------------------------

class Received:
    """Drains the notify socket in a thread (a datagram socket holds only a few unread datagrams before
    the sender blocks); ``with`` it around the work, then read ``messages``."""

    def __init__(self, sock: socket.socket, value: str):
        self.sock, self.value, self.messages = sock, value, []
        self._thread = threading.Thread(target=self._drain, daemon=True)

    def _drain(self) -> None:
        while (message := self.sock.recv(4096).decode()) != "END":
            self.messages.append(message)

    def __enter__(self) -> Received:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        notify.send("END", {"NOTIFY_SOCKET": self.value})
        self._thread.join()


class Ticks:
    """A clock that moves ``step`` seconds each time it is read: time passes with the work done, not by sleeping."""

    def __init__(self, step: float):
        self.now, self.step, self.reads = 0.0, step, 0

    def __call__(self) -> float:
        self.now += self.step
        self.reads += 1
        return self.now


def test_a_long_hash_pings_the_watchdog_once_per_interval(notify_socket, tmp_path, monkeypatch):
    sock, value = notify_socket
    monkeypatch.setattr(readers, "_HASH_CHUNK", 4096)
    path = tmp_path / "large.safetensors"
    path.write_bytes(os.urandom(64 * 4096))               # 64 chunks, each a quarter of the interval
    dog = notify.Watchdog({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000"}, clock=Ticks(0.25))
    with Received(sock, value) as got:
        digest = readers.checkpoint_sha256(path, dog.ping)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert got.messages == ["WATCHDOG=1"] * 16


def test_a_tensor_larger_than_a_read_chunk_is_read_whole_with_a_tick_per_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_READ_CHUNK", 1000)
    t = torch.randn(123, 45, dtype=torch.float64)          # 44,280 bytes: 45 chunks, the last one short
    save_file({"w": t, "b": torch.ones(3)}, tmp_path / "t.safetensors")
    ticks = []
    f = readers.SafetensorsFile(tmp_path / "t.safetensors", tick=lambda: ticks.append(1))
    try:
        assert torch.equal(f.read("w"), t) and len(ticks) == 45
        assert torch.equal(f.read("b"), torch.ones(3)) and len(ticks) == 46
    finally:
        f.close()


def test_the_fold_workers_watchdog_pings_while_a_checkpoint_is_hashed_and_read(
        notify_socket, tiny_base, tmp_path, monkeypatch):
    """The daemon's wiring (``FoldWorker(progress=watchdog.ping)``) on a real socket: with a ping
    allowed at every look at the clock, the pings outnumber the hash and read chunks, where the
    per-matrix progress alone gives one per matrix."""
    sock, value = notify_socket
    base_cfg, base = tiny_base
    monkeypatch.setattr(readers, "_HASH_CHUNK", 4096)
    monkeypatch.setattr(readers, "_READ_CHUNK", 4096)
    (tmp_path / "axis-stream.toml").write_text(f"""
[paths]
state_dir = "{tmp_path / 'state'}"
watch_dir = "{tmp_path / 'incoming'}"
[base]
model = "{base_cfg.model}"
pretrained = "{base_cfg.pretrained}"
model_config = "{base_cfg.model_config}"
""")
    cfg = config.load(tmp_path / "axis-stream.toml", env={})
    cfg.paths.watch_dir.mkdir(parents=True)
    path = cfg.paths.watch_dir / "a.safetensors"
    save_file(finetuned_like(base, 1), path)
    chunks = -(-path.stat().st_size // 4096)
    clock = Ticks(1.0)
    dog = notify.Watchdog({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000"}, clock=clock)
    worker = FoldWorker(cfg, base, {"name": "axis-tiny", "pretrained": ""}, progress=dog.ping)
    with Received(sock, value) as got:
        assert worker.process(path).result == "folded"
    matrices = len(worker.basis.load().factors)
    assert chunks > 2 * matrices
    assert got.messages == ["WATCHDOG=1"] * clock.reads and len(got.messages) > 2 * chunks
