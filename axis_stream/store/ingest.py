"""Reading checkpoints: format detection, lazy per-tensor access, key normalisation, validation.

A checkpoint is opened with ``read_checkpoint``, which checks everything that can be checked
without reading tensor data (the file is complete, is a state dict, its names map onto the base
model's, shapes and dtypes agree) and hashes the file. Tensors are then read one at a time with
``Checkpoint.delta(name)``, which also checks values (no NaN or Inf) and accumulates what
``Checkpoint.finish()`` needs to reject a zero task vector or a checkpoint of another base model.
Every rejection is an ``errors.CheckpointError`` subclass whose message names the file.

Formats (the readers are in ``store.readers``): safetensors, torch state dicts ``.pt``/``.pth``/``.bin``
loaded with ``weights_only=True`` (also a nested dict with a ``state_dict``, ``model_state_dict`` or
``model`` entry), and Hugging Face model folders (``config.json`` and ``model.safetensors`` or its
shards, read one tensor at a time from whichever shard holds it; another architecture than the
base's in ``config.json`` is ``DifferentBase``; the same ``model_type`` with other ``architectures``, another
head, is ``OtherArchitecture`` unless allowed). Whole pickled objects are refused unless
``trust_pickles`` is set; they are then loaded by ``store.unpickle``'s restricted unpickler, whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from axis_stream import errors
from axis_stream.store.prefetch import Hashed
from axis_stream.store.readers import (
    HF_CONFIG,
    DictSource,
    HFFolder,
    Identity,
    SafetensorsFile,
    Tick,
    architecture_family,
    checkpoint_identity,
    checkpoint_sha256,
    checkpoint_size,
    open_source,
    written_in_place,
)

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "image_encoder.")
"""Prefixes that wrappers add (DataParallel, Lightning, torch.compile, task_vectors' ImageClassifier)."""
TOWER_PREFIXES = ("visual.", "vision_model.")
"""Where an image-encoder-only checkpoint's names go in a whole CLIP: open_clip's ``visual.*``, and
``vision_model.*`` of transformers' CLIPModel (a CLIPVisionModel saved by transformers 5 has no prefix)."""
DIFFERENT_BASE_RELATIVE_NORM = 0.5
"""A checkpoint whose weights (tensors of 2 or more dims) differ from the base's by more than this
fraction of the base's norm was not fine-tuned from this base. Fine-tunes move weights by a few
percent; two independent pretrainings of one architecture differ by about sqrt(2)."""
_FINITE_CHUNK = 1 << 20


# --- key normalisation ---

@dataclass(frozen=True)
class KeyMapping:
    """How a checkpoint's names were mapped onto the base's, for the log and the ledger."""

    names: dict[str, str]                   # base name -> name in the file
    stripped: tuple[str, ...] = ()          # wrapper prefixes removed
    tower: str = ""                         # an image-encoder-only checkpoint mapped onto this prefix
    unmatched: tuple[str, ...] = ()         # names in the file that are not in the base (ignored)
    absent: tuple[str, ...] = ()            # base parameters not in the file (unchanged, tau = 0)

    def __str__(self) -> str:
        parts = [f"{len(self.names)} tensors mapped"]
        if self.stripped:
            parts.append("stripped " + ", ".join(repr(p) for p in self.stripped))
        if self.tower:
            parts.append(f"image-encoder-only, prefixed {self.tower!r}")
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} not in the base ignored (e.g. {self.unmatched[0]})")
        if self.absent:
            parts.append(f"{len(self.absent)} base parameters absent, taken as unchanged")
        return "; ".join(parts)


