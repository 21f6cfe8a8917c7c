"""Export the merged model of Stage 1 alone: base + the basis at its stored singular values + the
averaged non-matrix parameters (``Basis.materialize(with_base=True)``), so a basis is usable
without Stage 2.

For a transformers base the export is a Hugging Face folder that ``from_pretrained`` loads: the
base folder's ``config.json``, tokenizer and other files, with the merged weights as
``model.safetensors`` (or shards of at most ``max_shard_bytes`` named by
``model.safetensors.index.json``). For an open_clip base it is one safetensors state dict that
``open_clip.create_model(name, pretrained=FILE)`` loads. Written under a temporary name, fsynced,
then renamed: a crash leaves no half-written export.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from axis_stream.config import Config
from axis_stream.errors import BasisError
from axis_stream.store import atomic, models
from axis_stream.store.basis import Basis
from axis_stream.store.readers import HF_WEIGHTS

MAX_SHARD_BYTES = 5 * 2**30  # what save_pretrained uses by default
SHARD_PREFIXES = ("model-", "pytorch_model-")


def export_merged(cfg: Config, out: str | Path, version: int | None = None,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the configured basis's merged model (``version``: default the current) to ``out``."""
    out = Path(out)
    if out.exists():
        raise BasisError(f"{out}: already exists; remove it or choose another --out")
    if not out.parent.is_dir():
        raise BasisError(f"{out}: folder {out.parent} does not exist")
    base, _ = models.load_base(cfg)
    basis = Basis.open(cfg.paths.basis_dir, base, settings=cfg.basis)
    version = basis.version if version is None else version
    state = basis.materialize(version, with_base=True)
    meta = {"basis_version": str(version), "base_sha256": basis.manifest["identity"]["sha256"]}
    if cfg.base.kind != "transformers":
        if out.suffix != ".safetensors":
            raise BasisError(f"{out}: an open_clip export is one file ending in .safetensors")
        return atomic.atomic_write(out, lambda p: save_sorted(state, p, {"format": "pt", **meta}))
    return write_hf_folder(state, models.hf_model_dir(cfg.base), out, meta, max_shard_bytes)


def write_hf_folder(state: dict[str, Tensor], base_dir: Path, out: Path, metadata: dict[str, str],
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """A new Hugging Face folder ``out``: ``base_dir``'s files but its weights, and ``state`` as the weights;
    written under a temporary name, fsynced, renamed."""
    out = Path(out)
    if out.exists():
        raise BasisError(f"{out}: already exists; remove it or choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        _copy_non_weights(base_dir, tmp)
        write_hf_weights(state, tmp, {"format": "pt", **metadata}, max_shard_bytes)
        for path in tmp.rglob("*"):
            atomic.own_mode(path, atomic.FILE_MODE if path.is_file() else atomic.DIR_MODE)   # group-readable
            if path.is_file():
                atomic.fsync_file(path)
        atomic.own_mode(tmp, atomic.DIR_MODE)
        atomic.fsync_dir(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.fsync_dir(out.parent)
    return out


def _copy_non_weights(base_dir: Path, dest: Path) -> None:
    """The base folder's config, tokenizer and other files (not its weights, not dot-files) into ``dest``."""
    dest.mkdir()
    for entry in base_dir.iterdir():
        if entry.name.startswith(".") or entry.name in HF_WEIGHTS or entry.name.startswith(SHARD_PREFIXES):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name)
        else:
            shutil.copyfile(entry, dest / entry.name)


def write_hf_weights(state: dict[str, Tensor], folder: Path, metadata: dict[str, str], max_shard_bytes: int) -> None:
    """``state`` as ``model.safetensors``, or as shards ``model-0000N-of-0000M.safetensors`` of at most
    ``max_shard_bytes`` (a bigger tensor gets a shard of its own) with ``model.safetensors.index.json``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_sorted({k: state[k].contiguous() for k in shards[0]}, folder / "model.safetensors", metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_sorted({k: state[k].contiguous() for k in names}, folder / file, metadata)
        weight_map.update({k: file for k in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def save_sorted(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file``, then the header's ``__metadata__`` rewritten in key order, in place: the writer
    keeps metadata in a hash map, so its order (and the file's bytes) changed from one run to the next;
    now two exports of the same version are byte-identical. The rewrite has the same length (the same
    keys and values), so nothing else in the file moves."""
    save_file(state, str(path), metadata=dict(sorted(metadata.items())))
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:
            f.seek(8)
            f.write(text + b" " * (n - len(text)))
