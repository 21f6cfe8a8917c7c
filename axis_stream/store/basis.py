"""The persistent merged basis of one base model: versioned, crash-safe, folded one checkpoint at a time.

A basis directory::

    CURRENT                        the current version's directory name ("v000004"), replaced atomically
    LOCK                           flock'ed by the one process changing the basis (fold, rollback)
    ledger.sqlite                  the ledger: one record per folded source (store/ledger.py)
    versions/v000004/
        factors-0007.safetensors   "<param>::U", "<param>::s", "<param>::V" of the 8th matrix parameter
                                   (none for a matrix of rank 0), or its dense "<param>::state" for a
                                   continual strategy (none while all zero); hard-linked from the
                                   previous version when the fold left the matrix's state unchanged
        means.safetensors          running means of the other parameters' task deltas (float32), or
                                   the continual rule's state of each; one not stored is all zero
        manifest.json              format, base identity, settings, per-matrix state, the count and the
                                   sources' mean whole-model norm, the lineage (which ledger records
                                   make this version's ledger), and the sha256 of each file above:
                                   its size does not grow with the sources
    versions/.tmp-*, .trash-*      a version being written or pruned (removed on the next open)

Versions are immutable. A fold or a rollback writes a whole new version under a temporary name (new
files under new names, unchanged ones hard-linked), fsyncs every new file and the directory, renames
it, commits the fold's ledger record, then replaces ``CURRENT``; a process killed at any instant
leaves the old or the new version current. The version is the source of truth: a ledger record of a
version newer than ``CURRENT`` (the pointer never moved) is dropped by the next writer, and a
version's ledger is the records its manifest's lineage names, so a rollback (a new version holding an
older version's content, its files hard-linked) takes the later sources out of the ledger by writing
the older lineage. Version numbers only grow. The newest ``keep_versions`` versions are kept.

How a source is folded is the basis's strategy (``[basis] strategy``, ``store/folding.py``): AXIS's
top-K fold, or a continual merge keeping a dense state per parameter (``core/strategies.py``).
``load`` hands Stage 2 factors (a dense strategy's: the top-K SVD of each merged matrix);
``materialize`` gives the merged delta. Provenance (each source's share of a matrix's kept energy)
is kept as ``store/records.py`` describes.
``Basis.fold_basis`` folds another ``axis`` basis of the same base into this one as one version: a
basis is a rank-K source (``stage1.fold_factors``); its sources come along in the ledger.

With ``k_mode = "gavish-donoho"``, each fold sets a matrix's K to the larger of its current rank
and the Gavish-Donoho rank of the new task matrix's full spectrum (an extra ``svdvals`` per fold).

A fold's cost does not depend on how many sources were folded before. A basis of format 1 (the
ledger and the share lists inside every manifest, one factors file) is migrated when a writer opens
it: its records go into the ledger and a new version in format 2 holds the current content; older
format-1 versions stay readable and can be rolled back to.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import Tensor

from axis_stream import errors
from axis_stream.config import BasisConfig, Config
from axis_stream.core import layout
from axis_stream.core.calibration import SourceStats
from axis_stream.core.stage1 import Factors
from axis_stream.core.strategies import UNCHANGED, State
from axis_stream.store import atomic, ingest, ledger, models, prefetch, versions
from axis_stream.store.folding import Folder, FoldState, Progress, checked, joined_stats, stats_entry
from axis_stream.store.records import BasisSnapshot, FoldRecord, share_now
from axis_stream.store.versions import CURRENT, FACTORS, LOCK, MANIFEST, MEANS, VERSIONS, Written  # noqa: F401 (the names)

FORMAT_VERSION = 2
STRUCTURAL_SETTINGS = ("matrix_patterns", "conv_as_matrix", "k_mode", "k_fraction", "k_count", "strategy",
                       "strategy_params")
"""Settings fixed when a basis is created (a basis written before a setting existed has its default).
The others (svd, svd_tol, keep_versions, trust_pickles) come from the settings given to ``Basis.open``,
or from the manifest when none are given."""


class Basis:
    """A basis directory. Build with ``Basis.create`` or ``Basis.open``; reads always see the
    current version on disk, so several processes may read while one folds."""

    def __init__(self, directory: Path, settings: BasisConfig, base: Mapping[str, Tensor] | None):
        self.directory = directory
        self.settings = settings
        self._base = base
        self._manifests: dict[int, dict[str, Any]] = {}
        self._ledger = ledger.Ledger(directory)

    # --- construction ---

    @classmethod
    def create(cls, directory: str | Path, base_state_dict: Mapping[str, Tensor],
               settings: BasisConfig, identity: Mapping[str, str] | None = None) -> Basis:
        """Write version 0 (no sources) for this base. ``identity``: name, pretrained and optionally
        sha256 (checked against the weights; computed when absent)."""
        directory = Path(directory)
        identity = identity or {}
        settings.validate()
        settings = checked(settings, directory)
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
                              "k": self._folder.static_k(shape), "rank": 0, "energy": 0.0,
                              "source_energy": 0.0, "log_scale": 0.0, "reset": 0, "file": None,
                              **stats_entry(SourceStats())}
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "version": 0, "parent": None, "restored_from": None,
            "created_at": _now(),
            "identity": {"name": identity.get("name", ""), "pretrained": identity.get("pretrained", ""),
                         "sha256": sha},
            "settings": dataclasses.asdict(settings),
            "count": 0, "mean_norm": 0.0, "lineage": [], "share_base": 0, "matrices": matrices, "means": [],
        }
        with versions.writer_lock(self.directory):
            self._clean_leftovers(current=-1)  # an interrupted create's version 0 holds no sources
            self._commit(manifest, lambda tmp: self._write_files(tmp, None, manifest["matrices"], {}, {}, set()))
        return self

    @classmethod
    def open(cls, directory: str | Path, base_state_dict: Mapping[str, Tensor] | None = None, *,
             settings: BasisConfig | None = None) -> Basis:
        """Open an existing basis, cleaning up after a killed writer and migrating a format-1 basis.
        With the base state dict (needed to fold and for ``materialize(with_base=True)``) its sha256
        must match."""
        directory = Path(directory)
        self = cls(directory, BasisConfig(), base_state_dict)
        manifest = self.manifest
        if manifest.get("format_version") not in (1, FORMAT_VERSION):
            raise errors.BasisError(f"{directory}: format version {manifest.get('format_version')}, "
                                    f"this axis-stream reads {FORMAT_VERSION} (and migrates 1)")
        stored = manifest["settings"]
        known = {f.name for f in dataclasses.fields(BasisConfig)}
        given = checked(settings or BasisConfig(**{k: v for k, v in stored.items() if k in known}), directory)
        for key in STRUCTURAL_SETTINGS:
            if getattr(given, key) != (built := _stored(stored, key)):
                raise errors.BasisError(f"{directory}: built with basis.{key} = {built!r}, the config "
                                        f"says {getattr(given, key)!r}; use a new basis directory for new settings")
        self.settings = given
        if base_state_dict is not None:
            sha, ident = models.weights_sha256(base_state_dict), manifest["identity"]
            if sha != ident["sha256"]:
                raise errors.BasisError(f"{directory}: was built for base {ident['name']}/{ident['pretrained']} "
                                        f"(sha256 {ident['sha256'][:12]}), not for these weights ({sha[:12]})")
        with versions.writer_lock(self.directory, blocking=False) as got:
            if got:
                self._clean_leftovers(self.version)
                if self.manifest["format_version"] == 1:
                    self._migrate()
        if self.manifest["format_version"] == 1:
            raise errors.BasisError(f"{directory}: a basis of format 1, migrated by the first writer to open it; "
                                    f"open it once with write access (another process holds its lock)")
        return self

    @property
    def _folder(self) -> Folder:
        return Folder(self.settings)

    def close(self) -> None:
        """Close the ledger's connection (the next use reopens it): a reader then holds no file open."""
        self._ledger.close()

    # --- reading ---

    @property
    def version(self) -> int:
        """The current version (read from disk, so a fold in another process shows)."""
        try:
            name = (self.directory / CURRENT).read_text().strip()
        except FileNotFoundError:
            raise errors.BasisError(f"{self.directory}: not a basis (no {CURRENT} file)") from None
        m = versions.VERSION_DIR.match(name)
        if not m:
            raise errors.BasisError(f"{self.directory / CURRENT}: names {name!r}, not a version")
        return int(m.group(1))

    @property
    def manifest(self) -> dict[str, Any]:
        """The current version's manifest."""
        return self._manifest(self.version)

    def manifest_of(self, version: int | None = None) -> dict[str, Any]:
        """A version's manifest (default the current)."""
        return self._manifest(self._pick(version))

    @property
    def count(self) -> int:
        """How many sources the current version holds."""
        return int(self.manifest["count"])

    def versions(self) -> list[int]:
        """The versions on disk that can be loaded or rolled back to, oldest first."""
        current = self.version
        return sorted(v for v in self._version_dirs() if v <= current)

    def ledger(self, version: int | None = None, offset: int = 0, limit: int | None = None) -> list[FoldRecord]:
        """The sources folded into ``version`` (default the current), in folding order: ``limit`` of
        them from the ``offset``-th (all by default)."""
        lineage = self._manifest(self._pick(version))["lineage"]
        return [FoldRecord.from_json(e) for e in self._ledger.page(lineage, offset, limit)]

    def has_source(self, sha256: str) -> FoldRecord | None:
        """The current version's record of the source with these bytes (the duplicate check)."""
        found = self._ledger.find(sha256, self.manifest["lineage"])
        return FoldRecord.from_json(found) if found else None

    def shares(self, version: int | None = None) -> tuple[list[FoldRecord], dict[str, list[float]]]:
        """A version's sources and, per matrix, each source's share of the kept energy (in their order)."""
        manifest = self._manifest(self._pick(version))
        records = self.ledger(manifest["version"])
        rows = self._ledger.shares(manifest["share_base"], manifest["lineage"])
        if len(rows) != len(records):
            raise errors.BasisError(f"{self._ledger.path}: {len(rows)} share records for the "
                                    f"{len(records)} sources of version {manifest['version']}")
        return records, {name: [share_now(info, r.version, row[j]) for r, row in zip(records, rows)]
                         for j, (name, info) in enumerate(manifest["matrices"].items())}

    def nbytes(self, version: int | None = None) -> int:
        """Bytes of a version's tensor files (as its manifest records them)."""
        return sum(int(f["size"]) for f in self._manifest(self._pick(version))["files"].values())

    def disk_use(self) -> dict[int, tuple[int, int]]:
        """Per version on disk: (bytes of its files, bytes only it holds: not hard-linked elsewhere)."""
        return {v: versions.disk_use(self._vdir(v)) for v in self.versions()}

    def ledger_nbytes(self) -> int:
        """Bytes of the ledger file on disk."""
        return self._ledger.nbytes()

    def load(self, version: int | None = None) -> BasisSnapshot:
        """A version's basis as Stage 2 takes it (files checked against their sha256 first): AXIS's
        factors and running means, or a dense strategy's top-K SVD of each merged matrix and the
        merged deltas of the other parameters."""
        state, folder = self._state(version), self._folder
        if not folder.strategy.dense:
            return BasisSnapshot(state.version, cast(dict[str, Factors], state.matrices), state.vectors,
                                 state.scalars.count, state.manifest, self._calibration(state))
        infos = state.manifest["matrices"]
        factors, means = folder.strategy.stage2(_present(state), state.scalars,
                                                {name: info["k"] for name, info in infos.items()}, folder.params)
        return BasisSnapshot(state.version, {name: factors.get(name) or _empty(info) for name, info in infos.items()},
                             means, state.scalars.count, state.manifest)

    def _state(self, version: int | None = None) -> FoldState:
        """A version's strategy state in memory (files checked against their sha256 first)."""
        version = self._pick(version)
        manifest = self._manifest(version)
        vdir = self._vdir(version)
        files = {f: versions.read_verified(vdir / f, manifest)
                 for f in dict.fromkeys(info["file"] for info in manifest["matrices"].values() if info["file"])}
        dense, out = self._folder.strategy.dense, cast("dict[str, State | None]", {})
        for name, info in manifest["matrices"].items():
            if dense:
                out[name] = files[info["file"]][f"{name}::state"] if info["file"] else None
            elif info["rank"] == 0:
                out[name] = _empty(info)
            else:
                tensors = files[info["file"]]
                out[name] = Factors(tensors[f"{name}::U"], tensors[f"{name}::s"], tensors[f"{name}::V"])
        return FoldState(version, out, versions.read_verified(vdir / MEANS, manifest), manifest)

    def _calibration(self, state: FoldState) -> dict[str, float]:
        """Per matrix the calibration factor of ``basis.calibration`` where it is not 1 (a matrix whose
        statistics are unknown, folded before they were kept, keeps 1)."""
        return {name: c for name, c in self._folder.calibration(state).items() if c is not None and c != 1.0}

    def calibration_summary(self, version: int | None = None) -> dict[str, Any]:
        """A version's calibration at a glance: the rule, each matrix's factor (None: statistics
        unknown; matrices with no component left out), and the min / median / max of the known ones."""
        state, folder = self._state(version), self._folder
        factors = folder.calibration(state)
        values = sorted(c for c in factors.values() if c is not None) or [1.0]
        rule = "n/a (a dense strategy scales by its own rule)" if folder.strategy.dense else self.settings.calibration
        return {"rule": rule, "factors": factors, "min": values[0], "median": values[len(values) // 2],
                "max": values[-1]}

    def verify(self, version: int | None = None) -> None:
        """Check every file of a version against its manifest (sha256, names, shapes, finiteness) and
        that the ledger holds its sources."""
        state = self._state(version)
        where, count = self._vdir(state.version), state.scalars.count
        for name, info in state.manifest["matrices"].items():
            f, (m, n), r = state.matrices[name], info["shape"], info["rank"]
            if isinstance(f, Factors):
                parts, what, shape = [f.U, f.s, f.V], f"factors of {name}", f"rank {r} and shape {m}x{n}"
                good = (tuple(f.U.shape), tuple(f.s.shape), tuple(f.V.shape)) == ((m, r), (r,), (n, r))
            else:
                parts, what, shape = [] if f is None else [f], f"dense state of {name}", f"shape {m}x{n}"
                good = all(tuple(p.shape) == (m, n) for p in parts)
            if not good:
                raise errors.BasisError(f"{where}: {what}: not of {shape}")
            if not all(bool(torch.isfinite(t).all()) for t in parts):
                raise errors.BasisError(f"{where}: {what} hold NaN or Inf")
        if sorted(state.vectors) != sorted(state.manifest["means"]):
            raise errors.BasisError(f"{where}: {MEANS} does not hold the means its manifest lists")
        lineage = state.manifest["lineage"]
        if ledger.size(lineage) != count:
            raise errors.BasisError(f"{where}: the lineage names {ledger.size(lineage)} sources, "
                                    f"the count says {count}")
        if (held := self._ledger.count(lineage)) != count:
            raise errors.BasisError(f"{self._ledger.path}: holds {held} of the {count} sources of version "
                                    f"{state.version}: the ledger lost records")

    def materialize(self, version: int | None = None, *, with_base: bool = False) -> dict[str, Tensor]:
        """The dense merged task vector (float32, each tensor in its parameter's shape): every matrix
        parameter and every non-zero merged delta of the others (the strategy's merged delta, with
        its scaling). ``with_base``: base + task vector for every base parameter, in the base's dtypes
        (a full model state dict for export)."""
        state, folder = self._state(version), self._folder
        merged = folder.strategy.merged(_present(state), state.scalars, folder.params)
        if not folder.strategy.dense:
            for name, c in self._calibration(state).items():
                merged[name] = merged[name] * c
        tau = {name: merged[name].reshape(info["param_shape"]) if name in merged else torch.zeros(info["param_shape"])
               for name, info in state.manifest["matrices"].items()}
        tau.update((name, t) for name, t in merged.items() if name not in tau and bool(t.any()))
        if not with_base:
            return tau
        base = self._need_base("materialize with_base")
        return {name: (b.float() + tau[name]).to(b.dtype) if name in tau else b.clone()
                for name, b in base.items()}

    # --- changing ---

    def fold_checkpoint(self, path: str | Path, *, progress: Progress | None = None, workers: int = 1,
                        memory_budget: float = math.inf, tick: Callable[[], None] | None = None,
                        hashed: prefetch.Hashed | None = None) -> FoldRecord:
        """Read, validate and fold one checkpoint, write the new version, move the pointer (``tick``:
        called while it is hashed and read; ``hashed``: its sha256 taken ahead; ``ingest.read_checkpoint``).

        Raises an ``errors.CheckpointError`` subclass, with nothing changed, on bad input. Reads the
        checkpoint one tensor at a time; once this returns, the checkpoint is no longer needed.
        ``progress(done, total)`` is called after each matrix. ``workers`` matrices fold at once (in
        threads, the same result) while their estimated working memory fits in ``memory_budget`` bytes.
        """
        base = self._need_base("fold")
        start = time.perf_counter()
        with versions.writer_lock(self.directory):
            self._clean_leftovers(self.version)
            snap, folder = self._state(), self._folder
            manifest = snap.manifest
            with ingest.read_checkpoint(path, base, trust_pickles=self.settings.trust_pickles, tick=tick, hashed=hashed,
                                        other_architectures=self.settings.allow_other_architectures,
                                        required=manifest["matrices"],
                                        base_sha256=manifest["identity"]["sha256"]) as ckpt:
                if (entry := self.has_source(ckpt.sha256)) is not None:
                    raise errors.Duplicate(ckpt.path, f"already folded at version {entry.version} "
                                                      f"(as {entry.file})")
                version = snap.version + 1
                fold = folder.matrices(ckpt.delta, snap, version, progress, workers, memory_budget)
                sq = fold.source_energy + folder.vectors(snap, self._checkpoint_means(ckpt, manifest["matrices"]))
                ckpt.finish()
            matrices, stats = fold.entries, fold.stats
            folded = [s for s in stats.values() if s["svd_method"] != UNCHANGED]
            record = FoldRecord(
                version=version, file=ckpt.path.name, sha256=ckpt.sha256, size=ckpt.size,
                folded_at=_now(), seconds=round(time.perf_counter() - start, 4), matrices=stats,
                new_kept_total=sum(s["new_kept"] for s in stats.values()),
                energy_kept=round(sum(s["energy_kept"] for s in folded) / len(folded), 6) if folded else 0.0,
                relative_norm=round(ckpt.relative_norm, 6), mapping=str(ckpt.mapping), architecture=ckpt.architecture)
            scalars = snap.scalars.after(math.sqrt(sq))
            new = dict(manifest, format_version=FORMAT_VERSION, version=version, parent=snap.version,
                       settings=dict(manifest["settings"], calibration=self.settings.calibration),  # the one in force
                       restored_from=None, created_at=record.folded_at, count=scalars.count,
                       mean_norm=scalars.mean_norm, lineage=ledger.extend(manifest["lineage"], version),
                       matrices=matrices, means=sorted(snap.vectors))
            self._commit(new, lambda tmp: self._write_files(tmp, manifest, matrices, snap.matrices, snap.vectors,
                                                            fold.changed),
                         before_pointer=lambda: self._ledger.add([(record.to_json(), fold.shares)], new["share_base"]))
        return record

    def fold_basis(self, other: Basis, *, workers: int = 1, memory_budget: float = math.inf) -> list[FoldRecord]:
        """Fold another basis of the same base and structural settings into this one, as one new version.

        ``other`` is a rank-K source: per matrix ``stage1.fold_factors``, means combined weighted by
        the counts. Its ledger records come along (the same files and sha256), numbered after this
        basis's; the new version is the last of those numbers. Returns them. A source this basis holds
        already is a ``BasisError`` naming it, with nothing changed. The commit is ``fold_checkpoint``'s.
        """
        if self.settings.strategy != "axis":
            raise errors.BasisError(f"{self.directory}: fold_basis needs basis.strategy = 'axis', this basis's is "
                                    f"{self.settings.strategy!r}: folding a basis into a basis is defined for AXIS's "
                                    f"factors, not for dense continual states")
        with versions.writer_lock(self.directory):
            self._clean_leftovers(self.version)
            snap, theirs, folder = self._state(), other.load(), self._folder
            manifest = snap.manifest
            for key, want in [("identity", manifest["identity"]["sha256"])] + [
                    (k, _stored(manifest["settings"], k)) for k in STRUCTURAL_SETTINGS]:
                have = (theirs.manifest["identity"]["sha256"] if key == "identity"
                        else _stored(theirs.manifest["settings"], key))
                if have != want:
                    raise errors.BasisError(f"{other.directory}: cannot be folded into {self.directory}: its "
                                            f"{'base sha256' if key == 'identity' else 'basis.' + key} is "
                                            f"{have!r}, not {want!r}")
            records, their_shares = other.shares(theirs.version)
            for r in records:
                if (held := self.has_source(r.sha256)) is not None:
                    raise errors.BasisError(f"{other.directory}: its source {r.file} (sha256 {r.sha256[:12]}) is "
                                            f"already in {self.directory} (folded at version {held.version} as "
                                            f"{held.file}); nothing folded")
            if not records:
                return []
            first, version = snap.version + 1, snap.version + len(records)
            fold = folder.matrices(lambda name: theirs.factors[name] if theirs.factors[name].rank else None, snap,
                                   first, None, workers, memory_budget)
            matrices, stats, entry = fold.entries, fold.stats, fold.shares
            for name, info in matrices.items():  # the task matrices behind the other basis's energy
                ours, their_info = manifest["matrices"][name], theirs.manifest["matrices"][name]
                info["source_energy"] = ours["source_energy"] + their_info["source_energy"]
                info.update(stats_entry(joined_stats(info, ours, their_info, stats[name]["energy_kept"])))
            folder.vectors(snap, ((name, mean.shape, theirs.means.get(name)) for name, mean in
                                  {**theirs.means, **snap.vectors}.items()), weight=theirs.count)
            names = list(matrices)
            imported = [dataclasses.replace(r, version=first + i) for i, r in enumerate(records)]
            rows = [(r.to_json(), [[a * their_shares[name][i], log_scale] for name, (a, log_scale) in zip(names, entry)])
                    for i, r in enumerate(imported)]
            lineage = manifest["lineage"]
            for r in imported:
                lineage = ledger.extend(lineage, r.version)
            new = dict(manifest, format_version=FORMAT_VERSION, version=version, parent=snap.version,
                       restored_from=None, created_at=_now(), count=snap.scalars.count + theirs.count,
                       lineage=lineage, matrices=matrices, means=sorted(snap.vectors))
            self._commit(new, lambda tmp: self._write_files(tmp, manifest, matrices, snap.matrices, snap.vectors,
                                                            fold.changed),
                         before_pointer=lambda: self._ledger.add(rows, new["share_base"]))
        return imported

    def rollback(self, version: int) -> int:
        """Make ``version``'s content current again, as a new version; returns that version number.

        Sources folded after ``version`` leave the ledger, so they can be folded again.
        """
        with versions.writer_lock(self.directory):
            current = self.version
            self._clean_leftovers(current)
            if version not in self.versions():
                raise errors.BasisError(f"{self.directory}: no version {version} to roll back to "
                                        f"(have {', '.join(map(str, self.versions()))})")
            if version == current:
                return current
            old = self._manifest(version)
            src = self._vdir(version)
            for name in old["files"]:
                versions.read_verified(src / name, old, load=False)
            self._commit(dict(old, format_version=FORMAT_VERSION, version=current + 1, parent=current,
                              restored_from=version, created_at=_now()),
                         lambda tmp: versions.link_all(src, tmp, old))
            return current + 1

    def _migrate(self) -> None:
        """Format 1 to 2 (under the lock): every on-disk version's records into the ledger, then a new
        version holding the current content in format 2 (one factors file per matrix)."""
        current = self.version
        for v in self.versions():
            raw = versions.read_manifest(self.directory, v, as_stored=True)
            if raw.get("format_version") != 1:
                continue
            names = list(raw["matrices"])
            self._ledger.import_records(
                raw["ledger"], base=v,
                shares=[(e["version"], [[raw["matrices"][n]["share"][i], 0.0] for n in names])
                        for i, e in enumerate(raw["ledger"])])
        snap = self.load(current)
        matrices = {name: dict(info) for name, info in snap.manifest["matrices"].items()}
        new = dict(snap.manifest, format_version=FORMAT_VERSION, version=current + 1, parent=current,
                   restored_from=current, created_at=_now(), matrices=matrices)
        self._commit(new, lambda tmp: self._write_files(tmp, None, matrices, snap.factors, snap.means,
                                                        set(matrices)))

    # --- folding, per parameter (store/folding.py) ---

    def _checkpoint_means(self, ckpt: ingest.Checkpoint, matrices: Mapping[str, Any]
                          ) -> Iterator[tuple[str, torch.Size, Tensor | None]]:
        """Each non-matrix parameter's delta in ``ckpt`` (None: absent, an all-zero delta), read lazily."""
        present = ckpt.mapping.names
        for name, b in self._need_base("fold").items():
            if name not in matrices and b.is_floating_point():
                yield name, b.shape, ckpt.delta(name) if name in present else None

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
        return versions.vdir(self.directory, version)

    def _version_dirs(self) -> list[int]:
        return versions.version_dirs(self.directory)

    def _manifest(self, version: int) -> dict[str, Any]:
        if version not in self._manifests:
            self._manifests[version] = versions.read_manifest(self.directory, version)
        return self._manifests[version]

    def _write_files(self, tmp: Path, parent: Mapping[str, Any] | None, matrices: dict[str, dict[str, Any]],
                     states: Mapping[str, Factors | Tensor | None], means: Mapping[str, Tensor], changed: set[str]
                     ) -> dict[str, dict[str, Any]]:
        """A new version's tensor files in ``tmp``: each matrix's own factors file (its factors or its
        dense state), hard-linked from ``parent`` when not ``changed``; sets ``matrices[name]["file"]``.
        Returns the linked files' entries."""
        linked = {}
        for i, (name, info) in enumerate(matrices.items()):
            f, old = states.get(name), parent["matrices"][name]["file"] if parent else None
            if f is None or (isinstance(f, Factors) and not f.rank):
                info["file"] = None
            elif parent is not None and name not in changed and old not in (None, FACTORS):
                info["file"] = old
                versions.link(self._vdir(parent["version"]) / old, tmp / old)
                linked[old] = parent["files"][old]
            else:
                info["file"] = f"factors-{i:04d}.safetensors"
                parts = {part: getattr(f, part) for part in ("U", "s", "V")} if isinstance(f, Factors) else {"state": f}
                save_file({f"{name}::{part}": t.contiguous() for part, t in parts.items()}, tmp / info["file"])
        save_file({k: v.contiguous() for k, v in means.items()}, tmp / MEANS)
        return linked

    def _commit(self, manifest: dict[str, Any], write_files: Callable[[Path], Written],
                before_pointer: Callable[[], None] | None = None) -> None:
        """Write the new version (``versions.write_version``), then prune."""
        versions.write_version(self.directory, manifest, write_files, before_pointer)
        self._manifests[manifest["version"]] = manifest
        self._prune(manifest["version"])

    def _prune(self, current: int) -> None:
        """Keep the newest ``keep_versions`` versions."""
        for v in sorted(self._version_dirs())[:-self.settings.keep_versions]:
            if v < current:
                versions.remove_version(self.directory, v)
                self._manifests.pop(v, None)

    def _clean_leftovers(self, current: int) -> None:
        """What a killed writer left, the ledger records of versions never made current among it."""
        versions.clean_leftovers(self.directory, current)
        if self._ledger.path.exists():
            self._ledger.drop_after(current)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _stored(settings: Mapping[str, Any], key: str) -> Any:
    """A manifest's structural setting; a basis written before the setting existed has its default."""
    return settings[key] if key in settings else getattr(BasisConfig(), key)


def _empty(info: Mapping[str, Any]) -> Factors:
    """The rank-0 factors of a matrix no source changed yet."""
    m, n = info["shape"]
    return Factors(torch.zeros(m, 0), torch.zeros(0), torch.zeros(n, 0))


def _present(state: FoldState) -> dict[str, Any]:
    """A version's stored states by name, matrices and the other parameters together."""
    return {**{name: s for name, s in state.matrices.items() if s is not None}, **state.vectors}


# --- the config's basis ---

def open_from_config(cfg: Config, directory: str | Path | None = None, *, create: bool = False) -> Basis:
    """The configured basis (``<state_dir>/basis`` unless ``directory``), with its base; ``create``
    builds an empty one if none exists yet."""
    directory = Path(directory) if directory is not None else cfg.paths.basis_dir
    base, identity = models.load_base(cfg)
    if create and not (directory / CURRENT).exists():
        return Basis.create(directory, base, cfg.basis, identity)
    return Basis.open(directory, base, settings=cfg.basis)
