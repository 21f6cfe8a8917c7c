"""Typed errors. Each says in one line which file or key is at fault and why."""

from __future__ import annotations

from pathlib import Path


class AxisError(Exception):
    """Base of every error axis-stream raises on purpose."""


class ConfigError(AxisError):
    """A configuration file or value is invalid; the message names the key."""


class BasisError(AxisError):
    """The basis directory is missing, corrupt or belongs to another base model."""


class StateLocked(AxisError):
    """The state folder's lock is held by another process (the message names its pid), or cannot be taken."""


class SourceChanged(AxisError):
    """A checkpoint changed while it was read (replaced before its hash, or written to): not the file's
    fault, tried again later."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(f"{self.path.name}: changed while it was being read (replaced or written to); "
                         f"nothing was folded from it")


class CheckpointError(AxisError):
    """A checkpoint was rejected. ``reason`` is a short label (used in metrics and quarantine)."""

    reason = "invalid"

    def __init__(self, path: str | Path, message: str):
        self.path = Path(path)
        self.message = message
        super().__init__(f"{self.path.name}: {message}")


class TruncatedFile(CheckpointError):
    reason = "truncated"


class MissingShard(CheckpointError):
    reason = "missing_shard"


class NotACheckpoint(CheckpointError):
    reason = "not_a_checkpoint"


class UntrustedPickle(CheckpointError):
    reason = "untrusted_pickle"


class MissingKeys(CheckpointError):
    reason = "missing_keys"


class ShapeMismatch(CheckpointError):
    reason = "shape_mismatch"


class BadDtype(CheckpointError):
    reason = "bad_dtype"


class NonFinite(CheckpointError):
    reason = "non_finite"


class DifferentBase(CheckpointError):
    reason = "different_base"


class OtherArchitecture(CheckpointError):
    """A model folder of the base's ``model_type`` with other ``architectures`` (another head, which a
    fold ignores): refused unless ``basis.allow_other_architectures``."""

    reason = "other_architecture"


class ZeroDelta(CheckpointError):
    reason = "zero_delta"


class Duplicate(CheckpointError):
    reason = "duplicate"


class Symlink(CheckpointError):
    """A symbolic link in the watched folder: links are never followed (they can point anywhere)."""

    reason = "symlink"


class SpecialFile(CheckpointError):
    """A FIFO, socket or device under a checkpoint's name: never opened (a FIFO would block the reader)."""

    reason = "special_file"


def first_line(exc: BaseException, limit: int | None = 160) -> str:
    """An exception's first message line (cut at ``limit`` characters), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
