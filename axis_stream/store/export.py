"""Export the merged model of Stage 1 alone: base + the basis at its stored singular values + the
averaged non-matrix parameters (``Basis.materialize(with_base=True)``), so a basis is usable
without Stage 2.

For a transformers base the export is a Hugging Face folder that ``from_pretrained`` loads: the
base folder's ``config.json``, tokenizer and other files, with the merged weights as
``model.safetensors`` (or shards of at most ``max_shard_bytes`` named by
``model.safetensors.index.json``), and the model card ``README.md`` (``store.card``). For an
open_clip base it is one safetensors state dict that ``open_clip.create_model(name, pretrained=FILE)``
loads, with its card beside it (``NAME.README.md``). With ``adapter`` (a transformers base) it is a
PEFT LoRA adapter folder (``store.adapter``). Written under a temporary name, fsynced, then renamed:
a crash leaves no half-written export. ``load_line`` is the Python line that loads an export, as the
CLI prints it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from axis_stream.config import BaseConfig, Config
from axis_stream.errors import BasisError
from axis_stream.store import atomic, card, models
from axis_stream.store.basis import Basis
from axis_stream.store.readers import HF_WEIGHTS, hf_config

MAX_SHARD_BYTES = 5 * 2**30  # what save_pretrained uses by default
SHARD_PREFIXES = ("model-", "pytorch_model-")

Say = Callable[[str], None]
"""Where an export says what it is doing (the CLI prints it; a library caller may drop it)."""


def export_merged(cfg: Config, out: str | Path, version: int | None = None,
                  max_shard_bytes: int = MAX_SHARD_BYTES, *, adapter: bool = False,
                  say: Say = lambda line: None) -> tuple[Path, int]:
    """Write the configured basis's merged model (``version``: default the current) to ``out``, or with
    ``adapter`` the basis as a LoRA adapter of the base; returns the path and the version written."""
    out = Path(out)
    check_out(out)
    if adapter and cfg.base.kind != "transformers":
        raise BasisError(f"{out}: --adapter needs a Hugging Face (transformers) base; "
                         f"an open_clip base exports the full model")
    if cfg.base.kind != "transformers" and out.suffix != ".safetensors":
        raise BasisError(f"{out}: an open_clip export is one file ending in .safetensors")
    say(f"reading the base {cfg.base.model}")
    basis = _open_with_base(cfg)
    version = basis.version if version is None else version
    say(f"materializing basis version {version}")
    state = basis.materialize(version, with_base=True)
    meta = {"basis_version": str(version), "base_sha256": basis.manifest["identity"]["sha256"]}
    if adapter:
        _write_merged_adapter(cfg, basis, version, state, out, meta, say)
        return out, version
    library = "transformers" if cfg.base.kind == "transformers" else "open_clip"
    text = card.render(card.metadata(basis, version, cfg.base.model, library, base_pretrained=cfg.base.pretrained))
    say(f"writing {out}")
    if cfg.base.kind != "transformers":
        return write_file(state, out, {"format": "pt", **meta}, text), version
    return write_hf_folder(state, models.hf_model_dir(cfg.base), out, meta, text, max_shard_bytes), version


def _open_with_base(cfg: Config) -> Basis:
    """The configured basis with its base: an open_clip base's local safetensors file read as it is when
    it holds exactly the weights the basis was built on (``Basis.open`` checks their sha256), which
    spares the open_clip import (about 3 s of a 7 s export, benchmarks/export_time.py); otherwise the
    model built."""
    path = Path(cfg.base.pretrained or "")
    if cfg.base.kind != "transformers" and path.suffix == ".safetensors" and path.is_file():
        try:
            return Basis.open(cfg.paths.basis_dir, load_file(path), settings=cfg.basis)
        except BasisError:   # other weights in the file (or another reason, which the built base meets again)
            pass
    return Basis.open(cfg.paths.basis_dir, models.load_base(cfg)[0], settings=cfg.basis)


def _write_merged_adapter(cfg: Config, basis: Basis, version: int, state: dict[str, Tensor], out: Path,
                          meta: dict[str, str], say: Say) -> None:
    """The basis version as a LoRA adapter: each matrix ``c U diag(s) V^T`` (``c`` its calibration
    factor), the averaged parameters as the adapter carries them (``store.adapter``)."""
    from axis_stream.store.adapter import AdapterPlan, write_adapter

    if basis.settings.strategy != "axis":
        raise BasisError(f"{cfg.paths.basis_dir}: --merged --adapter needs a factored basis (strategy axis); "
                         f"strategy {basis.settings.strategy!r} keeps dense matrices")
    snapshot = basis.load(version)
    factors = {name: (f.U, f.s * snapshot.calibration.get(name, 1.0), f.V) for name, f in snapshot.factors.items()}
    say(f"building {cfg.base.model} for PEFT")
    module = models.create_base(cfg.base)
    say(f"writing the adapter {out}")

    def text(plan: AdapterPlan) -> str:
        return card.render(card.metadata(basis, version, cfg.base.model, "peft", adapter=plan.summary()))

    plan = write_adapter(module, state, factors, snapshot.means, out, base_model=cfg.base.model, card=text,
                         metadata=meta)
    if plan.dropped:
        say(f"not in the adapter (no PEFT form; the full export has them): {', '.join(plan.dropped)}")


def check_out(out: Path) -> None:
    """An export never replaces anything: ``out`` must be new, in a folder that exists."""
    if out.exists() or card_path(out).exists():
        raise BasisError(f"{out}: already exists; remove it or choose another --out")
    if not out.parent.is_dir():
        raise BasisError(f"{out}: folder {out.parent} does not exist")


def card_path(out: Path) -> Path:
    """Where a one-file export's card goes (beside it); a folder export's card is its ``README.md``."""
    return out.with_name(f"{out.stem}.{card.CARD_FILE}") if out.suffix == ".safetensors" else out / card.CARD_FILE


def write_file(state: dict[str, Tensor], out: Path, metadata: dict[str, str], text: str) -> Path:
    """One safetensors file ``out`` (byte-reproducible) and its card beside it, each crash-safe."""
    atomic.atomic_write(out, lambda p: save_sorted(state, p, metadata))
    atomic.atomic_write(card_path(out), lambda p: p.write_text(text))
    return out


def write_folder(out: Path, fill: Callable[[Path], None]) -> Path:
    """A new folder ``out``: ``fill(tmp)`` writes its files under a temporary name; fsynced, made
    group-readable, renamed."""
    out = Path(out)
    if out.exists():
        raise BasisError(f"{out}: already exists; remove it or choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.mkdir()
        fill(tmp)
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


def write_hf_folder(state: dict[str, Tensor], base_dir: Path, out: Path, metadata: dict[str, str], text: str,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """A new Hugging Face folder ``out``: ``base_dir``'s files but its weights and card, ``state`` as the
    weights, ``text`` as its ``README.md``."""
    def fill(tmp: Path) -> None:
        _copy_non_weights(base_dir, tmp)
        write_hf_weights(state, tmp, {"format": "pt", **metadata}, max_shard_bytes)
        (tmp / card.CARD_FILE).write_text(text)

    return write_folder(out, fill)


def load_line(base: BaseConfig, out: Path, adapter: bool = False) -> str:
    """One line of Python that loads export ``out`` in a fresh interpreter (absolute paths; an open_clip
    model config registered first, a transformers base by the class its config names)."""
    out = out.resolve()
    if base.kind != "transformers":
        register = (f"open_clip.add_model_config({str(Path(base.model_config).resolve())!r}); "
                    if base.model_config is not None else "")
        return f"import open_clip; {register}model = open_clip.create_model({base.model!r}, pretrained={str(out)!r})"
    folder = models.hf_model_dir(base).resolve()
    arch = (hf_config(folder).get("architectures") or ["AutoModel"])[0]
    if not adapter:
        return f"import transformers; model = transformers.{arch}.from_pretrained({str(out)!r})"
    return (f"import peft, transformers; model = peft.PeftModel.from_pretrained("
            f"transformers.{arch}.from_pretrained({str(folder)!r}), {str(out)!r})")


def _copy_non_weights(base_dir: Path, dest: Path) -> None:
    """The base folder's config, tokenizer and other files (not its weights or card, not dot-files) into ``dest``."""
    for entry in base_dir.iterdir():
        if (entry.name.startswith(".") or entry.name in HF_WEIGHTS or entry.name.startswith(SHARD_PREFIXES)
                or entry.name == card.CARD_FILE):
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
