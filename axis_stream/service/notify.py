"""systemd's notify protocol without a library: datagrams to ``$NOTIFY_SOCKET``.

``READY=1`` once the start-up rescan is done, ``WATCHDOG=1`` from the fold loop while it is
healthy (also after each chunk of a checkpoint hashed or read: a 50 GB file takes a minute),
``STOPPING=1`` on shutdown. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
A socket name starting with ``@`` is in the abstract namespace (a leading NUL byte).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping


def send(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notify datagram (e.g. ``"READY=1"``); False when not under systemd or it fails."""
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WatchdogSec``), or None when no watchdog is set.

    systemd sets ``WATCHDOG_USEC`` and ``WATCHDOG_PID``; a PID that is not ours means the variables
    were inherited from a parent and are not meant for this process.
    """
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Watchdog:
    """Sends WATCHDOG=1 at most once per interval; the caller pings from the loop whose health it vouches for."""

    def __init__(self, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.env = os.environ if env is None else env
        self.interval = watchdog_interval(self.env)
        self._clock = clock
        self._last = float("-inf")

    def ping(self) -> bool:
        """Send WATCHDOG=1 if the interval has passed since the last ping; True when one was sent."""
        if self.interval is None:
            return False
        now = self._clock()
        if now - self._last < self.interval:
            return False
        self._last = now
        return send("WATCHDOG=1", self.env)
