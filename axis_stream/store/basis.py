"""The persistent merged basis of one base model: versioned, crash-safe, folded one checkpoint at a time.

A basis directory::

    CURRENT                        the current version's directory name ("v000004"), replaced atomically
    LOCK                           flock'ed by the one process changing the basis (fold, rollback)
    ledger.sqlite                  the ledger: one record per folded source (store/ledger.py)
    versions/v000004/
        factors-0007.safetensors   "<param>::U", "<param>::s", "<param>::V" of the 8th matrix parameter
                                   (none for a matrix of rank 0); hard-linked from the previous version
                                   when the fold left the matrix untouched (no new component entered)
        means.safetensors          running means of the other parameters' task deltas (float32);
                                   a parameter not stored has an all-zero mean delta
        manifest.json              format, base identity, settings, per-matrix state, the count, the
                                   lineage (which ledger records make this version's ledger), and the
                                   sha256 of each file above: its size does not grow with the sources
    versions/.tmp-*, .trash-*      a version being written or pruned (removed on the next open)

Versions are immutable. A fold or a rollback writes a whole new version under a temporary name (new
files under new names, unchanged ones hard-linked), fsyncs every new file and the directory, renames
it, commits the fold's ledger record, then replaces ``CURRENT``; a process killed at any instant
leaves the old or the new version current. The version is the source of truth: a ledger record of a
version newer than ``CURRENT`` (the pointer never moved) is dropped by the next writer, and a
version's ledger is the records its manifest's lineage names, so a rollback (a new version holding an
older version's content, its files hard-linked) takes the later sources out of the ledger by writing
the older lineage. Version numbers only grow. The newest ``keep_versions`` versions are kept.

Provenance (each source's share of a matrix's kept energy) is kept as ``store/records.py`` describes.
``Basis.fold_basis`` folds another basis of the same base into this one as one version: a
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from axis_stream import errors
from axis_stream.config import BasisConfig, Config
from axis_stream.core import layout, stage1
from axis_stream.core.stage1 import Factors
from axis_stream.store import atomic, ingest, ledger, models, versions
from axis_stream.store.records import BasisSnapshot, FoldRecord, entered, share_now
from axis_stream.store.threads import bounded_map
from axis_stream.store.versions import CURRENT, FACTORS, LOCK, MANIFEST, MEANS, VERSIONS  # noqa: F401 (the names)

FORMAT_VERSION = 2
STRUCTURAL_SETTINGS = ("matrix_patterns", "conv_as_matrix", "k_mode", "k_fraction", "k_count")
"""Settings fixed when a basis is created. The others (svd, svd_tol, keep_versions, trust_pickles)
come from the settings given to ``Basis.open``, or from the manifest when none are given."""
_FOLD_BYTES_PER_ENTRY = 16  # a matrix fold's working memory per entry: the delta and its SVD's (float32)
Progress = Callable[[int, int], None]


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
                              "source_energy": 0.0, "log_scale": 0.0, "reset": 0, "file": None}
        manifest = {
            "format_version": FORMAT_VERSION, "version": 0, "parent": None, "restored_from": None,
            "created_at": _now(),
            "identity": {"name": identity.get("name", ""), "pretrained": identity.get("pretrained", ""),
                         "sha256": sha},
            "settings": dataclasses.asdict(settings),
            "count": 0, "lineage": [], "share_base": 0, "matrices": matrices, "means": [],
        }
        with self._locked():
            self._clean_leftovers(current=-1)  # an interrupted create's version 0 holds no sources
            self._commit(manifest, lambda tmp: self._write_files(tmp, None, manifest["matrices"], {}, {}, set()))
        return self

    @classmethod
    def open(cls, directory: str | Path, base_state_dict: Mapping[str, Tensor] | None = None, *,
             settings: BasisConfig | None = None) -> "Basis":
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
        with self._locked(blocking=False) as got:
            if got:
                self._clean_leftovers(self.version)
                if self.manifest["format_version"] == 1:
                    self._migrate()
        if self.manifest["format_version"] == 1:
            raise errors.BasisError(f"{directory}: a basis of format 1, migrated by the first writer to open it; "
                                    f"open it once with write access (another process holds its lock)")
        return self

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
        """A version's tensors in memory (files checked against their sha256 first)."""
        version = self._pick(version)
        manifest = self._manifest(version)
        vdir = self._vdir(version)
        files = {f: versions.read_verified(vdir / f, manifest)
                 for f in dict.fromkeys(info["file"] for info in manifest["matrices"].values() if info["file"])}
        out = {}
        for name, info in manifest["matrices"].items():
            m, n = info["shape"]
            if info["rank"] == 0:
                out[name] = Factors(torch.zeros(m, 0), torch.zeros(0), torch.zeros(n, 0))
            else:
                tensors = files[info["file"]]
                out[name] = Factors(tensors[f"{name}::U"], tensors[f"{name}::s"], tensors[f"{name}::V"])
        means = versions.read_verified(vdir / MEANS, manifest)
        return BasisSnapshot(version, out, means, manifest["count"], manifest)

    def verify(self, version: int | None = None) -> None:
        """Check every file of a version against its manifest (sha256, names, shapes, finiteness) and
        that the ledger holds its sources."""
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
        lineage = snap.manifest["lineage"]
        if ledger.size(lineage) != snap.count:
            raise errors.BasisError(f"{where}: the lineage names {ledger.size(lineage)} sources, "
                                    f"the count says {snap.count}")
        if (held := self._ledger.count(lineage)) != snap.count:
            raise errors.BasisError(f"{self._ledger.path}: holds {held} of the {snap.count} sources of version "
                                    f"{snap.version}: the ledger lost records")

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

    def fold_checkpoint(self, path: str | Path, *, progress: Progress | None = None, workers: int = 1,
                        memory_budget: float = math.inf) -> FoldRecord:
        """Read, validate and fold one checkpoint, write the new version, move the pointer.

        Raises an ``errors.CheckpointError`` subclass, with nothing changed, on bad input. Reads the
        checkpoint one tensor at a time; once this returns, the checkpoint is no longer needed.
        ``progress(done, total)`` is called after each matrix. ``workers`` matrices fold at once (in
        threads, the same result) while their estimated working memory fits in ``memory_budget`` bytes.
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
                if (entry := self.has_source(ckpt.sha256)) is not None:
                    raise errors.Duplicate(ckpt.path, f"already folded at version {entry.version} "
                                                      f"(as {entry.file})")
                version = snap.version + 1
                matrices, stats, shares, changed = self._fold_matrices(ckpt.delta, snap, version, progress, workers,
                                                                        memory_budget)
                self._fold_means(snap, self._checkpoint_means(ckpt, manifest["matrices"]))
                ckpt.finish()
            folded = [s for s in stats.values() if s["svd_method"] != "unchanged"]
            record = FoldRecord(
                version=version, file=ckpt.path.name, sha256=ckpt.sha256, size=ckpt.size,
                folded_at=_now(), seconds=round(time.perf_counter() - start, 4), matrices=stats,
                new_kept_total=sum(s["new_kept"] for s in stats.values()),
                energy_kept=round(sum(s["energy_kept"] for s in folded) / len(folded), 6) if folded else 0.0,
                relative_norm=round(ckpt.relative_norm, 6), mapping=str(ckpt.mapping))
            new = dict(manifest, format_version=FORMAT_VERSION, version=version, parent=snap.version,
                       restored_from=None, created_at=record.folded_at, count=snap.count + 1,
                       lineage=ledger.extend(manifest["lineage"], version), matrices=matrices,
                       means=sorted(snap.means))
            self._commit(new, lambda tmp: self._write_files(tmp, manifest, matrices, snap.factors, snap.means,
                                                            changed),
                         before_pointer=lambda: self._ledger.add([(record.to_json(), shares)], new["share_base"]))
        return record

    def fold_basis(self, other: "Basis", *, workers: int = 1, memory_budget: float = math.inf) -> list[FoldRecord]:
        """Fold another basis of the same base and structural settings into this one, as one new version.

        ``other`` is a rank-K source: per matrix ``stage1.fold_factors``, means combined weighted by
        the counts. Its ledger records come along (the same files and sha256), numbered after this
        basis's; the new version is the last of those numbers. Returns them. A source this basis holds
        already is a ``BasisError`` naming it, with nothing changed. The commit is ``fold_checkpoint``'s.
        """
        with self._locked():
            self._clean_leftovers(self.version)
            snap, theirs = self.load(), other.load()
            manifest = snap.manifest
            for key, want in [("identity", manifest["identity"]["sha256"])] + [
                    (k, manifest["settings"][k]) for k in STRUCTURAL_SETTINGS]:
                have = theirs.manifest["identity"]["sha256"] if key == "identity" else theirs.manifest["settings"][key]
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
            matrices, _, entry, changed = self._fold_matrices(
                lambda name: theirs.factors[name] if theirs.factors[name].rank else None, snap, first, None,
                workers, memory_budget)
            for name, info in matrices.items():  # the task matrices behind the other basis's energy
                info["source_energy"] = manifest["matrices"][name]["source_energy"] + \
                    theirs.manifest["matrices"][name]["source_energy"]
            self._fold_means(snap, ((name, mean.shape, theirs.means.get(name)) for name, mean in
                                    {**theirs.means, **snap.means}.items()), weight=theirs.count)
            names = list(matrices)
            imported = [dataclasses.replace(r, version=first + i) for i, r in enumerate(records)]
            rows = [(r.to_json(), [[a * their_shares[name][i], log_scale] for name, (a, log_scale) in zip(names, entry)])
                    for i, r in enumerate(imported)]
            lineage = manifest["lineage"]
            for r in imported:
                lineage = ledger.extend(lineage, r.version)
            new = dict(manifest, format_version=FORMAT_VERSION, version=version, parent=snap.version,
                       restored_from=None, created_at=_now(), count=snap.count + theirs.count, lineage=lineage,
                       matrices=matrices, means=sorted(snap.means))
            self._commit(new, lambda tmp: self._write_files(tmp, manifest, matrices, snap.factors, snap.means,
                                                            changed),
                         before_pointer=lambda: self._ledger.add(rows, new["share_base"]))
        return imported

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

    # --- folding, per parameter ---

    def _fold_matrices(self, delta: Callable[[str], Tensor | Factors | None], snap: BasisSnapshot, version: int,
                       progress: Progress | None, workers: int, memory_budget: float
                       ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[list[float]], set[str]]:
        """Fold a source's matrices (``delta(name)``: a checkpoint's task matrix or another basis's
        factors) into ``snap.factors``, ``workers`` at a time: new manifest entries, stats, the source's
        entry shares, the matrices it changed (``version``: the first one being written)."""
        infos = snap.manifest["matrices"]

        def prepare(name: str) -> Callable[[], tuple]:
            d = delta(name)  # read here, in order; the fold may run in another thread
            return lambda: self._fold_matrix(infos[name], snap.factors[name], d, version)

        done = bounded_map(list(infos), prepare, lambda name: _FOLD_BYTES_PER_ENTRY * math.prod(infos[name]["shape"]),
                           workers=workers, budget=memory_budget, done=progress)
        changed = {name for name, r in done.items() if r[3] is not snap.factors[name]}
        snap.factors.update({name: r[3] for name, r in done.items()})
        return ({n: r[0] for n, r in done.items()}, {n: r[1] for n, r in done.items()},
                [r[2] for r in done.values()], changed)

    def _fold_matrix(self, info: dict[str, Any], current: Factors, d: Tensor | Factors | None, version: int
                     ) -> tuple[dict[str, Any], dict[str, Any], list[float], Factors]:
        """One matrix's fold: manifest entry, stats, entry share, factors (``current`` if none entered)."""
        if d is None:
            st = {"k": info["k"], "new_kept": 0, "energy_kept": 0.0, "svd_method": "unchanged", "svd_error": 0.0}
            e_cur, e_new, delta_energy, factors = 1.0, 0.0, 0.0, current
        else:
            k, new, delta_energy = self._fold_source(current, d)
            fs = new.stats
            kept_current = min(current.rank, k - fs.new_kept)
            e_cur = float(current.s[:kept_current].double().square().sum())
            e_new = fs.energy_kept * delta_energy
            st = {"k": k, "new_kept": fs.new_kept, "energy_kept": round(fs.energy_kept, 6),
                  "svd_method": fs.svd_method, "svd_error": float(f"{fs.svd_error:.3g}")}
            # stage1.fold hands back the current tensors when no new component entered
            factors = current if new.U is current.U else Factors(new.U, new.s, new.V)
            del new
        log_scale, reset, share = entered(info, e_cur, e_new, version)
        st["rank"] = factors.rank
        entry = dict(info, k=st["k"], rank=factors.rank, energy=float(factors.s.double().square().sum()),
                     source_energy=info["source_energy"] + delta_energy, log_scale=log_scale, reset=reset)
        return entry, st, [share, log_scale], factors

    def _fold_source(self, current: Factors, d: Tensor | Factors) -> tuple[int, Factors, float]:
        """K, the fold and the source's squared norm: a task matrix (``stage1.fold``) or another basis's factors."""
        cur = current if current.rank else None
        if isinstance(d, Factors):  # another basis: its K was chosen by its own folds
            k = max(current.rank, d.rank) if self.settings.k_mode == "gavish-donoho" else self._static_k(d.shape)
            return k, stage1.fold_factors(cur, d, k), float(d.s.double().square().sum())
        delta = layout.as_matrix(d)
        k = self._fold_k(tuple(delta.shape), current, delta)
        new = stage1.fold(cur, delta, k, svd=self.settings.svd, tol=self.settings.svd_tol, seed=0)
        return k, new, float(torch.linalg.matrix_norm(delta)) ** 2

    def _checkpoint_means(self, ckpt: ingest.Checkpoint, matrices: Mapping[str, Any]
                          ) -> Iterator[tuple[str, torch.Size, Tensor | None]]:
        """Each non-matrix parameter's delta in ``ckpt`` (None: absent, an all-zero delta), read lazily."""
        present = ckpt.mapping.names
        for name, b in self._need_base("fold").items():
            if name not in matrices and b.is_floating_point():
                yield name, b.shape, ckpt.delta(name) if name in present else None

    def _fold_means(self, snap: BasisSnapshot, deltas: Iterator[tuple[str, torch.Size, Tensor | None]],
                    weight: int = 1) -> None:
        """Update the running mean deltas in ``snap.means`` in place with a source's ``(name, shape,
        delta)``: a checkpoint's (``weight`` 1) or another basis's means of ``weight`` sources."""
        for name, shape, d in deltas:
            mean = snap.means.get(name)
            if d is None and mean is None:
                continue
            if mean is None:
                mean = torch.zeros(shape, dtype=torch.float32)
            stage1.update_mean_inplace(mean, snap.count, d, weight)
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
        return versions.vdir(self.directory, version)

    def _version_dirs(self) -> list[int]:
        return versions.version_dirs(self.directory)

    def _manifest(self, version: int) -> dict[str, Any]:
        if version not in self._manifests:
            self._manifests[version] = versions.read_manifest(self.directory, version)
        return self._manifests[version]

    def _write_files(self, tmp: Path, parent: Mapping[str, Any] | None, matrices: dict[str, dict[str, Any]],
                     factors: Mapping[str, Factors], means: Mapping[str, Tensor], changed: set[str]
                     ) -> dict[str, dict[str, Any]]:
        """A new version's tensor files in ``tmp``: each matrix's own factors file, hard-linked from
        ``parent`` when not ``changed``; sets ``matrices[name]["file"]``. Returns the linked files' entries."""
        linked = {}
        for i, (name, info) in enumerate(matrices.items()):
            f, old = factors.get(name), parent["matrices"][name]["file"] if parent else None
            if f is None or not f.rank:
                info["file"] = None
            elif name not in changed and old not in (None, FACTORS):
                info["file"] = old
                versions.link(self._vdir(parent["version"]) / old, tmp / old)
                linked[old] = parent["files"][old]
            else:
                info["file"] = f"factors-{i:04d}.safetensors"
                save_file({f"{name}::{part}": getattr(f, part).contiguous() for part in ("U", "s", "V")},
                          tmp / info["file"])
        save_file({k: v.contiguous() for k, v in means.items()}, tmp / MEANS)
        return linked

    def _commit(self, manifest: dict[str, Any], write_files: Callable[[Path], versions.Written],
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

    def _locked(self, blocking: bool = True) -> ContextManager[bool]:
        return versions.writer_lock(self.directory, blocking)


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
