"""Reading checkpoints: format detection, lazy per-tensor access, key normalisation, validation.

A checkpoint is opened with ``read_checkpoint``, which checks everything that can be checked
without reading tensor data (the file is complete, is a state dict, its names map onto the base
model's, shapes and dtypes agree) and hashes the file. Tensors are then read one at a time with
``Checkpoint.delta(name)``, which also checks values (no NaN or Inf) and accumulates what
``Checkpoint.finish()`` needs to reject a zero task vector or a checkpoint of another base model.
Every rejection is an ``errors.CheckpointError`` subclass whose message names the file.

Formats: safetensors (read with plain file reads, not mmap, so a process holds about one tensor of
the file at a time), torch state dicts ``.pt``/``.pth``/``.bin`` loaded with ``weights_only=True``
and ``mmap=True`` (also a nested dict with a ``state_dict``, ``model_state_dict`` or ``model``
entry). Whole pickled objects are refused unless ``trust_pickles`` is set; they are then loaded by
``axis_stream.store.convert``'s restricted unpickler, whole, into memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from axis_stream import errors
from axis_stream.errors import first_line
from axis_stream.store import unpickle

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "image_encoder.")
"""Prefixes that wrappers add (DataParallel, Lightning, torch.compile, task_vectors' ImageClassifier)."""
STATE_DICT_ENTRIES = ("state_dict", "model_state_dict", "model")
VISUAL_PREFIX = "visual."
DIFFERENT_BASE_RELATIVE_NORM = 0.5
"""A checkpoint whose weights (tensors of 2 or more dims) differ from the base's by more than this
fraction of the base's norm was not fine-tuned from this base. Fine-tunes move weights by a few
percent; two independent pretrainings of one architecture differ by about sqrt(2)."""
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
_HASH_CHUNK = 4 * 2**20
_FINITE_CHUNK = 1 << 20


# --- low-level readers: names, shapes and dtypes without data; data one tensor at a time ---

class SafetensorsFile:
    """A safetensors file read with ``readinto`` per tensor: no mmap, so nothing stays resident.

    Raises ``TruncatedFile`` when the header or data end before the header says they do, and
    ``NotACheckpoint`` when the file is not safetensors at all.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open(self.path, "rb")
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            raise

    def _parse(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        head = self._fh.read(8)
        if len(head) < 8:
            raise errors.TruncatedFile(self.path, f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise errors.NotACheckpoint(self.path, "not a safetensors file (implausible header length)")
        if 8 + n > size:
            raise errors.TruncatedFile(self.path, f"header needs {8 + n} bytes, the file has {size}")
        try:
            header = json.loads(self._fh.read(n), object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise errors.NotACheckpoint(self.path, f"not a safetensors file ({exc})") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise errors.NotACheckpoint(self.path, "not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise errors.NotACheckpoint(self.path, "not a safetensors file (header is not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise errors.NotACheckpoint(self.path, "not a safetensors file (__metadata__ is not a JSON object)")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            if not (isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] in SAFETENSORS_DTYPES
                    and _offsets(e.get("shape")) and _offsets(e.get("data_offsets"), 2)):
                raise errors.NotACheckpoint(self.path, f"tensor {name!r} has an unreadable header entry (needs a "
                                                       "known dtype, and shape and data_offsets of integers >= 0)")
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise errors.NotACheckpoint(self.path, f"tensor {name!r}: offsets disagree with its shape")
            self._entries[name] = (dtype, shape, begin, end)
        self._check_layout(size - self._data_start)

    def _check_layout(self, data_size: int) -> None:
        """The tensors' data ranges tile the data section exactly, as the format requires: no overlap, no gap."""
        reached, previous = 0, None
        for begin, end, name in sorted((b, e, name) for name, (_, _, b, e) in self._entries.items()):
            if begin != reached:
                where = "overlaps" if begin < reached else "leaves a gap after"
                raise errors.NotACheckpoint(self.path, f"tensor {name!r}'s data {where} "
                                                       f"{repr(previous) if previous else 'the header'}")
            reached, previous = end, name
        if reached > data_size:
            raise errors.TruncatedFile(
                self.path, f"data ends at byte {self._data_start + reached}, the file has {self._data_start + data_size}")
        if reached < data_size:
            raise errors.NotACheckpoint(self.path, f"{data_size - reached} bytes after the last tensor's data")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def read(self, key: str) -> Tensor:
        """The tensor's own copy in torch-allocated (aligned) memory; nothing of the file stays mapped."""
        dtype, shape, begin, end = self._entries[key]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._fh.seek(self._data_start + begin)
        if end > begin and self._fh.readinto(memoryview(buf.numpy())) != end - begin:
            raise errors.TruncatedFile(self.path, f"tensor {key!r} ends past the end of the file")
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        self._fh.close()


class _DuplicateKey(ValueError):
    """A JSON object names one key twice (JSON parsers silently keep the last)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"{twice!r} appears twice in the header")
    return out


def _offsets(value: Any, length: int | None = None) -> bool:
    """A list of JSON integers in [0, 2**63) (not bools, not floats), of ``length`` if given."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(type(v) is int and 0 <= v < 2**63 for v in value))


class _DictSource:
    """A state dict already loaded (a torch file mapped with ``mmap=True``, or a trusted pickle)."""

    def __init__(self, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None):
        self._t = dict(tensors)
        self.metadata = metadata or {}

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def read(self, key: str) -> Tensor:
        return self._t[key]

    def close(self) -> None:
        self._t.clear()


def torch_file_kind(path: Path) -> str:
    """``"zip"`` (torch >= 1.6) or ``"legacy"``; ``TruncatedFile`` or ``NotACheckpoint`` otherwise."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic.startswith(b"PK\x03\x04"):
        try:
            complete = zipfile.is_zipfile(path)
        except zipfile.BadZipFile as exc:
            raise errors.NotACheckpoint(path, f"damaged torch zip archive ({first_line(exc)})") from None
        if not complete:
            raise errors.TruncatedFile(path, "torch zip archive is incomplete (no central directory)")
        return "zip"
    if magic.startswith(b"\x80"):
        return "legacy"
    raise errors.NotACheckpoint(path, "not a torch file (neither a zip archive nor a pickle)")


def _open_torch(path: Path, trust_pickles: bool) -> _DictSource:
    """A torch file as a lazily paged state dict; whole pickles only when trusted."""
    mmap = torch_file_kind(path) == "zip"  # the legacy format cannot be mapped
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise errors.NotACheckpoint(path, f"unreadable torch file ({first_line(exc)})") from None
        if not trust_pickles:
            raise errors.UntrustedPickle(
                path, "a whole pickled object, not a state dict; convert it with `axis-stream convert` "
                      "(or set basis.trust_pickles for a folder you control)") from None
        obj = unpickle.state_dict_of(unpickle.load_pickle(path))
    except EOFError:
        raise errors.TruncatedFile(path, "the pickle ends early") from None
    except Exception as exc:  # torch's reader on damaged bytes raises any type (KeyError, IndexError, ...)
        raise errors.NotACheckpoint(path, f"unreadable torch file ({type(exc).__name__}: {first_line(exc)})") from None
    return _DictSource(unnest_state_dict(path, obj))


def unnest_state_dict(path: Path, obj: Any) -> dict[str, Tensor]:
    """The tensors of a state dict, looking one level into a ``state_dict``-like entry."""
    if isinstance(obj, Mapping):
        for entry in STATE_DICT_ENTRIES:
            if isinstance(obj.get(entry), Mapping):
                obj = obj[entry]
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise errors.NotACheckpoint(path, f"holds a {type(obj).__name__} without tensors, not a state dict")


# --- key normalisation ---

@dataclass(frozen=True)
class KeyMapping:
    """How a checkpoint's names were mapped onto the base's, for the log and the ledger."""

    names: dict[str, str]                   # base name -> name in the file
    stripped: tuple[str, ...] = ()          # wrapper prefixes removed
    visual_only: bool = False               # an image-encoder-only checkpoint mapped onto visual.*
    unmatched: tuple[str, ...] = ()         # names in the file that are not in the base (ignored)
    absent: tuple[str, ...] = ()            # base parameters not in the file (unchanged, tau = 0)

    def __str__(self) -> str:
        parts = [f"{len(self.names)} tensors mapped"]
        if self.stripped:
            parts.append("stripped " + ", ".join(repr(p) for p in self.stripped))
        if self.visual_only:
            parts.append(f"image-encoder-only, prefixed {VISUAL_PREFIX!r}")
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} not in the base ignored (e.g. {self.unmatched[0]})")
        if self.absent:
            parts.append(f"{len(self.absent)} base parameters absent, taken as unchanged")
        return "; ".join(parts)


def normalise_keys(path: str | Path, shapes: Mapping[str, tuple[int, ...]],
                   base_shapes: Mapping[str, tuple[int, ...]]) -> KeyMapping:
    """Map file names onto base names: strip wrapper prefixes, and map onto ``visual.*`` when that
    matches more base names with the right shape (an image-encoder-only checkpoint)."""
    stripped: set[str] = set()
    plain: dict[str, str] = {}
    for key in shapes:
        name = key
        while name not in base_shapes:
            prefix = next((p for p in WRAPPER_PREFIXES if name.startswith(p)), None)
            if prefix is None:
                break
            stripped.add(prefix)
            name = name[len(prefix):]
        if name in plain:
            raise errors.NotACheckpoint(path, f"both {plain[name]!r} and {key!r} map to {name!r}")
        plain[name] = key

    def score(mapping: dict[str, str]) -> int:
        return sum(base_shapes.get(n) == tuple(shapes[k]) for n, k in mapping.items())

    visual = {VISUAL_PREFIX + n: k for n, k in plain.items()}
    visual_only = score(visual) > score(plain)
    chosen = visual if visual_only else plain
    names = {n: k for n, k in chosen.items() if n in base_shapes}
    return KeyMapping(
        names={n: names[n] for n in base_shapes if n in names},
        stripped=tuple(sorted(stripped)),
        visual_only=visual_only,
        unmatched=tuple(k for n, k in chosen.items() if n not in base_shapes),
        absent=tuple(n for n in base_shapes if n not in names),
    )


# --- the checkpoint ---

@dataclass
class _DeltaTally:
    nonzero: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0


@dataclass
class Checkpoint:
    """An opened, structurally valid checkpoint whose tensors are read one at a time.

    ``names`` are the base float parameters the file holds (base order); base parameters it does
    not hold are unchanged (``mapping.absent``).
    """

    path: Path
    sha256: str
    size: int
    format: str
    metadata: dict[str, str]
    mapping: KeyMapping
    _source: Any = field(repr=False)
    _base: Mapping[str, Tensor] = field(repr=False)
    _tally: _DeltaTally = field(default_factory=_DeltaTally, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.mapping.names)

    def tensor(self, name: str) -> Tensor:
        """The tensor for base name ``name`` as stored; ``NonFinite`` if it holds NaN or Inf."""
        t = self._source.read(self.mapping.names[name])
        if not all_finite(t):
            raise errors.NonFinite(self.path, f"{name} contains NaN or Inf")
        return t

    def delta(self, name: str) -> Tensor | None:
        """The task difference ``theta - theta_pre`` in float32, or None where the tensor equals the
        base (rounded to the checkpoint's dtype: a half-precision copy of an unchanged tensor is unchanged)."""
        t, b = self.tensor(name), self._base[name]
        if t.dim() >= 2:
            self._tally.base_sq += float(torch.linalg.vector_norm(b.float())) ** 2
        if torch.equal(t, b.to(t.dtype)):
            return None
        d = t.float() - b.float()
        del t
        if not bool(d.any()):
            return None
        self._tally.nonzero += 1
        if d.dim() >= 2:
            self._tally.delta_sq += float(torch.linalg.vector_norm(d)) ** 2
        return d

    @property
    def relative_norm(self) -> float:
        """``||tau|| / ||theta_pre||`` over the weights (2+ dims) read so far."""
        return math.sqrt(self._tally.delta_sq / self._tally.base_sq) if self._tally.base_sq else 0.0

    def finish(self) -> None:
        """After every tensor went through ``delta``: reject a zero task vector or another base."""
        if self._tally.nonzero == 0:
            raise errors.ZeroDelta(self.path, "identical to the base model (a zero task vector)")
        if self.relative_norm > DIFFERENT_BASE_RELATIVE_NORM:
            raise errors.DifferentBase(
                self.path, f"its weights differ from the base by {self.relative_norm:.2f} of the base's "
                           f"norm (limit {DIFFERENT_BASE_RELATIVE_NORM}): fine-tuned from another base?")

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def all_finite(t: Tensor) -> bool:
    """No NaN or Inf, checked in chunks: ``isfinite`` on a whole tensor needs ~2x its size in temporaries."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | Path, base_state_dict: Mapping[str, Tensor], *,
                    trust_pickles: bool = False, required: Iterable[str] = (),
                    base_sha256: str | None = None) -> Checkpoint:
    """Open ``path`` and check its structure against the base; tensors are read later, lazily.

    ``required``: base names that must be present (the basis's matrices). ``base_sha256``: when
    given and the file's metadata names another ``base_sha256``, the file is ``DifferentBase``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise errors.NotACheckpoint(path, f"cannot read: {exc.strerror}") from None
    if size == 0:
        raise errors.TruncatedFile(path, "empty file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        source: Any = SafetensorsFile(path)
    elif suffix in TORCH_SUFFIXES:
        source = _open_torch(path, trust_pickles)
    else:
        raise errors.NotACheckpoint(path, f"unsupported file type {suffix or '(none)'!r}; "
                                          f"expected .safetensors, {', '.join(TORCH_SUFFIXES)}")
    try:
        mapping = _check_structure(path, source, base_state_dict, required, base_sha256)
        fmt = "safetensors" if isinstance(source, SafetensorsFile) else "torch"
        return Checkpoint(path, file_sha256(path), size, fmt, dict(source.metadata), mapping, source,
                          base_state_dict)
    except BaseException:
        source.close()
        raise


def _check_structure(path: Path, source: Any, base: Mapping[str, Tensor], required: Iterable[str],
                     base_sha256: str | None) -> KeyMapping:
    """Everything checkable from names, shapes and dtypes alone; returns the key mapping."""
    claimed = source.metadata.get("base_sha256")
    if base_sha256 and claimed and claimed != base_sha256:
        raise errors.DifferentBase(path, f"made for base {claimed[:12]}, this basis's base is {base_sha256[:12]}")
    floats = {n: tuple(t.shape) for n, t in base.items() if t.is_floating_point()}
    mapping = normalise_keys(path, {k: source.shape(k) for k in source.keys()}, floats)
    if not mapping.names:
        raise errors.MissingKeys(path, f"none of its {len(source.keys())} tensors match the base model's names")
    missing = [n for n in required if n not in mapping.names]
    if missing:
        raise errors.MissingKeys(path, f"{len(missing)} required tensors missing, e.g. {missing[0]}")
    bad = [n for n, k in mapping.names.items() if tuple(source.shape(k)) != floats[n]]
    if bad:
        n = bad[0]
        raise errors.ShapeMismatch(path, f"{n} has shape {tuple(source.shape(mapping.names[n]))}, the base "
                                         f"has {floats[n]} ({len(bad)} tensors differ)")
    bad = [n for n, k in mapping.names.items() if not source.dtype(k).is_floating_point]
    if bad:
        raise errors.BadDtype(path, f"{bad[0]} has dtype {source.dtype(mapping.names[bad[0]])}, expected a float")
    return mapping


def validate_checkpoint(path: str | Path, base_state_dict: Mapping[str, Tensor], *,
                        trust_pickles: bool = False, required: Iterable[str] = (),
                        base_sha256: str | None = None) -> Checkpoint:
    """Every check a fold makes, without folding: read each tensor once; returns the closed checkpoint."""
    with read_checkpoint(path, base_state_dict, trust_pickles=trust_pickles, required=required,
                         base_sha256=base_sha256) as ckpt:
        _check_values(ckpt)
    return ckpt


def validate_state_dict(path: str | Path, tensors: Mapping[str, Tensor], base_state_dict: Mapping[str, Tensor],
                        *, required: Iterable[str] = (), base_sha256: str | None = None,
                        metadata: dict[str, str] | None = None) -> Checkpoint:
    """``validate_checkpoint`` for a state dict in memory; ``path`` is the file errors name."""
    path = Path(path)
    source = _DictSource(tensors, metadata)
    mapping = _check_structure(path, source, base_state_dict, required, base_sha256)
    with Checkpoint(path, "", 0, "memory", dict(source.metadata), mapping, source, base_state_dict) as ckpt:
        _check_values(ckpt)
    return ckpt


def _check_values(ckpt: Checkpoint) -> None:
    for name in ckpt.names:
        ckpt.delta(name)
    ckpt.finish()
