"""The persistent basis: equal to chained Stage 1 folds, bit-exact on disk, crash-safe, and unchanged by bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from test_ingest import BAD, _write_bad, one_thread  # noqa: F401 (autouse fixture)

from axis_stream import errors
from axis_stream.cli import main
from axis_stream.config import BasisConfig
from axis_stream.core import entering, layout, stage1
from axis_stream.render import basis_summary_lines
from axis_stream.store import atomic, ledger, readers
from axis_stream.store.basis import Basis
from axis_stream.testing import finetuned_like

IDENTITY = {"name": "axis-tiny", "pretrained": "test"}


def settings(**kw) -> BasisConfig:
    return BasisConfig(**{"svd": "exact", **kw})


def task_matrices(sd, base, names):
    return {n: layout.as_matrix(sd[n].float() - base[n].float()) for n in names}


def snapshot_equal(a, b) -> bool:
    return (a.factors.keys() == b.factors.keys() and a.means.keys() == b.means.keys()
            and all(torch.equal(getattr(a.factors[n], p), getattr(b.factors[n], p))
                    for n in a.factors for p in "UsV")
            and all(torch.equal(a.means[n], b.means[n]) for n in a.means))


@pytest.fixture
def new_basis(tiny_base, tmp_path):
    _, base = tiny_base

    def make(name="basis", **kw) -> Basis:
        return Basis.create(tmp_path / name, base, settings(**kw), IDENTITY)

    return make


@pytest.mark.parametrize("k_mode", ["fraction", "count", "gavish-donoho"])
def test_folding_equals_chained_stage1_and_means_equal_the_batch_mean(tiny_base, make_checkpoint, new_basis,
                                                                      tmp_path, k_mode):
    _, base = tiny_base
    basis = new_basis(k_mode=k_mode, k_count=5)
    seeds = [11, 12, 13, 14]
    # the last one is image-encoder-only and leaves one mean unchanged: absent names count as tau = 0
    sds = [finetuned_like(base, s) for s in seeds]
    sds[-1]["visual.ln_post.bias"] = base["visual.ln_post.bias"].clone()
    paths = [make_checkpoint(s) for s in seeds[:-1]]
    paths.append(tmp_path / "visual-only.safetensors")
    save_file({k[7:]: v for k, v in sds[-1].items() if k.startswith("visual.")}, paths[-1])
    names = list(basis.manifest["matrices"])
    for i, path in enumerate(paths):
        record = basis.fold_checkpoint(path)
        assert record.version == i + 1 and basis.version == i + 1 and record.file == path.name
    chained: dict[str, stage1.Factors | None] = dict.fromkeys(names)
    for sd in sds:
        for n, delta in task_matrices(sd, base, names).items():
            cur = chained[n]
            if k_mode == "fraction":
                k = stage1.k_for(delta.shape, 0.10)
            elif k_mode == "count":
                k = min(5, min(delta.shape))
            else:
                k = max(cur.rank if cur else 0, stage1.gavish_donoho_rank(torch.linalg.svdvals(delta), delta.shape))
            chained[n] = stage1.fold(cur, delta, k, svd="exact")
    snap = basis.load()
    assert snap.count == 4 and len(basis.ledger()) == 4
    for n in names:
        got, want = snap.factors[n], chained[n]
        assert torch.equal(got.U, want.U) and torch.equal(got.s, want.s) and torch.equal(got.V, want.V), n
        assert snap.manifest["matrices"][n]["rank"] == want.rank
    # non-matrix parameters: the plain float64 batch mean of the task deltas (text tower: all zero)
    dense = basis.materialize()
    for n, b in base.items():
        if n in names:
            want = chained[n].to_dense().double() * snap.calibration.get(n, 1.0)   # the calibrated merged matrix
            assert torch.allclose(dense[n].double(), want.reshape(b.shape), atol=1e-6)
            continue
        mean = sum(sd[n].double() - b.double() for sd in sds) / len(sds)
        if not mean.any():
            assert n not in snap.means and n not in dense, n
        else:
            assert torch.allclose(snap.means[n].double(), mean, atol=1e-6, rtol=0), n
    assert "visual.ln_post.bias" in snap.means  # changed by three of the four
    assert not any(n.startswith("transformer.") for n in snap.means)


def test_reopened_basis_is_bit_identical_and_the_checkpoint_is_not_needed(tiny_base, make_checkpoint,
                                                                          new_basis):
    _, base = tiny_base
    basis = new_basis()
    for seed in (21, 22):
        path = make_checkpoint(seed)
        basis.fold_checkpoint(path)
        path.unlink()  # durable once fold_checkpoint returned
    written = basis.load()
    dense = basis.materialize()
    reopened = Basis.open(basis.directory, base)
    reopened.verify()
    assert reopened.version == 2 and snapshot_equal(reopened.load(), written)
    again = reopened.materialize()
    assert dense.keys() == again.keys() and all(torch.equal(dense[n], again[n]) for n in dense)
    full = reopened.materialize(with_base=True)
    assert full.keys() == base.keys()
    for n, b in base.items():
        want = b.float() + dense[n] if n in dense else b
        assert full[n].dtype == b.dtype and torch.allclose(full[n].float(), want, atol=1e-6)


def test_the_ledger_and_provenance(tiny_base, make_checkpoint, new_basis):
    basis = new_basis()
    paths = [make_checkpoint(s) for s in (31, 32, 33)]
    calls = []
    for p in paths:
        basis.fold_checkpoint(p, progress=lambda done, total: calls.append((done, total)))
    n_matrices = len(basis.manifest["matrices"])
    assert calls[-n_matrices:] == [(i + 1, n_matrices) for i in range(n_matrices)]
    ledger = basis.ledger()
    assert [r.file for r in ledger] == [p.name for p in paths] and [r.version for r in ledger] == [1, 2, 3]
    first = ledger[0]
    assert first.new_kept_total == sum(info["k"] for info in basis.manifest["matrices"].values())
    assert all(s["new_kept"] == s["k"] and s["svd_method"] == "exact" for s in first.matrices.values())
    records, shares = basis.shares()
    assert [r.version for r in records] == [1, 2, 3]
    for name, info in basis.manifest["matrices"].items():
        assert len(shares[name]) == 3 and abs(sum(shares[name]) - 1) < 1e-6
        assert 0 < info["energy"] <= info["source_energy"]
    text = "\n".join(basis_summary_lines(basis))
    assert "ckpt-31" in text and "version 3" in text


def test_versions_keep_and_rollback(tiny_base, make_checkpoint, new_basis):
    _, base = tiny_base
    basis = new_basis(keep_versions=3)
    paths = [make_checkpoint(s) for s in (41, 42, 43, 44)]
    snaps = {}
    for p in paths:
        version = basis.fold_checkpoint(p).version
        snaps[version] = basis.load()
    assert basis.versions() == [2, 3, 4]
    with pytest.raises(errors.BasisError, match="no version 1"):
        basis.rollback(1)
    assert basis.rollback(2) == 5
    assert basis.version == 5 and basis.versions() == [3, 4, 5]
    restored = basis.load()
    assert restored.count == 2 and snapshot_equal(restored, snaps[2])
    assert basis.manifest["restored_from"] == 2 and [r.file for r in basis.ledger()] == [p.name for p in paths[:2]]
    basis.fold_checkpoint(paths[2])  # rolled away, so no longer a duplicate
    assert basis.version == 6 and snapshot_equal(basis.load(), snaps[3])
    Basis.open(basis.directory, base).verify()


def test_open_checks_the_base_settings_and_files(tiny_base, make_checkpoint, new_basis):
    _, base = tiny_base
    basis = new_basis()
    basis.fold_checkpoint(make_checkpoint(51))
    other = {k: v + 1 if v.is_floating_point() else v for k, v in base.items()}
    with pytest.raises(errors.BasisError, match="was built for base axis-tiny/test"):
        Basis.open(basis.directory, other)
    with pytest.raises(errors.BasisError, match="k_fraction"):
        Basis.open(basis.directory, base, settings=settings(k_fraction=0.5))
    reader = Basis.open(basis.directory)  # no base: read-only use
    assert reader.load().count == 1
    with pytest.raises(errors.BasisError, match="needs the base model"):
        reader.fold_checkpoint(make_checkpoint(52))
    factors = basis.directory / "versions" / "v000001" / "factors-0000.safetensors"
    data = bytearray(factors.read_bytes())
    data[-3] ^= 0xFF
    factors.write_bytes(bytes(data))
    with pytest.raises(errors.BasisError, match="corrupt"):
        reader.verify()
    with pytest.raises(errors.BasisError, match="not a basis"):
        Basis.open(basis.directory.parent)


def test_leftovers_of_a_killed_write_are_removed_on_open(tiny_base, make_checkpoint, new_basis):
    _, base = tiny_base
    basis = new_basis()
    basis.fold_checkpoint(make_checkpoint(61))
    versions = basis.directory / "versions"
    shutil.copytree(versions / "v000001", versions / "v000002")  # renamed but never made current
    (versions / ".tmp-v000002-dead").mkdir()
    (versions / ".trash-v000000-dead").mkdir()
    (basis.directory / ".CURRENT.x1y2.tmp").write_text("v000002\n")
    reopened = Basis.open(basis.directory, base)
    assert sorted(p.name for p in versions.iterdir()) == ["v000000", "v000001"]
    assert not list(basis.directory.glob(".CURRENT*"))
    assert reopened.fold_checkpoint(make_checkpoint(62)).version == 2


class Crash(BaseException):
    """Stands for the process dying: nothing catches it and no cleanup runs in the basis code."""


@contextmanager
def _dying_at_step(monkeypatch, n: int) -> Iterator[None]:
    """Raise ``Crash`` right before the ``n``-th file-system or ledger step of the basis code."""
    import axis_stream.store.basis as basis_module

    steps = [(basis_module, "save_file"), (atomic, "fsync_file"), (atomic, "fsync_dir"), (os, "rename"),
             (os, "replace"), (os, "link"), (shutil, "rmtree"), (ledger.Ledger, "add"),
             (ledger.Ledger, "import_records")]
    calls = [0]
    with monkeypatch.context() as m:
        for owner, name in steps:
            real = getattr(owner, name)

            def step(*args, _real=real, **kw):
                calls[0] += 1
                if calls[0] == n:
                    raise Crash
                return _real(*args, **kw)

            m.setattr(owner, name, step)
        yield


def _crash_at_every_step(monkeypatch, seed: Basis, base, change) -> list[int]:
    """Run ``change(copy of seed)`` dying right before file-system step 1, 2, ... until it completes;
    after each, the copy reopens and verifies, its ledger is its versions' and, where the old version
    is current, its files are the seed's. Returns the current version after each try."""
    seed_state = _basis_state(seed.directory)
    outcomes, n = [], 0
    while True:
        n += 1
        target = seed.directory.parent / f"crash-{n}"
        shutil.copytree(seed.directory, target)
        try:
            with _dying_at_step(monkeypatch, n):
                change(target)
            crashed = False
        except Crash:
            crashed = True
        reopened = Basis.open(target, base)
        reopened.verify()
        outcomes.append(reopened.version)
        assert [r.version for r in reopened.ledger()] == list(range(1, reopened.version + 1))
        if reopened.version == seed.version:
            assert _basis_state(target) == seed_state
        if not crashed:
            return outcomes


