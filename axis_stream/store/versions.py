"""The files of a basis's versions: names, manifests (format 1 read in format 2's shape), tensor
files checked against their sha256, hard links, and the crash-safe write of a new version.

See ``store/basis.py`` for the directory layout and the order of a commit.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from axis_stream import errors
from axis_stream.store import atomic, ledger, readers

CURRENT = "CURRENT"
LOCK = "LOCK"
VERSIONS = "versions"
FACTORS = "factors.safetensors"  # format 1: every matrix's factors in one file
MEANS = "means.safetensors"
MANIFEST = "manifest.json"
VERSION_DIR = re.compile(r"^v(\d{6,})$")
Written = dict[str, dict[str, Any]]  # file name -> {"sha256", "size"}


def vdir(directory: Path, version: int) -> Path:
    """The folder of ``version`` in the basis ``directory``."""
    return directory / VERSIONS / f"v{version:06d}"


def version_dirs(directory: Path) -> list[int]:
    """The version numbers with a folder in ``directory`` (any order)."""
    root = directory / VERSIONS
    return [int(m.group(1)) for p in root.iterdir() if (m := VERSION_DIR.match(p.name))] if root.is_dir() else []


def read_manifest(directory: Path, version: int, *, as_stored: bool = False) -> dict[str, Any]:
    """A version's manifest, a format-1 one in format 2's shape (it keeps ``format_version`` 1)
    unless ``as_stored``."""
    path = vdir(directory, version) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        have = ", ".join(map(str, sorted(version_dirs(directory)))) or "none"
        raise errors.BasisError(f"{directory}: no version {version} (have {have})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.BasisError(f"{path}: corrupt manifest ({exc})") from None
    return manifest if as_stored or manifest.get("format_version") != 1 else _from_format_1(manifest)


def _from_format_1(manifest: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (ledger and share lists inside, one factors file) in format 2's shape; its entry
    shares are in the ledger under ``share_base`` = its own version once the basis is migrated."""
    out = {k: v for k, v in manifest.items() if k != "ledger"}
    out["lineage"] = ledger.ranges(e["version"] for e in manifest["ledger"])
    out["share_base"] = manifest["version"]
    out["matrices"] = {name: {**{k: v for k, v in info.items() if k != "share"}, "log_scale": 0.0, "reset": 0,
                              "file": FACTORS if info["rank"] else None}
                       for name, info in manifest["matrices"].items()}
    return out


def read_verified(path: Path, manifest: Mapping[str, Any], *, load: bool = True) -> dict[str, Tensor]:
    """A version's safetensors file, after checking it against the sha256 in its manifest."""
    expected = manifest["files"].get(path.name, {}).get("sha256")
    try:
        actual = readers.file_sha256(path)
    except OSError as exc:
        raise errors.BasisError(f"{path}: cannot read ({exc.strerror})") from None
    if actual != expected:
        raise errors.BasisError(f"{path}: sha256 {actual[:12]} does not match the manifest's "
                                f"{str(expected)[:12]}: the basis is corrupt; roll back to an older version")
    if not load:
        return {}
    try:
        f = readers.SafetensorsFile(path)
    except errors.CheckpointError as exc:
        raise errors.BasisError(f"{path}: {exc.message}") from None
    try:
        return {k: f.read(k) for k in f.keys()}
    finally:
        f.close()


def link(src: Path, dest: Path) -> None:
    """A hard link (a copy where the file system has none): versions share unchanged files."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def link_all(src: Path, tmp: Path, manifest: Mapping[str, Any]) -> Written:
    """Every tensor file of the version in ``src`` hard-linked into ``tmp`` (a rollback); their entries."""
    for name in manifest["files"]:
        link(src / name, tmp / name)
    return dict(manifest["files"])


def write_version(directory: Path, manifest: dict[str, Any], write_files: Callable[[Path], Written],
                  before_pointer: Callable[[], None] | None = None) -> None:
    """Write a version under a temporary name (``write_files`` returns the entries of the files it
    linked rather than wrote), fsync what is new, rename it, call ``before_pointer``, move ``CURRENT``."""
    root = directory / VERSIONS
    name = f"v{manifest['version']:06d}"
    tmp = root / f".tmp-{name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    linked = write_files(tmp)
    manifest["files"] = {}
    for p in sorted(tmp.iterdir()):
        if p.name not in linked:
            atomic.own_mode(p)          # chosen, not by the umask (a linked file has its mode already)
            atomic.fsync_file(p)
        manifest["files"][p.name] = linked.get(p.name) or {"sha256": readers.file_sha256(p), "size": p.stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    atomic.own_mode(tmp / MANIFEST)
    atomic.own_mode(tmp, atomic.DIR_MODE)
    atomic.fsync_file(tmp / MANIFEST)
    atomic.fsync_dir(tmp)
    os.rename(tmp, root / name)
    atomic.fsync_dir(root)
    if before_pointer is not None:
        before_pointer()
    atomic.atomic_write_bytes(directory / CURRENT, f"{name}\n".encode())


def disk_use(folder: Path) -> tuple[int, int]:
    """(bytes of a version folder's files, bytes of those no other folder links to)."""
    stats = [p.stat() for p in folder.iterdir() if p.is_file()]
    return sum(st.st_size for st in stats), sum(st.st_size for st in stats if st.st_nlink == 1)


def remove_version(directory: Path, version: int) -> None:
    """Delete a version's folder: renamed away first, so a half-deleted one is never taken for a version."""
    trash = directory / VERSIONS / f".trash-v{version:06d}-{secrets.token_hex(4)}"
    os.rename(vdir(directory, version), trash)
    shutil.rmtree(trash)


def clean_leftovers(directory: Path, current: int) -> None:
    """Remove what a killed writer left: temporary and half-pruned folders, versions newer than
    ``current`` (written but never made current), a temporary pointer file."""
    root = directory / VERSIONS
    for p in root.iterdir() if root.is_dir() else ():
        m = VERSION_DIR.match(p.name)
        if p.name.startswith((".tmp-", ".trash-")) or (m and int(m.group(1)) > current):
            shutil.rmtree(p)
    for p in directory.glob(f".{CURRENT}.*.tmp"):
        p.unlink()


@contextmanager
def writer_lock(directory: Path, blocking: bool = True) -> Iterator[bool]:
    """The basis writers' lock (released by the kernel if the process dies); yields whether it was got."""
    if not directory.is_dir():
        raise errors.BasisError(f"{directory}: no such basis directory")
    with ExitStack() as stack:
        try:
            got = stack.enter_context(atomic.file_lock(directory / LOCK, blocking))
        except OSError as exc:
            if blocking:
                raise errors.BasisError(f"{directory}: cannot lock for writing ({exc.strerror})") from None
            got = False  # a reader without write access: nothing to clean up
        yield got
