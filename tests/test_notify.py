"""The sd_notify protocol against a fake NOTIFY_SOCKET that the test binds (plain and abstract)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from axis_stream.service import notify


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