@pytest.mark.parametrize("strategy", ["axis", "opcm"])
def test_a_crash_at_every_step_of_a_commit_leaves_the_old_or_the_new_version(tiny_base, make_checkpoint,
                                                                            new_basis, monkeypatch, strategy):
    """The deterministic complement of the SIGKILL test: die right before each file-system step
    (the ledger's commit among them); the ledger agrees with the version that is current. A dense
    strategy's states go through the same commit."""
    _, base = tiny_base
    seed = new_basis("seed", keep_versions=1, strategy=strategy)
    seed.fold_checkpoint(make_checkpoint(95, prefix=""))  # text and image matrices: the next fold links some
    new = make_checkpoint(96)
    outcomes = _crash_at_every_step(monkeypatch, seed, base,
                                    lambda target: Basis.open(target, base).fold_checkpoint(new))
    assert outcomes[-1] == 2 and outcomes.count(1) >= 6 and outcomes.count(2) >= 2, outcomes


def _basis_state(directory: Path) -> dict[str, object]:
    """Every file's bytes, the ledger by its rows (SQLite's own files change when it is only read)."""
    state: dict[str, object] = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
                                if p.is_file() and not p.name.startswith(ledger.FILE)}
    if (directory / ledger.FILE).exists():
        with closing(sqlite3.connect(directory / ledger.FILE)) as db:
            state[ledger.FILE] = [db.execute(f"SELECT * FROM {t} ORDER BY version").fetchall()
                                  for t in ("sources", "shares")]
    return state


