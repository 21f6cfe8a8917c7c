"""One writer per state folder: an exclusive ``flock`` on ``<state_dir>/axis-stream.lock`` holding its pid.

The daemon takes it first thing at start-up and holds it for its life; the commands that write state
without the daemon (``fold``, ``basis rollback``, ``adapt --local``) take it for their run. The kernel
releases it when the process dies (kill -9 included), so a stale pid in the file never blocks; the
pid is only there to say who holds it. The file is never deleted: unlinking a lock file lets two
processes lock two different inodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from axis_stream.errors import StateLocked
from axis_stream.store import atomic

LOCK_FILE = "axis-stream.lock"


class StateLock:
    """A held state-folder lock; ``release()`` (or leaving the ``with`` block) gives it up."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Give the lock up (idempotent); the pid line is cleared so the file no longer names us."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):   # a read-only or full disk: the flock, not the text, is what counts
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_state(state_dir: str | Path, command: str, hint: str = "") -> StateLock:
    """Take the exclusive lock on ``state_dir`` (created if missing) for ``command`` (e.g. "serve"), without
    waiting; raises ``StateLocked`` naming the holder's pid and command (plus ``hint``) when another has it."""
    state_dir = Path(state_dir)
    path = state_dir / LOCK_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, atomic.FILE_MODE)
        atomic.own_mode(path)
    except OSError as exc:
        raise StateLocked(f"{path}: cannot open the state-folder lock: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").split()
        os.close(fd)
        who = (f"`axis-stream {' '.join(holder[1:])}` (pid {holder[0]})" if holder
               else "another process (it has not written its pid yet)")
        raise StateLocked(f"{state_dir} is in use by {who}; one process at a time writes a state folder"
                          + (f": {hint}" if hint else "")) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
    except OSError:
        pass                        # held all the same; only the pid line for others is missing
    return StateLock(path, fd)
