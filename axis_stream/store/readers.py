"""The low-level checkpoint readers: names, shapes and dtypes without data, then data one tensor at a time.

Each reader has the same small interface (``keys``, ``shape``, ``dtype``, ``read``, ``metadata``,
``close``); ``open_source`` picks one by the path's kind. ``store.ingest`` builds the validated
``Checkpoint`` on top of them. Formats: safetensors (``SafetensorsFile``: plain reads, no mmap),
torch state dicts (``weights_only=True``, ``mmap=True``), and Hugging Face model folders
(``HFFolder``: ``config.json`` with ``model.safetensors``, or shards named by
``model.safetensors.index.json``, or the ``pytorch_model*.bin`` equivalents).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

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
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
"""The file names ``open_source`` reads (the watcher accepts exactly these); a folder is a Hugging Face model."""
STATE_DICT_ENTRIES = ("state_dict", "model_state_dict", "model")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
_HASH_CHUNK = 4 * 2**20
_READ_CHUNK = 64 * 2**20
Tick = Callable[[], None]
"""Called after each chunk hashed or read, so that a long read of a large file shows it is alive (the
daemon's systemd watchdog ping, which rate-limits itself)."""


def _no_tick() -> None:
    pass


class CheckpointReader(Protocol):
    """What every reader ``open_source`` returns offers: tensors by name, each read on demand, and the
    file's string metadata (safetensors' ``__metadata__``; empty for other formats)."""

    metadata: dict[str, str]

    def keys(self) -> list[str]:
        """The tensor names, in the file's order."""

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def read(self, key: str) -> Tensor:
        """One tensor, read now (validated against the header where the format has one)."""

    def close(self) -> None: ...


class SafetensorsFile:
    """A safetensors file read with ``readinto`` per tensor: no mmap, so nothing stays resident.

    Raises ``TruncatedFile`` when the header or data end before the header says they do, and
    ``NotACheckpoint`` when the file is not safetensors at all. ``tick`` after each chunk read.
    """

    def __init__(self, path: str | Path, tick: Tick = _no_tick):
        self.path = Path(path)
        self.tick = tick
        self._fh = open(self.path, "rb")  # noqa: SIM115 (the reader reads it until close())
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
        view = buf.numpy().data
        for at in range(0, end - begin, _READ_CHUNK):
            if self._fh.readinto(view[at:at + _READ_CHUNK]) != len(view[at:at + _READ_CHUNK]):
                raise errors.TruncatedFile(self.path, f"tensor {key!r} ends past the end of the file")
            self.tick()
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        self._fh.close()


class _DuplicateKey(ValueError):
    """A JSON object names one key twice (JSON parsers silently keep the last)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(f"{k!r} appears twice in the header")
            seen.add(k)
    return out


def _offsets(value: Any, length: int | None = None) -> bool:
    """A list of JSON integers in [0, 2**63) (not bools, not floats), of ``length`` if given."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(type(v) is int and 0 <= v < 2**63 for v in value))


class DictSource:
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


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""A Hugging Face folder's weights, in the order ``transformers`` prefers them; the other files are ignored."""
HF_CONFIG = "config.json"


class HFFolder:
    """A Hugging Face model folder as one checkpoint, with the ``SafetensorsFile`` interface.

    Every shard is opened (headers only) when the folder is; ``read`` reads one tensor from the
    shard that holds it. Raises ``MissingShard`` when the index names a shard that is not there,
    ``MissingKeys`` when the index names a tensor its shard does not hold, ``NotACheckpoint`` when
    the folder has no ``config.json`` or no weights.
    """

    def __init__(self, path: str | Path, trust_pickles: bool = False, tick: Tick = _no_tick):
        self.path = Path(path)
        self.tick = tick
        self.config = hf_config(self.path)
        self.files = hf_weight_files(self.path)
        self._shards: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        try:
            for name, expected in self.files.items():
                shard = self._shards[name] = self._open_shard(name, trust_pickles)
                for key in shard.keys():
                    if key in self._where:
                        raise errors.NotACheckpoint(self.path, f"{key!r} is in both {self._where[key]} and {name}")
                    self._where[key] = name
                absent = [k for k in expected if self._where.get(k) != name]
                if absent:
                    raise errors.MissingKeys(self.path, f"the index puts {absent[0]!r} in {name}, which does not "
                                                        f"hold it ({len(absent)} tensors absent)")
                self.metadata.update(shard.metadata)
        except BaseException:
            self.close()
            raise

    def _open_shard(self, name: str, trust_pickles: bool) -> Any:
        """One shard, its errors naming the folder (what is quarantined) and the shard."""
        try:
            return open_source(self.path / name, trust_pickles, self.tick)
        except errors.CheckpointError as exc:
            raise type(exc)(self.path, f"{name}: {exc.message}") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shards[self._where[key]].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._shards[self._where[key]].dtype(key)

    def read(self, key: str) -> Tensor:
        return self._shards[self._where[key]].read(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def hf_config(folder: Path) -> dict[str, Any]:
    """A Hugging Face folder's ``config.json``; ``NotACheckpoint`` when it is absent or not a JSON object."""
    try:
        config = json.loads((folder / HF_CONFIG).read_text())
    except FileNotFoundError:
        raise errors.NotACheckpoint(folder, f"a folder without {HF_CONFIG}, not a Hugging Face model") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise errors.NotACheckpoint(folder, f"unreadable {HF_CONFIG} ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise errors.NotACheckpoint(folder, f"{HF_CONFIG} is not a JSON object")
    return config


def hf_weight_files(folder: Path) -> dict[str, list[str]]:
    """The weight files of a Hugging Face folder -> the tensors its index puts in each (all present)."""
    for name in HF_WEIGHTS:
        if (folder / name).is_file():
            break
    else:
        raise errors.NotACheckpoint(folder, f"no weights: none of {', '.join(HF_WEIGHTS)}")
    if not name.endswith(".index.json"):
        return {name: []}
    try:
        weight_map = json.loads((folder / name).read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            files.setdefault(str(shard), []).append(str(key))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError,
            AttributeError) as exc:
        raise errors.NotACheckpoint(folder, f"unreadable {name} ({first_line(exc)})") from None
    for shard in files:
        if Path(shard).name != shard or not _is_file(folder / shard):
            raise errors.MissingShard(folder, f"{name} names shard {shard[:80]!r}, which is not in the folder "
                                              f"({len(files)} shards named)")
    return files


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False also for a name the file system refuses (too long, bad bytes)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def hf_folder_complete(folder: Path) -> bool:
    """True when the folder's weights are all there and complete (headers and sizes only, no tensor data)."""
    return hf_folder_incomplete(folder) is None


def hf_folder_incomplete(folder: Path) -> str | None:
    """What a Hugging Face folder still lacks (a shard missing or short, no weights at all, no
    ``config.json``), in one line; None when its weights are all there and complete."""
    try:
        for name in hf_weight_files(folder):
            if name.endswith(".safetensors"):
                SafetensorsFile(folder / name).close()
            else:
                torch_file_kind(folder / name)
    except errors.CheckpointError as exc:
        return exc.message
    except OSError as exc:
        return f"unreadable ({first_line(exc)})"
    return None if (folder / HF_CONFIG).is_file() else f"no {HF_CONFIG}"


def architecture_family(config: Mapping[str, Any]) -> str:
    """A config.json's ``model_type`` with CLIP's towers folded into ``clip`` (a vision tower fits a CLIPModel)."""
    model_type = str(config.get("model_type", ""))
    for tower in ("_vision_model", "_text_model"):
        model_type = model_type.removesuffix(tower)
    return model_type


class BaseWeights(dict):
    """The base model's state dict; ``config`` is its Hugging Face ``config.json`` (None for open_clip),
    against which a folder checkpoint's architecture is checked."""

    def __init__(self, tensors: Mapping[str, Tensor], config: Mapping[str, Any] | None = None):
        super().__init__(tensors)
        self.config = dict(config) if config is not None else None


def read_hf_base(folder: str | Path) -> BaseWeights:
    """Every tensor of a Hugging Face model folder, in memory, with its config (the base stays resident)."""
    source = HFFolder(folder)
    try:
        return BaseWeights({k: source.read(k) for k in source.keys()}, source.config)
    finally:
        source.close()


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
    if magic[:1] == b"\x80" and magic[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):   # PROTO 2..5
        return "legacy"
    raise errors.NotACheckpoint(path, "not a torch file (neither a zip archive nor a pickle)")


def open_torch(path: Path, trust_pickles: bool) -> DictSource:
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
    return DictSource(unnest_state_dict(path, obj))


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


def open_source(path: Path, trust_pickles: bool, tick: Tick = _no_tick) -> CheckpointReader:
    """The reader for ``path`` chosen by its kind: a Hugging Face folder, safetensors or a torch file
    (``tick``: see ``Tick``; a torch file is mapped, its pages read when its tensors are checked)."""
    if path.is_dir():
        return HFFolder(path, trust_pickles, tick)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise errors.NotACheckpoint(path, f"cannot read: {exc.strerror}") from None
    if size == 0:
        raise errors.TruncatedFile(path, "empty file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path, tick)
    if suffix in TORCH_SUFFIXES:
        return open_torch(path, trust_pickles)
    raise errors.NotACheckpoint(path, f"unsupported file type {suffix or '(none)'!r}; "
                                      f"expected {', '.join(CHECKPOINT_SUFFIXES)} or a model folder")


def checkpoint_sha256(path: str | Path, tick: Tick = _no_tick) -> str:
    """A checkpoint's identity: a file's sha256, or for a Hugging Face folder the sha256 of its weight
    files' names and sha256s (config, tokenizer and other files do not count)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path, tick)
    h = hashlib.sha256()
    for name in sorted(hf_weight_files(path)):
        h.update(f"{name}\0{file_sha256(path / name, tick)}\n".encode())
    return h.hexdigest()


Identity = tuple[tuple[int, int, int, int], ...]
"""(device, inode, size, mtime) per file of a checkpoint: ``checkpoint_identity``."""


def checkpoint_identity(path: Path) -> Identity | None:
    """(device, inode, size, mtime) of a checkpoint file, or of each weight file of a Hugging Face
    folder; None when it is gone or not readable as a checkpoint. Equal before a checkpoint is opened
    and after it is hashed: the hash is of the bytes opened."""
    try:
        files = [path / name for name in sorted(hf_weight_files(path))] if path.is_dir() else [path]
        return tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in (f.stat() for f in files))
    except (OSError, errors.CheckpointError):
        return None


def written_in_place(opened: Identity, now: Identity | None) -> bool:
    """Whether a file of ``opened`` (``checkpoint_identity`` at its open) is still there under the same
    inode with another size or mtime: written to, so what was read of it may mix old and new bytes. A
    file replaced by a rename or deleted is not: its reader still holds the bytes it opened."""
    before = {(dev, ino): rest for dev, ino, *rest in opened}
    return any(before.get((dev, ino), rest) != rest for dev, ino, *rest in now or ())


def checkpoint_size(path: Path) -> int:
    """Bytes of a checkpoint: the file, or a Hugging Face folder's weight files."""
    if not path.is_dir():
        return path.stat().st_size
    return sum((path / name).stat().st_size for name in hf_weight_files(path))


def file_sha256(path: str | Path, tick: Tick = _no_tick) -> str:
    """sha256 of a file's bytes, read in chunks (``tick`` after each: a 50 GB file takes a minute)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
            tick()
    return h.hexdigest()