@pytest.fixture(scope="module")
def folded_once(tiny_base, tmp_path_factory) -> tuple[Basis, Path]:
    """One basis with one folded checkpoint, shared by the bad-input tests (none may change it)."""
    _, base = tiny_base
    root = tmp_path_factory.mktemp("folded-once")
    first = root / "first.safetensors"
    save_file(finetuned_like(base, 71), first)
    basis = Basis.create(root / "basis", base, settings(), IDENTITY)
    basis.fold_checkpoint(first)
    return basis, first


@pytest.mark.parametrize("kind", sorted(set(BAD) | {"duplicate", "duplicate-renamed"}))
def test_bad_input_leaves_the_basis_unchanged(tiny_base, make_checkpoint, folded_once, tmp_path, kind):
    _, base = tiny_base
    basis, first = folded_once
    before = _basis_state(basis.directory)
    if kind == "duplicate":
        path, expected = first, errors.Duplicate
    elif kind == "duplicate-renamed":
        path, expected = tmp_path / "copy.safetensors", errors.Duplicate
        shutil.copyfile(first, path)
    else:
        path, kw = _write_bad(kind, base, tmp_path, lambda sd: make_checkpoint(72))
        assert set(kw.get("required", [])) <= set(basis.manifest["matrices"])  # the basis requires them all
        expected = BAD[kind]
    with pytest.raises(expected, match=f"^{path.name}: "):
        basis.fold_checkpoint(path)
    assert _basis_state(basis.directory) == before
    assert basis.version == 1


