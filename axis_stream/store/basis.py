"""The persistent merged basis of one base model: versioned, crash-safe, folded one checkpoint at a time.

A basis directory::

    CURRENT                        the current version's directory name ("v000004"), replaced atomically
    LOCK                           flock'ed by the one process changing the basis (fold, rollback)
    versions/v000004/
        factors.safetensors        "<param>::U", "<param>::s", "<param>::V" of every matrix parameter
        means.safetensors          running means of the other parameters' task deltas (float32);
                                   a parameter not stored has an all-zero mean delta
        manifest.json              format, base identity, settings, per-matrix state, the ledger of
                                   folded sources, and the sha256 of each file above
    versions/.tmp-*, .trash-*      a version being written or pruned (removed on the next open)

Versions are immutable. A fold or a rollback writes a whole new version under a temporary name,
fsyncs every file and the directory, renames it, then replaces ``CURRENT``; a process killed at
any instant leaves the old or the new version current. Version numbers only grow: a rollback
writes a new version holding an older version's content (its files hard-linked). The newest
``keep_versions`` versions are kept.

Provenance ("each source's share"): per matrix, the basis's energy ``sum(s**2)`` is attributed to
the sources. A fold keeps the top ``k - new_kept`` components of the previous basis (carrying the
previous shares) and ``new_kept`` components of the new source (energy ``energy_kept *
||delta||^2``); the new shares are the two parts' energy fractions. "Energy kept" of a matrix is
its basis energy over the sum of its folded task matrices' energies.

With ``k_mode = "gavish-donoho"``, each fold sets a matrix's K to the larger of its current rank
and the Gavish-Donoho rank of the new task matrix's full spectrum (an extra ``svdvals`` per fold).

A fold's cost does not depend on how many sources were folded before, except for the manifest,
which carries the ledger and the shares: about 13 KB of JSON per source for ViT-B-32's 48 matrices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from axis_stream import errors
from axis_stream.config import BasisConfig, Config
from axis_stream.core import layout, stage1
from axis_stream.core.stage1 import Factors
from axis_stream.store import atomic, ingest, models

FORMAT_VERSION = 1
CURRENT = "CURRENT"
LOCK = "LOCK"
VERSIONS = "versions"
FACTORS = "factors.safetensors"
MEANS = "means.safetensors"
MANIFEST = "manifest.json"
STRUCTURAL_SETTINGS = ("matrix_patterns", "conv_as_matrix", "k_mode", "k_fraction", "k_count")
"""Settings fixed when a basis is created. The others (svd, svd_tol, keep_versions, trust_pickles)
come from the settings given to ``Basis.open``, or from the manifest when none are given."""
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_MEAN_CHUNK = 1 << 20  # elements per float64 running-mean step: bounds the temporaries
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FoldRecord:
    """One folded source: what the ledger keeps of it."""

    version: int                    # the basis version this fold created
    file: str
    sha256: str
    size: int
    folded_at: str                  # ISO 8601, UTC
    seconds: float                  # reading, validating and folding (the write follows)
    matrices: dict[str, dict[str, Any]]  # name -> k, rank, new_kept, energy_kept, svd_method, svd_error
    new_kept_total: int
    energy_kept: float              # mean over the matrices the source changed
    relative_norm: float            # ||tau|| / ||theta_pre|| over the weights it holds
    mapping: str                    # how its names were mapped onto the base's

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """One line for a log or the CLI."""
        return (f"folded {self.file} -> version {self.version}: {self.new_kept_total} new components, "
                f"energy kept {self.energy_kept:.1%}, |tau|/|base| {self.relative_norm:.3f}, {self.seconds:.1f} s")

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FoldRecord":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclass
class BasisSnapshot:
    """One version in memory: factors in matrix form (conv weights flattened) and mean deltas."""

    version: int
    factors: dict[str, Factors]     # every matrix parameter; rank 0 until a source changed it
    means: dict[str, Tensor]        # a missing name means an all-zero delta
    count: int                      # number of folded sources
    manifest: dict[str, Any]


class Basis:
    """A basis directory. Build with ``Basis.create`` or ``Basis.open``; reads always see the
    current version on disk, so several processes may read while one folds."""

    def __init__(self, directory: Path, settings: BasisConfig, base: Mapping[str, Tensor] | None):
        self.directory = directory
        self.settings = settings
        self._base = base
        self._manifests: dict[int, dict[str, Any]] = {}

    # --- construction ---

    @classmethod
    def create(cls, directory: str | Path, base_state_dict: Mapping[str, Tensor],
               settings: BasisConfig, identity: Mapping[str, str] | None = None) -> "Basis":
        """Write version 0 (no sources) for this base. ``identity``: name, pretrained and optionally
        sha256 (checked against the weights; computed when absent)."""
        directory = Path(directory)
        identity = identity or {}
        settings.validate()
        if (directory / CURRENT).exists():
            raise errors.BasisError(f"{directory}: already holds a basis; open it instead")
        sha = models.weights_sha256(base_state_dict)
        if identity.get("sha256") not in (None, sha):
            raise errors.BasisError(f"{directory}: identity sha256 {identity['sha256'][:12]} does not match "
                                    f"the base weights given ({sha[:12]})")
        names = layout.matrix_names(base_state_dict, settings.matrix_patterns, settings.conv_as_matrix)
        if not names:
            raise errors.BasisError(f"{directory}: no base parameter matches basis.matrix_patterns")
        (directory / VERSIONS).mkdir(parents=True, exist_ok=True)
        atomic.fsync_dir(directory.parent)
        atomic.fsync_dir(directory)
        self = cls(directory, settings, base_state_dict)
        if [v for v in self._version_dirs() if v > 0]:
            raise errors.BasisError(f"{directory}: holds versions but no {CURRENT} file: a damaged basis; "
                                    f"restore {CURRENT} or remove the directory")
        matrices = {}
        for name in names:
            shape = tuple(layout.as_matrix(base_state_dict[name]).shape)
            matrices[name] = {"shape": list(shape), "param_shape": list(base_state_dict[name].shape),
                              "k": self._static_k(shape), "rank": 0, "energy": 0.0,
                              "source_energy": 0.0, "share": []}
        manifest = {
            "format_version": FORMAT_VERSION, "version": 0, "parent": None, "restored_from": None,
            "created_at": _now(),
            "identity": {"name": identity.get("name", ""), "pretrained": identity.get("pretrained", ""),
                         "sha256": sha},
            "settings": dataclasses.asdict(settings),
            "count": 0, "matrices": matrices, "means": [], "ledger": [],
        }
        with self._locked():
            self._clean_leftovers(current=-1)  # an interrupted create's version 0 holds no sources
            self._commit(manifest, lambda tmp: self._write_tensors(tmp, {}, {}))
        return self

    @classmethod
    def open(cls, directory: str | Path, base_state_dict: Mapping[str, Tensor] | None = None, *,
             settings: BasisConfig | None = None) -> "Basis":
        """Open an existing basis, cleaning up after a killed writer. With the base state dict
        (needed to fold and for ``materialize(with_base=True)``) its sha256 must match."""
        directory = Path(directory)
        self = cls(directory, BasisConfig(), base_state_dict)
        with self._locked(blocking=False) as got:
            if got:
                self._clean_leftovers(self.version)
        manifest = self.manifest
        if manifest.get("format_version") != FORMAT_VERSION:
            raise errors.BasisError(f"{directory}: format version {manifest.get('format_version')}, "
                                    f"this axis-stream reads {FORMAT_VERSION}")
        stored = manifest["settings"]
        known = {f.name for f in dataclasses.fields(BasisConfig)}
        given = settings or BasisConfig(**{k: v for k, v in stored.items() if k in known})
        for key in STRUCTURAL_SETTINGS:
            if getattr(given, key) != stored[key]:
                raise errors.BasisError(f"{directory}: built with basis.{key} = {stored[key]!r}, the config "
                                        f"says {getattr(given, key)!r}; use a new basis directory for new settings")
        self.settings = given
        if base_state_dict is not None:
            sha, ident = models.weights_sha256(base_state_dict), manifest["identity"]
            if sha != ident["sha256"]:
                raise errors.BasisError(f"{directory}: was built for base {ident['name']}/{ident['pretrained']} "
                                        f"(sha256 {ident['sha256'][:12]}), not for these weights ({sha[:12]})")
        return self

    # --- reading ---

    @property
    def version(self) -> int:
        """The current version (read from disk, so a fold in another process shows)."""
        try:
            name = (self.directory / CURRENT).read_text().strip()
        except FileNotFoundError:
            raise errors.BasisError(f"{self.directory}: not a basis (no {CURRENT} file)") from None
        m = _VERSION_DIR.match(name)
        if not m:
            raise errors.BasisError(f"{self.directory / CURRENT}: names {name!r}, not a version")
        return int(m.group(1))

    @property
    def manifest(self) -> dict[str, Any]:
        """The current version's manifest."""
        return self._manifest(self.version)

    def versions(self) -> list[int]:
        """The versions on disk that can be loaded or rolled back to, oldest first."""
        current = self.version
        return sorted(v for v in self._version_dirs() if v <= current)

    def history(self, version: int | None = None) -> list[FoldRecord]:
        """The ledger: the sources folded into ``version``, in folding order."""
        return [FoldRecord.from_json(e) for e in self._manifest(self._pick(version))["ledger"]]

    def load(self, version: int | None = None) -> BasisSnapshot:
        """A version's tensors in memory (files checked against their sha256 first)."""
        version = self._pick(version)
        manifest = self._manifest(version)
        vdir = self._vdir(version)
        factors, means = self._read_verified(vdir / FACTORS, manifest), self._read_verified(vdir / MEANS, manifest)
        out = {}
        for name, info in manifest["matrices"].items():
            m, n = info["shape"]
            if info["rank"] == 0:
                out[name] = Factors(torch.zeros(m, 0), torch.zeros(0), torch.zeros(n, 0))
            else:
                out[name] = Factors(factors[f"{name}::U"], factors[f"{name}::s"], factors[f"{name}::V"])
        return BasisSnapshot(version, out, means, manifest["count"], manifest)

    def verify(self, version: int | None = None) -> None:
        """Check every file of a version against its manifest: sha256, names, shapes, finiteness."""
        snap = self.load(version)
        where = self._vdir(snap.version)
        for name, info in snap.manifest["matrices"].items():
            f, (m, n), r = snap.factors[name], info["shape"], info["rank"]
            if (tuple(f.U.shape), tuple(f.s.shape), tuple(f.V.shape)) != ((m, r), (r,), (n, r)):
                raise errors.BasisError(f"{where}: factors of {name} do not have rank {r} and shape {m}x{n}")
            if not all(bool(torch.isfinite(t).all()) for t in (f.U, f.s, f.V)):
                raise errors.BasisError(f"{where}: factors of {name} hold NaN or Inf")
        if sorted(snap.means) != sorted(snap.manifest["means"]):
            raise errors.BasisError(f"{where}: {MEANS} does not hold the means its manifest lists")
        if len(snap.manifest["ledger"]) != snap.count:
            raise errors.BasisError(f"{where}: the ledger has {len(snap.manifest['ledger'])} sources, "
                                    f"the count says {snap.count}")

    def materialize(self, version: int | None = None, *, with_base: bool = False) -> dict[str, Tensor]:
        """The dense merged task vector (float32, each tensor in its parameter's shape): every matrix
        parameter and every non-zero mean delta. ``with_base``: base + task vector for every base
        parameter, in the base's dtypes (a full model state dict for export)."""
        snap = self.load(version)
        tau = {name: snap.factors[name].to_dense().reshape(info["param_shape"])
               for name, info in snap.manifest["matrices"].items()}
        tau.update(snap.means)
        if not with_base:
            return tau
        base = self._need_base("materialize with_base")
        return {name: (b.float() + tau[name]).to(b.dtype) if name in tau else b.clone()
                for name, b in base.items()}

    # --- changing ---

    def fold_checkpoint(self, path: str | Path, *, progress: Progress | None = None) -> FoldRecord:
        """Read, validate and fold one checkpoint, write the new version, move the pointer.

        Raises an ``errors.CheckpointError`` subclass, with nothing changed, on bad input. Reads the
        checkpoint one tensor at a time; once this returns, the checkpoint is no longer needed.
        ``progress(done, total)`` is called after each matrix.
        """
        base = self._need_base("fold")
        start = time.perf_counter()
        with self._locked():
            self._clean_leftovers(self.version)
            snap = self.load()
            manifest = snap.manifest
            with ingest.read_checkpoint(path, base, trust_pickles=self.settings.trust_pickles,
                                        required=manifest["matrices"],
                                        base_sha256=manifest["identity"]["sha256"]) as ckpt:
                for entry in manifest["ledger"]:
                    if entry["sha256"] == ckpt.sha256:
                        raise errors.Duplicate(ckpt.path, f"already folded at version {entry['version']} "
                                                          f"(as {entry['file']})")
                matrices, stats = self._fold_matrices(ckpt, snap, progress)
                self._fold_means(ckpt, snap)
                ckpt.finish()
            changed = [s for s in stats.values() if s["svd_method"] != "unchanged"]
            record = FoldRecord(
                version=snap.version + 1, file=ckpt.path.name, sha256=ckpt.sha256, size=ckpt.size,
                folded_at=_now(), seconds=round(time.perf_counter() - start, 4), matrices=stats,
                new_kept_total=sum(s["new_kept"] for s in stats.values()),
                energy_kept=round(sum(s["energy_kept"] for s in changed) / len(changed), 6) if changed else 0.0,
                relative_norm=round(ckpt.relative_norm, 6), mapping=str(ckpt.mapping))
            new = dict(manifest, version=record.version, parent=snap.version, restored_from=None,
                       created_at=record.folded_at, count=snap.count + 1, matrices=matrices,
                       means=sorted(snap.means))
            new["ledger"] = manifest["ledger"] + [record.to_json()]
            self._commit(new, lambda tmp: self._write_tensors(tmp, snap.factors, snap.means))
        return record

    def rollback(self, version: int) -> int:
        """Make ``version``'s content current again, as a new version; returns that version number.

        Sources folded after ``version`` leave the ledger, so they can be folded again.
        """
        with self._locked():
            current = self.version
            self._clean_leftovers(current)
            if version not in self.versions():
                raise errors.BasisError(f"{self.directory}: no version {version} to roll back to "
                                        f"(have {', '.join(map(str, self.versions()))})")
            if version == current:
                return current
            old = self._manifest(version)
            src = self._vdir(version)
            self._read_verified(src / FACTORS, old, load=False)
            self._read_verified(src / MEANS, old, load=False)
            new = dict(old, version=current + 1, parent=current, restored_from=version, created_at=_now())

            def link(tmp: Path) -> None:
                for name in (FACTORS, MEANS):
                    try:
                        os.link(src / name, tmp / name)
                    except OSError:
                        shutil.copyfile(src / name, tmp / name)

            self._commit(new, link)
            return current + 1

    # --- folding, per parameter ---

    def _fold_matrices(self, ckpt: ingest.Checkpoint, snap: BasisSnapshot, progress: Progress | None
                       ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Fold every matrix of ``ckpt`` into ``snap.factors`` in place; new manifest entries and stats."""
        matrices, stats = {}, {}
        total = len(snap.manifest["matrices"])
        for i, (name, info) in enumerate(snap.manifest["matrices"].items()):
            current = snap.factors[name]
            d = ckpt.delta(name)
            if d is None:
                st = {"k": info["k"], "new_kept": 0, "energy_kept": 0.0, "svd_method": "unchanged",
                      "svd_error": 0.0}
                e_cur, e_new, delta_energy = 1.0, 0.0, 0.0
            else:
                delta = layout.as_matrix(d)
                del d
                k = self._fold_k(tuple(delta.shape), current, delta)
                new = stage1.fold(current if current.rank else None, delta, k, svd=self.settings.svd,
                                  tol=self.settings.svd_tol, seed=0)
                fs = new.stats
                delta_energy = float(torch.linalg.matrix_norm(delta)) ** 2
                kept_current = min(current.rank, k - fs.new_kept)
                e_cur = float(current.s[:kept_current].double().square().sum())
                e_new = fs.energy_kept * delta_energy
                st = {"k": k, "new_kept": fs.new_kept, "energy_kept": round(fs.energy_kept, 6),
                      "svd_method": fs.svd_method, "svd_error": float(f"{fs.svd_error:.3g}")}
                snap.factors[name] = current = Factors(new.U, new.s, new.V)
                del delta, new
            total_e = e_cur + e_new
            share = [x * e_cur / total_e if total_e else x for x in info["share"]]
            share.append(e_new / total_e if total_e else 0.0)
            st["rank"] = current.rank
            stats[name] = st
            matrices[name] = dict(info, k=st["k"], rank=current.rank,
                                  energy=float(current.s.double().square().sum()),
                                  source_energy=info["source_energy"] + delta_energy,
                                  share=[round(x, 6) for x in share])
            if progress is not None:
                progress(i + 1, total)
        return matrices, stats

    def _fold_means(self, ckpt: ingest.Checkpoint, snap: BasisSnapshot) -> None:
        """Update the running mean delta of every non-matrix parameter in ``snap.means`` in place."""
        base = self._need_base("fold")
        present = ckpt.mapping.names
        for name, b in base.items():
            if name in snap.manifest["matrices"] or not b.is_floating_point():
                continue
            d = ckpt.delta(name) if name in present else None
            mean = snap.means.get(name)
            if d is None and mean is None:
                continue
            if mean is None:
                mean = torch.zeros(b.shape, dtype=torch.float32)
            _update_mean_inplace(mean, snap.count, d)
            if bool(mean.any()):
                snap.means[name] = mean
            else:
                snap.means.pop(name, None)

    def _static_k(self, shape: tuple[int, int]) -> int:
        s = self.settings
        if s.k_mode == "count":
            return min(s.k_count, min(shape))
        return stage1.k_for(shape, s.k_fraction)  # gavish-donoho: a starting value, set per fold

    def _fold_k(self, shape: tuple[int, int], current: Factors, delta: Tensor) -> int:
        if self.settings.k_mode != "gavish-donoho":
            return self._static_k(shape)
        spectrum = torch.linalg.svdvals(delta)
        return max(current.rank, stage1.gavish_donoho_rank(spectrum, shape))

    # --- storage ---

    def _need_base(self, what: str) -> Mapping[str, Tensor]:
        if self._base is None:
            raise errors.BasisError(f"{self.directory}: {what} needs the base model; "
                                    f"open the basis with its base state dict")
        return self._base

    def _pick(self, version: int | None) -> int:
        current = self.version
        if version is None:
            return current
        if version > current:
            raise errors.BasisError(f"{self.directory}: no version {version} (current is {current})")
        return version

    def _vdir(self, version: int) -> Path:
        return self.directory / VERSIONS / f"v{version:06d}"

    def _version_dirs(self) -> list[int]:
        root = self.directory / VERSIONS
        return [int(m.group(1)) for p in root.iterdir() if (m := _VERSION_DIR.match(p.name))] \
            if root.is_dir() else []

    def _manifest(self, version: int) -> dict[str, Any]:
        if version not in self._manifests:
            path = self._vdir(version) / MANIFEST
            try:
                self._manifests[version] = json.loads(path.read_text())
            except FileNotFoundError:
                have = ", ".join(map(str, sorted(self._version_dirs()))) or "none"
                raise errors.BasisError(f"{self.directory}: no version {version} (have {have})") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise errors.BasisError(f"{path}: corrupt manifest ({exc})") from None
        return self._manifests[version]

    def _read_verified(self, path: Path, manifest: Mapping[str, Any], *, load: bool = True
                       ) -> dict[str, Tensor]:
        """A version's safetensors file, after checking it against the sha256 in its manifest."""
        expected = manifest["files"].get(path.name, {}).get("sha256")
        try:
            actual = ingest.file_sha256(path)
        except OSError as exc:
            raise errors.BasisError(f"{path}: cannot read ({exc.strerror})") from None
        if actual != expected:
            raise errors.BasisError(f"{path}: sha256 {actual[:12]} does not match the manifest's "
                                    f"{str(expected)[:12]}: the basis is corrupt; roll back to an older version")
        if not load:
            return {}
        try:
            f = ingest.SafetensorsFile(path)
        except errors.CheckpointError as exc:
            raise errors.BasisError(f"{path}: {exc.message}") from None
        try:
            return {k: f.read(k) for k in f.keys()}
        finally:
            f.close()

    @staticmethod
    def _write_tensors(tmp: Path, factors: Mapping[str, Factors], means: Mapping[str, Tensor]) -> None:
        flat = {f"{name}::{part}": getattr(f, part).contiguous()
                for name, f in factors.items() if f.rank for part in ("U", "s", "V")}
        save_file(flat, tmp / FACTORS)
        save_file({k: v.contiguous() for k, v in means.items()}, tmp / MEANS)

    def _commit(self, manifest: dict[str, Any], write_files: Callable[[Path], None]) -> None:
        """Write a version under a temporary name, fsync it, rename it, move ``CURRENT``, prune."""
        root = self.directory / VERSIONS
        name = f"v{manifest['version']:06d}"
        tmp = root / f".tmp-{name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        write_files(tmp)
        manifest["files"] = {}
        for f in (FACTORS, MEANS):
            atomic.fsync_file(tmp / f)
            manifest["files"][f] = {"sha256": ingest.file_sha256(tmp / f), "size": (tmp / f).stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        atomic.fsync_file(tmp / MANIFEST)
        atomic.fsync_dir(tmp)
        os.rename(tmp, root / name)
        atomic.fsync_dir(root)
        atomic.atomic_write_bytes(self.directory / CURRENT, f"{name}\n".encode())
        self._manifests[manifest["version"]] = manifest
        self._prune(manifest["version"])

    def _prune(self, current: int) -> None:
        """Keep the newest ``keep_versions`` versions; a pruned one is renamed away before deletion."""
        root = self.directory / VERSIONS
        for v in sorted(self._version_dirs())[:-self.settings.keep_versions]:
            if v < current:
                trash = root / f".trash-v{v:06d}-{secrets.token_hex(4)}"
                os.rename(self._vdir(v), trash)
                shutil.rmtree(trash)
                self._manifests.pop(v, None)

    def _clean_leftovers(self, current: int) -> None:
        """Remove what a killed writer left: temporary and half-pruned directories, versions newer
        than ``current`` (written but never made current), a temporary pointer file."""
        root = self.directory / VERSIONS
        for p in root.iterdir() if root.is_dir() else ():
            m = _VERSION_DIR.match(p.name)
            if p.name.startswith((".tmp-", ".trash-")) or (m and int(m.group(1)) > current):
                shutil.rmtree(p)
        for p in self.directory.glob(f".{CURRENT}.*.tmp"):
            p.unlink()

    @contextmanager
    def _locked(self, blocking: bool = True) -> Iterator[bool]:
        """The writers' lock (released by the kernel if the process dies); yields whether it was got."""
        if not self.directory.is_dir():
            raise errors.BasisError(f"{self.directory}: no such basis directory")
        with ExitStack() as stack:
            try:
                got = stack.enter_context(atomic.file_lock(self.directory / LOCK, blocking))
            except OSError as exc:
                if blocking:
                    raise errors.BasisError(f"{self.directory}: cannot lock for writing ({exc.strerror})") from None
                got = False  # a reader without write access: nothing to clean up
            yield got


def _update_mean_inplace(mean: Tensor, count: int, x: Tensor | None) -> None:
    """``stage1.update_mean`` over chunks, written into ``mean``; ``x = None`` is an all-zero delta."""
    flat_m = mean.view(-1)
    flat_x = None if x is None else x.reshape(-1)
    for i in range(0, flat_m.numel(), _MEAN_CHUNK):
        m = flat_m[i:i + _MEAN_CHUNK]
        xi = torch.zeros_like(m) if flat_x is None else flat_x[i:i + _MEAN_CHUNK]
        m.copy_(stage1.update_mean(m, count, xi))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the config's basis ---

def open_from_config(cfg: Config, directory: str | Path | None = None, *, create: bool = False) -> Basis:
    """The configured basis (``<state_dir>/basis`` unless ``directory``), with its base; ``create``
    builds an empty one if none exists yet."""
    directory = Path(directory) if directory is not None else cfg.paths.basis_dir
    base, identity = models.load_base(cfg)
    if create and not (directory / CURRENT).exists():
        return Basis.create(directory, base, cfg.basis, identity)
    return Basis.open(directory, base, settings=cfg.basis)
