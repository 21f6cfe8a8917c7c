"""Crash-safe file writes: write to a temporary name, fsync the file, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a file someone else wrote (safetensors does not fsync) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FILE_MODE = 0o640      # every state file: the owner writes, the service group reads, others nothing
DIR_MODE = 0o750


def own_mode(path: str | Path, mode: int = FILE_MODE) -> None:
    """Set ``path``'s mode explicitly (not by the umask); a file of another owner is left as it is."""
    with contextlib.suppress(OSError):
        os.chmod(path, mode)


def atomic_write(path: str | Path, write: Callable[[Path], object], mode: int = FILE_MODE) -> Path:
    """Call ``write(tmp_path)``, fsync it, and rename it over ``path``; readers see old or new, never half.
    The file gets ``mode`` (owner and group read, by default), whatever the umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        if tmp_path.is_file():
            os.chmod(tmp_path, mode)
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Crash-safe replacement of ``path`` by ``data``."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Crash-safe replacement of ``path`` by ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if missing), released by the kernel if the process dies;
    yields whether it was got (always True when ``blocking``). Raises ``OSError`` if ``path`` cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    own_mode(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