def test_cli_fold_show_history_rollback(tiny_base, make_checkpoint, tmp_path):
    base_cfg, _ = tiny_base
    cfg = tmp_path / "axis.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[base]\nmodel = "axis-tiny"\npretrained = "{base_cfg.pretrained}"\n'
                   f'model_config = "{base_cfg.model_config}"\n[basis]\nsvd = "exact"\n')
    runner = CliRunner()
    good = [make_checkpoint(81), make_checkpoint(82)]
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(os.urandom(100))
    res = runner.invoke(main, ["fold", *map(str, good), str(bad), "--config", str(cfg)])
    assert res.exit_code == 1, res.output
    assert "version 2" in res.output and "junk.safetensors" in res.output and "not_a_checkpoint" in res.output
    basis_dir = tmp_path / "state" / "basis"
    assert Basis.open(basis_dir).version == 2
    res = runner.invoke(main, ["basis", "show", "--config", str(cfg)])
    assert res.exit_code == 0 and "visual.transformer.resblocks.0.attn.in_proj_weight" in res.output
    assert "ckpt-81" in res.output and "ckpt-82" in res.output
    res = runner.invoke(main, ["basis", "history", "--basis", str(basis_dir)])
    assert res.exit_code == 0 and "ckpt-81.safetensors" in res.output and "ckpt-82.safetensors" in res.output
    res = runner.invoke(main, ["basis", "history", "--limit", "1", "--basis", str(basis_dir)])
    assert res.exit_code == 0 and "sources 2-2 of 2" in res.output and "ckpt-81" not in res.output
    res = runner.invoke(main, ["basis", "history", "--limit", "1", "--offset", "0", "--basis", str(basis_dir)])
    assert "sources 1-1 of 2" in res.output and "ckpt-81.safetensors" in res.output and "ckpt-82" not in res.output
    res = runner.invoke(main, ["basis", "rollback", "1", "--basis", str(basis_dir)])
    assert res.exit_code == 0 and "version 3" in res.output
    assert Basis.open(basis_dir).load().count == 1
    res = runner.invoke(main, ["basis", "rollback", "99", "--basis", str(basis_dir)])
    assert res.exit_code != 0 and "no version 99" in res.output


