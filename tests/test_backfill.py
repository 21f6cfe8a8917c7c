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
from click.testing import CliRunner
from test_basis import snapshot_equal

from axis_stream import config, errors
from axis_stream.cli import main
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
    with lock_state(tmp_path / "state", "serve"):
        with pytest.raises(errors.StateLocked, match=r"in use by `axis-stream serve` \(pid \d+\).*stop the daemon"):
            backfill(config.load(cfg_path), [], lambda outcome: None)
    with pytest.raises(errors.AxisError, match="nothing-here: no such file or folder"):
        checkpoint_files([tmp_path / "nothing-here"])
