"""Hashing the next checkpoint while the current one folds: at most one file ahead.

``Prefetcher.start(path)`` reads and hashes ``path`` in a background thread (``readers.checkpoint_sha256``,
which streams the file in chunks: memory is one chunk, and the file's pages are then in the page
cache for the fold's reads); ``take(path)`` waits for that hash and hands it over as ``Hashed`` with
the file's identity (device, inode, size, mtime) before and after it, so ``ingest.read_checkpoint``
uses it only for the very bytes it opens. A start for another file first waits for the one in
flight: never more than one file is read ahead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from axis_stream.store import readers


@dataclass(frozen=True)
class Hashed:
    """A checkpoint's sha256, computed while its identity stayed ``identity``."""

    path: Path
    identity: readers.Identity
    sha256: str


class Prefetcher:
    """One background hash of the next checkpoint (``start``), handed to its fold (``take``)."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._thread: threading.Thread | None = None
        self._result: Hashed | None = None

    def start(self, path: Path | None) -> None:
        """Hash ``path`` in the background (None, or the file already in flight: nothing new)."""
        if path is None or path == self._path:
            return
        self._wait()
        self._path, self._result = path, None
        self._thread = threading.Thread(target=self._hash, args=(path,), name="prefetch", daemon=True)
        self._thread.start()

    def take(self, path: Path) -> Hashed | None:
        """The hash of ``path`` once its prefetch finished, or None when it was not prefetched, failed,
        or changed while it was hashed. The prefetch is used up."""
        if path != self._path:
            return None
        self._wait()
        result, self._path, self._result = self._result, None, None
        return result

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _hash(self, path: Path) -> None:
        try:
            before = readers.checkpoint_identity(path)
            sha = readers.checkpoint_sha256(path)
            if before is not None and readers.checkpoint_identity(path) == before:
                self._result = Hashed(path, before, sha)
        except Exception:   # the fold reads the file itself and reports what is wrong with it
            self._result = None