# --- crash safety: SIGKILL at random instants of a fold ---

HELPER = r"""
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)   # no thread pool before fork
from axis_stream.store import readers
from axis_stream.store.basis import Basis
f = readers.SafetensorsFile(sys.argv[1])
base = {k: f.read(k) for k in f.keys()}
f.close()
torch.linalg.svd(torch.randn(8, 4))  # load the linear algebra libraries once, here
print("ready", flush=True)
for line in sys.stdin:
    basis_dir, ckpt, delay = line.rstrip("\n").split("\t")
    delay = float(delay)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            Basis.open(basis_dir, base).fold_checkpoint(ckpt)
        except BaseException:
            os._exit(1)
        os._exit(0)
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if 0 <= delay <= time.perf_counter() - start:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed, status = True, None
            break
        time.sleep(0.0002)
    print(json.dumps({"killed": killed, "status": status, "seconds": time.perf_counter() - start}), flush=True)
"""


def test_sigkill_at_random_instants_leaves_the_old_or_the_new_version(tiny_base, make_checkpoint, tmp_path):
    base_cfg, base = tiny_base
    seed_basis = Basis.create(tmp_path / "seed", base, settings(keep_versions=1), IDENTITY)
    seed_basis.fold_checkpoint(make_checkpoint(91))
    new = make_checkpoint(92)
    reference = Basis.create(tmp_path / "reference", base, settings(keep_versions=1), IDENTITY)
    reference.fold_checkpoint(make_checkpoint(91))
    expected = {1: reference.load()}
    reference.fold_checkpoint(new)
    expected[2] = reference.load()

    helper = subprocess.Popen([sys.executable, "-c", HELPER, base_cfg.pretrained], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert helper.stdout.readline().strip() == "ready"

        def trial(i: int, delay: float) -> dict:
            target = tmp_path / f"trial-{i}"
            shutil.copytree(seed_basis.directory, target)
            helper.stdin.write(f"{target}\t{new}\t{delay}\n")
            helper.stdin.flush()
            return json.loads(helper.stdout.readline())

        runs = [trial(i, -1) for i in (0, 1)]  # no kill: how long a whole open + fold takes in the child
        assert all(r["status"] == 0 and not r["killed"] for r in runs)
        span = min(r["seconds"] for r in runs)
        # stratified over the whole fold, then again over its last fifth (write, fsync, rename, pointer, prune)
        rng = random.Random(1234)
        delays = [span * 1.05 * (j + rng.random()) / 16 for j in range(16)]
        delays += [span * (0.8 + 0.25 * (j + rng.random()) / 6) for j in range(6)]
        outcomes = []
        for i, delay in enumerate(delays, start=2):
            result = trial(i, delay)
            basis = Basis.open(tmp_path / f"trial-{i}", base)  # cleans up after the killed writer
            basis.verify()
            assert basis.version in (1, 2), result
            assert snapshot_equal(basis.load(), expected[basis.version])
            assert not [p for p in (basis.directory / "versions").iterdir() if p.name.startswith(".")]
            outcomes.append(basis.version)
            if basis.version == 1 and i % 4 == 0:  # the killed fold can simply be done again
                assert basis.fold_checkpoint(new).version == 2
                assert snapshot_equal(basis.load(), expected[2])
        assert 1 in outcomes  # the kills did land inside folds
    finally:
        helper.stdin.close()
        helper.wait(timeout=60)


# --- the ledger store: format-1 bases migrated on open, unchanged matrices shared between versions ---

def _downgrade_to_format_1(basis: Basis) -> None:
    """Rewrite every version on disk as format 1 wrote it (ledger and share lists in the manifest, one
    factors file) and remove the ledger: a basis as the previous axis-stream left it."""
    for v in basis.versions():
        man, (records, shares), snap = basis.manifest_of(v), basis.shares(v), basis.load(v)
        vdir = basis.directory / "versions" / f"v{v:06d}"
        for p in vdir.glob("factors-*.safetensors"):
            p.unlink()
        save_file({f"{n}::{part}": getattr(f, part).contiguous() for n, f in snap.factors.items() if f.rank
                   for part in "UsV"}, vdir / "factors.safetensors")
        old = {k: man[k] for k in ("version", "parent", "restored_from", "created_at", "identity", "settings",
                                   "count", "means")}
        old.update(format_version=1, ledger=[r.to_json() for r in records], files={
            "factors.safetensors": {"sha256": readers.file_sha256(vdir / "factors.safetensors"),
                                    "size": (vdir / "factors.safetensors").stat().st_size},
            "means.safetensors": man["files"]["means.safetensors"]})
        old["matrices"] = {n: {**{k: info[k] for k in ("shape", "param_shape", "k", "rank", "energy",
                                                        "source_energy")},
                               "share": [round(x, 6) for x in shares[n]]} for n, info in man["matrices"].items()}
        (vdir / "manifest.json").write_text(json.dumps(old, indent=1) + "\n")
    basis._ledger.close()
    for p in basis.directory.glob(ledger.FILE + "*"):
        p.unlink()


def _lineage_state(basis: Basis) -> dict[int, tuple]:
    return {v: (basis.ledger(v), basis.shares(v)[1], basis.load(v)) for v in basis.versions()}


def _same_lineage(a: tuple, b: tuple) -> bool:
    return (a[0] == b[0] and snapshot_equal(a[2], b[2]) and a[1].keys() == b[1].keys()
            and all(x == pytest.approx(y, abs=2e-6) for n in a[1] for x, y in zip(a[1][n], b[1][n])))


def test_a_format_1_basis_is_migrated_on_open_with_every_version_readable(tiny_base, make_checkpoint,
                                                                         new_basis):
    _, base = tiny_base
    basis = new_basis(keep_versions=10)
    paths = [make_checkpoint(s) for s in (101, 102, 103)]
    for p in paths:
        basis.fold_checkpoint(p)
    basis.rollback(1)
    basis.fold_checkpoint(paths[2])  # version 5: ledger = versions 1 and 5 (two ranges of the lineage)
    before = _lineage_state(basis)
    _downgrade_to_format_1(basis)
    assert "ledger" in json.loads((basis.directory / "versions" / "v000005" / "manifest.json").read_text())

    migrated = Basis.open(basis.directory, base)
    migrated.verify()
    assert migrated.version == 6 and migrated.manifest["restored_from"] == 5 and migrated.count == 2
    assert migrated.manifest["format_version"] == 2 and "ledger" not in migrated.manifest
    assert migrated.manifest["lineage"] == [[1, 1], [5, 5]]
    after = _lineage_state(migrated)
    assert sorted(after) == [*before, 6]
    assert all(_same_lineage(after[v], before[v]) for v in before) and _same_lineage(after[6], before[5])
    with pytest.raises(errors.Duplicate, match="already folded at version 5"):
        migrated.fold_checkpoint(paths[2])
    assert migrated.rollback(3) == 7  # to a format-1 version: its sources are back, the others gone
    assert _same_lineage(_lineage_state(migrated)[7], before[3])
    assert migrated.fold_checkpoint(make_checkpoint(104)).version == 8
    assert [r.version for r in migrated.ledger()] == [1, 2, 3, 8]
    Basis.open(basis.directory, base).verify()


def test_a_crash_at_every_step_of_the_migration_loses_nothing(tiny_base, make_checkpoint, new_basis, monkeypatch):
    _, base = tiny_base
    seed = new_basis("seed")
    for s in (111, 112):
        seed.fold_checkpoint(make_checkpoint(s))
    before = _lineage_state(seed)
    _downgrade_to_format_1(seed)
    n = 0
    while True:
        n += 1
        target = seed.directory.parent / f"migrate-{n}"
        shutil.copytree(seed.directory, target)
        try:
            with _dying_at_step(monkeypatch, n):
                Basis.open(target)
            crashed = False
        except Crash:
            crashed = True
        reopened = Basis.open(target, base)  # migrates if the killed one did not get that far
        reopened.verify()
        after = _lineage_state(reopened)
        assert reopened.version == 3 and all(_same_lineage(after[v], before[v]) for v in before)
        assert _same_lineage(after[3], before[2])
        if not crashed:
            break
    assert n > 8


def test_a_randomized_basis_attempts_per_matrix_as_its_last_folds_say(tiny_base, make_checkpoint, new_basis):
    basis = new_basis(k_mode="count", k_count=8, svd="randomized")
    paths, skipped, attempted = [make_checkpoint(s) for s in range(51, 56)], 0, 0
    for count, path in enumerate(paths):
        before = basis.manifest["matrices"]
        basis.fold_checkpoint(path)
        stats, after = basis.ledger()[-1].matrices, basis.manifest["matrices"]
        for name, info in before.items():
            s = stats[name]
            assert after[name]["entered"] == s["new_kept"]
            assert after[name]["failed_attempts"] == entering.failed_after(info.get("failed_attempts", 0),
                                                                           s["svd_method"])
            if count == 0:
                assert s["svd_method"] == "exact" and s["new_kept"] == 8   # an empty basis: the exact path
            elif entering.worth_attempting(tuple(info["shape"]), s["k"], info["entered"],
                                           info["failed_attempts"], count):
                attempted += 1
                assert s["svd_method"] in ("randomized", "randomized->exact"), name
            else:
                skipped += 1
                assert s["svd_method"] == "exact", name
    # the second fold skips every attempt (all 8 entered the first: they fill a 12-column block); later ones try
    assert skipped >= len(before) and attempted > 0


def test_a_fold_shares_the_files_of_the_matrices_it_leaves_untouched(tiny_base, make_checkpoint, new_basis):
    basis = new_basis(k_mode="count", k_count=2)
    basis.fold_checkpoint(make_checkpoint(121, prefix=""))       # every matrix
    basis.fold_checkpoint(make_checkpoint(122))                  # image tower only
    basis.fold_checkpoint(make_checkpoint(123, scale=1e-5))      # too weak: no component enters
    v1, v2, v3 = (basis.manifest_of(v) for v in (1, 2, 3))
    vdir = basis.directory / "versions"
    stats = basis.ledger()[1].matrices
    for name, info in v2["matrices"].items():
        first, second = (vdir / f"v00000{v}" / info["file"] for v in (1, 2))
        assert (first.stat().st_ino == second.stat().st_ino) == (stats[name]["new_kept"] == 0), name
    assert all(stats[n]["svd_method"] == "unchanged" for n in v2["matrices"] if not n.startswith("visual."))
    assert any(stats[n]["new_kept"] for n in v2["matrices"])
    assert all(s["new_kept"] == 0 for s in basis.ledger()[2].matrices.values())
    assert all(info["file"] == v2["matrices"][n]["file"] for n, info in v3["matrices"].items())
    assert all((vdir / "v000003" / info["file"]).stat().st_ino == (vdir / "v000002" / info["file"]).stat().st_ino
               for info in v3["matrices"].values())
    use = basis.disk_use()
    own_factors = sum(p.stat().st_size for p in (vdir / "v000003").glob("factors-*"))
    assert use[3][0] - use[3][1] >= own_factors > 0  # all of v3's factors are v2's
    basis.verify(3)
    text = "\n".join(basis_summary_lines(basis))
    assert "keep_versions 5" in text and "shared" in text


# --- folding one basis into another: a basis is a rank-K source ---

def _two_bases(new_basis, make_checkpoint, seeds=((131, 132), (133, 134)), **kw):
    left, right = new_basis("left", **kw), new_basis("right", **kw)
    for basis, pair in zip((left, right), seeds):
        for s in pair:
            basis.fold_checkpoint(make_checkpoint(s, prefix="" if s % 2 else "visual."))
    return left, right


def test_fold_basis_equals_the_in_memory_tree_fold_and_imports_the_ledger(tiny_base, make_checkpoint, new_basis):
    _, base = tiny_base
    left, right = _two_bases(new_basis, make_checkpoint)
    names = list(left.manifest["matrices"])
    sds = [finetuned_like(base, s, prefix="" if s % 2 else "visual.") for s in (131, 132, 133, 134)]
    shards = [{n: None for n in names} for _ in range(2)]
    for shard, pair in zip(shards, (sds[:2], sds[2:])):
        for sd in pair:
            for n, delta in task_matrices(sd, base, names).items():
                if delta.any():
                    shard[n] = stage1.fold(shard[n], delta, stage1.k_for(delta.shape), svd="exact")
    _, right_shares = right.shares()
    _, left_shares = left.shares()
    imported = left.fold_basis(Basis.open(right.directory))
    assert [r.version for r in imported] == [3, 4] and left.version == 4 and left.count == 4
    assert [(r.file, r.sha256) for r in left.ledger()] == [(r.file, r.sha256) for r in left.ledger(2) + right.ledger()]
    snap = left.load()
    for n in names:
        a, b = shards[0][n], shards[1][n]
        want = a if b is None else stage1.tree_reduce(
            [a, b], lambda x, y, b=b: stage1.fold_factors(x, y, stage1.k_for(b.shape)))
        got = snap.factors[n]
        assert torch.equal(got.U, want.U) and torch.equal(got.s, want.s) and torch.equal(got.V, want.V), n
    for n, b in base.items():  # means: the float64 batch mean of all four
        if n not in names and b.is_floating_point():
            mean = sum(sd[n].double() - b.double() for sd in sds) / 4
            assert torch.allclose(snap.means[n].double(), mean, atol=1e-6, rtol=0) if mean.any() else n not in snap.means
    _, shares = left.shares()
    for n, info in snap.manifest["matrices"].items():
        assert abs(sum(shares[n]) - 1) < 1e-6 and 0 < info["energy"] <= info["source_energy"]
        kept_right = sum(shares[n][2:])                   # what the right basis's components hold now
        assert shares[n][2:] == pytest.approx([kept_right * s for s in right_shares[n]], rel=1e-6, abs=1e-12)
        assert shares[n][:2] == pytest.approx([(1 - kept_right) * s for s in left_shares[n]], rel=1e-6, abs=1e-12)
    left.verify()
    assert left.rollback(2) == 5 and [r.file for r in left.ledger()] == [r.file for r in left.ledger(2)]


def test_fold_basis_refuses_a_source_it_holds_and_another_settings_basis(tiny_base, make_checkpoint, new_basis):
    left, right = _two_bases(new_basis, make_checkpoint, seeds=((141, 142), (143, 141)))
    before = _basis_state(left.directory)
    with pytest.raises(errors.BasisError, match=r"right: its source ckpt-141.safetensors \(sha256 [0-9a-f]{12}\) "
                                                r"is already in .*left \(folded at version 1 as ckpt-141"):
        left.fold_basis(right)
    other = new_basis("other", k_mode="count", k_count=2)
    other.fold_checkpoint(make_checkpoint(144))
    with pytest.raises(errors.BasisError, match="basis.k_mode is 'count', not 'fraction'"):
        left.fold_basis(other)
    dense = new_basis("dense", strategy="opcm")
    dense.fold_checkpoint(make_checkpoint(145))
    with pytest.raises(errors.BasisError, match="basis.strategy is 'opcm', not 'axis'"):
        left.fold_basis(dense)
    assert _basis_state(left.directory) == before
    dense_before = _basis_state(dense.directory)
    with pytest.raises(errors.BasisError) as info:   # a tree of dense states is not defined
        dense.fold_basis(left)
    assert str(info.value) == (f"{dense.directory}: fold_basis needs basis.strategy = 'axis', this basis's is "
                               f"'opcm': folding a basis into a basis is defined for AXIS's factors, not for "
                               f"dense continual states")
    assert _basis_state(dense.directory) == dense_before


def test_a_crash_at_every_step_of_fold_basis_leaves_the_old_or_the_new_version(tiny_base, make_checkpoint,
                                                                              new_basis, monkeypatch):
    _, base = tiny_base
    seed, right = _two_bases(new_basis, make_checkpoint, seeds=((151,), (152, 153)), keep_versions=1)
    outcomes = _crash_at_every_step(monkeypatch, seed, base,
                                    lambda target: Basis.open(target).fold_basis(Basis.open(right.directory)))
    assert outcomes[-1] == 3 and outcomes.count(1) >= 5 and outcomes.count(3) >= 2, outcomes
