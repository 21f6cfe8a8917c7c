"""axis-stream backfill: the daemon's basis from the same files in the same order (bit for bit), bad
files reported one line each while the run goes on, resumable after kill -9."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_basis import snapshot_equal
from test_ray import ray_local  # noqa: F401 (a local Ray with 2 CPUs)

from axis_stream import config, errors, render
from axis_stream.cli import main
from axis_stream.core import layout, stage1
from axis_stream.service import backfill_ray
from axis_stream.service.backfill import backfill, checkpoint_files
from axis_stream.service.daemon import FoldWorker
from axis_stream.store.basis import Basis
from axis_stream.store.models import load_base
from axis_stream.store.statelock import lock_state


def write_config(tmp_path: Path, base_cfg, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[paths]\nstate_dir = "{tmp_path / name}"\nwatch_dir = "{tmp_path / name / "incoming"}"\n'
                    f'[base]\nmodel = "axis-tiny"\npretrained = "{base_cfg.pretrained}"\n'
                    f'model_config = "{base_cfg.model_config}"\n[basis]\nsvd = "exact"\n')
    return path


@pytest.fixture
def zoo(make_checkpoint, tmp_path) -> tuple[Path, list[Path]]:
    """Three good checkpoints, a junk file and a renamed copy of the first, in a folder, with a note."""
    folder = tmp_path / "zoo"
    folder.mkdir()
    good = [make_checkpoint(s, name=f"{i}0-ckpt.safetensors", directory=folder, prefix="" if i == 1 else "visual.")
            for i, s in enumerate((131, 132, 133))]
    (folder / "05-junk.safetensors").write_bytes(os.urandom(200))
    shutil.copyfile(good[0], folder / "15-copy.safetensors")
    (folder / "notes.txt").write_text("not a checkpoint name")
    return folder, good


def test_backfill_builds_the_daemons_basis_and_reports_bad_files(tiny_base, zoo, tmp_path):
    base_cfg, _ = tiny_base
    folder, good = zoo
    files = checkpoint_files([folder])
    assert [p.name for p in files] == ["00-ckpt.safetensors", "05-junk.safetensors", "10-ckpt.safetensors",
                                       "15-copy.safetensors", "20-ckpt.safetensors"]
    # the daemon's worker over copies of the same files, in the same order (it deletes what it folds)
    daemon_cfg = config.load(write_config(tmp_path, base_cfg, "daemon"))
    worker = FoldWorker(daemon_cfg, *load_base(daemon_cfg))
    inbox = daemon_cfg.paths.watch_dir
    inbox.mkdir(parents=True)
    results = [worker.process(Path(shutil.copy(p, inbox / p.name))).result for p in files]
    assert results == ["folded", "rejected", "folded", "rejected", "folded"]

    cfg_path = write_config(tmp_path, base_cfg, "backfill")
    res = CliRunner().invoke(main, ["backfill", str(folder), "--workers", "2", "--config", str(cfg_path)])
    assert logging.getLogger("axis_stream").propagate     # the command leaves the process's logging as it was
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("folded 00-ckpt.safetensors: into v1")
    assert lines[1].startswith("rejected 05-junk.safetensors: ") and lines[1].endswith("[not_a_checkpoint]")
    assert lines[3].startswith("rejected 15-copy.safetensors: already folded at version 1")
    assert "backfill: 5 files in" in lines[-1] and "3 folded, 2 rejected, 0 already folded" in lines[-1]
    assert sorted(p.name for p in folder.iterdir()) == sorted([p.name for p in files] + ["notes.txt"])  # all kept

    daemon_basis = Basis.open(daemon_cfg.paths.basis_dir)
    ours = Basis.open(config.load(cfg_path).paths.basis_dir)
    assert ours.version == daemon_basis.version == 3 and snapshot_equal(ours.load(), daemon_basis.load())
    assert ours.manifest["matrices"] == daemon_basis.manifest["matrices"]
    assert ([(r.file, r.sha256, r.matrices) for r in ours.ledger()]
            == [(r.file, r.sha256, r.matrices) for r in daemon_basis.ledger()])

    again = CliRunner().invoke(main, ["backfill", str(folder), "--config", str(cfg_path)])
    assert "0 folded, 2 rejected, 3 already folded" in again.output and Basis.open(ours.directory).version == 3


def test_backfill_resumes_after_kill_9_with_the_same_basis(tiny_base, zoo, tmp_path):
    base_cfg, base = tiny_base
    folder, good = zoo
    for p in folder.glob("?5-*"):
        p.unlink()
    reference = Basis.create(tmp_path / "reference", base, config.BasisConfig(svd="exact"))
    for p in good:
        reference.fold_checkpoint(p)

    cfg_path = write_config(tmp_path, base_cfg, "state")
    proc = subprocess.Popen([sys.executable, "-c", "from axis_stream.cli import main; main()", "backfill",
                             str(folder), "--workers", "2", "--config", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.readline()
        assert first.startswith("folded 00-ckpt.safetensors"), first
        proc.send_signal(signal.SIGKILL)  # somewhere in the next fold, or after it
    finally:
        proc.wait(timeout=60)
    res = CliRunner().invoke(main, ["backfill", str(folder), "--config", str(cfg_path)])
    assert res.exit_code == 0, res.output
    counts = res.stdout.splitlines()[-1]
    already = int(counts.split(" already folded")[0].rsplit(" ", 1)[1])
    assert 1 <= already <= 3 and f"{3 - already} folded, 0 rejected" in counts
    resumed = Basis.open(config.load(cfg_path).paths.basis_dir)
    resumed.verify()
    assert resumed.version == 3 and snapshot_equal(resumed.load(), reference.load())
    assert [r.file for r in resumed.ledger()] == [p.name for p in good]


def test_one_backfill_per_state_folder_and_a_missing_path_is_named(tmp_path):
    cfg_path = tmp_path / "axis-stream.toml"
    cfg_path.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n')
    with (lock_state(tmp_path / "state", "serve"),
          pytest.raises(errors.StateLocked, match=r"in use by `axis-stream serve` \(pid \d+\).*stop the daemon")):
        backfill(config.load(cfg_path), [], lambda outcome: None)
    with pytest.raises(errors.AxisError, match="nothing-here: no such file or folder"):
        checkpoint_files([tmp_path / "nothing-here"])


# --- --executor ray: a tree reduction over shards ---

class Crash(BaseException):
    """Stands for the process dying between two steps of the run."""


def tree_reference(base, shards, names):
    """What the tree gives, in memory: each shard streamed, shards folded pairwise, the root into an empty basis."""
    def k(n):
        return stage1.k_for(layout.as_matrix(base[n]).shape)

    def stream(sds):
        out = dict.fromkeys(names)
        for sd in sds:
            for n in names:
                delta = layout.as_matrix(sd[n].float() - base[n].float())
                if delta.any():
                    out[n] = stage1.fold(out[n], delta, k(n), svd="exact")
        return out

    def pair(a, b):
        return {n: a[n] if b[n] is None else stage1.fold_factors(a[n], b[n], k(n)) for n in names}

    root = stage1.tree_reduce([stream(s) for s in shards], pair)
    return {n: None if root[n] is None else stage1.fold_factors(None, root[n], k(n)) for n in names}


@pytest.mark.usefixtures("ray_local")
def test_backfill_on_ray_is_the_tree_of_its_shards_and_resumes_from_the_partial_bases(tiny_base, zoo, tmp_path,
                                                                                      monkeypatch):
    base_cfg, base = tiny_base
    folder, good = zoo
    cfg_path = write_config(tmp_path, base_cfg, "state")
    cfg = config.load(cfg_path)
    lines: list[str] = []
    with monkeypatch.context() as m:      # killed once the shards are folded, before the tree
        m.setattr(backfill_ray, "_reduce", lambda *a: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            backfill(cfg, checkpoint_files([folder]), lambda o: lines.append(render.outcome_line(o)), workers=2,
                     executor="ray", paths=[folder])
    run = backfill_ray.run_folder(cfg, [folder], 2)
    assert sorted(p.name for p in run.iterdir()) == ["shard-00", "shard-01"]   # [00, 05-junk] and [10, 15-copy, 20]
    assert sorted(line.split(":")[0] for line in lines) == [
        "folded 00-ckpt.safetensors", "folded 10-ckpt.safetensors", "folded 20-ckpt.safetensors",
        "rejected 05-junk.safetensors"]                                      # the copy waits for the end
    assert not (cfg.paths.basis_dir / "CURRENT").exists()

    res = CliRunner().invoke(main, ["backfill", str(folder), "--executor", "ray", "--workers", "2",
                                    "--config", str(cfg_path)])
    assert res.exit_code == 1, res.output
    out = res.stdout.splitlines()
    assert sum("05-junk" in line for line in out) == 1 and sum("15-copy" in line for line in out) == 1
    assert "rejected 15-copy.safetensors: already folded at version " in res.stdout
    assert all(f"already folded {p.name}: in the partial basis shard-0" in res.stdout for p in good)
    assert "0 folded, 2 rejected, 3 already folded" in out[-1]
    assert not run.exists()

    ours = Basis.open(cfg.paths.basis_dir)
    ours.verify()
    assert [r.file for r in ours.ledger()] == [p.name for p in good] and ours.count == 3
    sds = [load_file(p) for p in good]
    want = tree_reference(base, [sds[:1], sds[1:]], list(ours.manifest["matrices"]))
    snap = ours.load()
    for n, f in want.items():
        got = snap.factors[n].to_dense().double()
        assert (f is None and not got.any()) or torch.linalg.matrix_norm(got - f.to_dense().double()) <= \
            1e-5 * torch.linalg.matrix_norm(f.to_dense().double()), n
    for n, b in base.items():
        if n not in want and b.is_floating_point():
            mean = sum(sd[n].double() - b.double() for sd in sds) / 3
            assert torch.allclose(snap.means[n].double(), mean, atol=1e-6) if mean.any() else n not in snap.means


def test_a_tree_fold_committed_before_a_kill_is_only_removed_on_resume(tiny_base, make_checkpoint, tmp_path):
    _, base = tiny_base
    left, right = (Basis.create(tmp_path / name / "basis", base, config.BasisConfig(svd="exact"))
                   for name in ("shard-00", "shard-01"))
    left.fold_checkpoint(make_checkpoint(161))
    right.fold_checkpoint(make_checkpoint(162))
    left.fold_basis(right)                                # committed; the kill came before the removal
    version = left.version
    backfill_ray.fold_into(left, tmp_path / "shard-01")
    assert left.version == version and not (tmp_path / "shard-01").exists() and left.count == 2


def test_backfill_on_ray_refuses_a_dense_strategy_before_any_work(tiny_base, tmp_path):
    base_cfg, _ = tiny_base
    cfg = config.load(write_config(tmp_path, base_cfg, "state"))
    cfg.basis.strategy = "opcm"
    with pytest.raises(errors.AxisError, match="folds a tree of AXIS bases; basis.strategy is 'opcm'"):
        backfill_ray.backfill_on_ray(cfg, [tmp_path], [], lambda o: None, workers=2, memory_budget=float("inf"),
                                     quarantine=False)
    assert not (cfg.paths.state_dir / backfill_ray.RUNS).exists()