def normalise_keys(path: str | Path, shapes: Mapping[str, tuple[int, ...]],
                   base_shapes: Mapping[str, tuple[int, ...]]) -> KeyMapping:
    """Map file names onto base names: strip wrapper prefixes, and map onto ``visual.*`` or
    ``vision_model.*`` when that matches more base names with the right shape (an image-encoder-only
    checkpoint)."""
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

    tower, chosen = "", plain
    for prefix in TOWER_PREFIXES:
        prefixed = {prefix + n: k for n, k in plain.items()}
        if score(prefixed) > score(chosen):
            tower, chosen = prefix, prefixed
    names = {n: k for n, k in chosen.items() if n in base_shapes}
    return KeyMapping(
        names={n: names[n] for n in base_shapes if n in names},
        stripped=tuple(sorted(stripped)),
        tower=tower,
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
    _opened: Identity | None = field(default=None, repr=False)   # checkpoint_identity at the open; None: in memory
    _tally: _DeltaTally = field(default_factory=_DeltaTally, repr=False)
    _tick: Tick = field(default=lambda: None, repr=False)     # after each tensor read (a mapped torch file's pages)
    architecture: str = ""     # another head allowed in (``other_architectures``): its and the base's architectures

    @property
    def names(self) -> list[str]:
        return list(self.mapping.names)

    def tensor(self, name: str) -> Tensor:
        """The tensor for base name ``name`` as stored; ``NonFinite`` if it holds NaN or Inf."""
        t = self._source.read(self.mapping.names[name])
        if not all_finite(t):
            raise errors.NonFinite(self.path, f"{name} contains NaN or Inf")
        self._tick()
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
        """After every tensor went through ``delta``: reject a zero task vector or another base;
        ``SourceChanged`` if the file was written to while it was read (the tensors may be torn)."""
        if self._opened is not None and written_in_place(self._opened, checkpoint_identity(self.path)):
            raise errors.SourceChanged(self.path)
        if self._tally.nonzero == 0:
            raise errors.ZeroDelta(self.path, "identical to the base model (a zero task vector)")
        if self.relative_norm > DIFFERENT_BASE_RELATIVE_NORM:
            raise errors.DifferentBase(
                self.path, f"its weights differ from the base by {self.relative_norm:.2f} of the base's "
                           f"norm (limit {DIFFERENT_BASE_RELATIVE_NORM}): fine-tuned from another base?")

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def all_finite(t: Tensor) -> bool:
    """No NaN or Inf, checked in chunks: ``isfinite`` on a whole tensor needs ~2x its size in temporaries."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


def read_checkpoint(path: str | Path, base_state_dict: Mapping[str, Tensor], *,
                    trust_pickles: bool = False, required: Iterable[str] = (),
                    base_sha256: str | None = None, tick: Tick | None = None,
                    other_architectures: bool = False, hashed: Hashed | None = None) -> Checkpoint:
    """Open ``path`` and check its structure against the base; tensors are read later, lazily.

    ``required``: base names that must be present (the basis's matrices). ``base_sha256``: when
    given and the file's metadata names another ``base_sha256``, the file is ``DifferentBase``.
    ``tick()`` after each chunk hashed or read (``readers.Tick``: the daemon's watchdog).
    ``other_architectures``: a folder with another head folds (``Checkpoint.architecture`` says which).
    ``hashed``: its sha256 taken ahead (``store.prefetch``), used only if the file opened is the one hashed.
    ``SourceChanged`` when it was replaced or written to between its open and its sha256
    (``Checkpoint.finish``: written to while it was read).
    """
    path, tick = Path(path), tick or (lambda: None)
    opened = checkpoint_identity(path)
    source = open_source(path, trust_pickles, tick)
    try:
        other = ""
        if isinstance(source, HFFolder):
            other = _check_architecture(path, source.config, getattr(base_state_dict, "config", None),
                                        other_architectures)
        mapping = _check_structure(path, source, base_state_dict, required, base_sha256)
        fmt = {SafetensorsFile: "safetensors", HFFolder: "hf-folder"}.get(type(source), "torch")
        known = hashed is not None and opened is not None and hashed.identity == opened
        sha = hashed.sha256 if known and hashed is not None else checkpoint_sha256(path, tick)
        size = checkpoint_size(path)
        if opened is None or checkpoint_identity(path) != opened:  # the hash would not be of the bytes opened
            raise errors.SourceChanged(path)
        return Checkpoint(path, sha, size, fmt, dict(source.metadata), mapping, source, base_state_dict, opened,
                          _tick=tick, architecture=other)
    except BaseException:
        source.close()
        raise


def _check_architecture(path: Path, config: Mapping[str, Any], base_config: Mapping[str, Any] | None,
                        allow_other: bool) -> str:
    """A folder whose config.json names another architecture family than the base's is ``DifferentBase``;
    the base's ``model_type`` with other ``architectures`` (another head: a fold would ignore it) is
    ``OtherArchitecture``, or with ``allow_other`` returned in words. A CLIP tower into a CLIP passes."""
    if base_config is None:
        return ""
    mine, base = architecture_family(config), architecture_family(base_config)
    if mine != base:
        raise errors.DifferentBase(path, f"its {HF_CONFIG} says model_type {config.get('model_type')!r}, "
                                         f"the base is {base_config.get('model_type')!r}")
    heads, base_heads = (sorted(map(str, c.get("architectures") or [])) for c in (config, base_config))
    if config.get("model_type") != base_config.get("model_type") or not heads or not base_heads or heads == base_heads:
        return ""
    other = f"architectures {', '.join(heads)}, the base's {', '.join(base_heads)}"
    if not allow_other:
        raise errors.OtherArchitecture(path, f"its {HF_CONFIG} says {other}: another head, which a fold would "
                                             "ignore; set basis.allow_other_architectures to fold the weights "
                                             "it shares with the base")
    return other


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
    source = DictSource(tensors, metadata)
    mapping = _check_structure(path, source, base_state_dict, required, base_sha256)
    with Checkpoint(path, "", 0, "memory", dict(source.metadata), mapping, source, base_state_dict) as ckpt:
        _check_values(ckpt)
    return ckpt


def _check_values(ckpt: Checkpoint) -> None:
    for name in ckpt.names:
        ckpt.delta(name)
    ckpt.finish()
