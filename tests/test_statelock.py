"""One writer per state folder: the lock itself, the commands it guards, and a second `serve` that changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from test_daemon import SERVE, start, stop, wait_for, wait_ready, write_config

from axis_stream import cli, config
from axis_stream.errors import StateLocked
from axis_stream.service import api
from axis_stream.service.jobs.records import JobStore
from axis_stream.service.jobs.runner import JobRunner
from axis_stream.store.basis import Basis
from axis_stream.store.statelock import LOCK_FILE, lock_state

# -- the lock --------------------------------------------------------------------------------------


def test_a_second_taker_is_refused_with_the_holders_pid_until_the_first_releases(tmp_path):
    state = tmp_path / "state"
    with lock_state(state, "serve") as held:
        assert held.path == state / LOCK_FILE and held.path.read_text() == f"{os.getpid()} serve\n"
        with pytest.raises(StateLocked, match=rf"^{state} is in use by `axis-stream serve` \(pid {os.getpid()}\); "
                                              r"one process at a time writes a state folder: try later$"):
            lock_state(state, "fold", hint="try later")
        assert held.path.read_text() == f"{os.getpid()} serve\n"        # the refused one wrote nothing
    with lock_state(state, "fold"):                                    # released: free again
        assert (state / LOCK_FILE).read_text() == f"{os.getpid()} fold\n"
    assert (state / LOCK_FILE).exists()                                # never unlinked (see the module)


def test_the_kernel_releases_the_lock_of_a_killed_holder(tmp_path):
    state = tmp_path / "state"
    code = f"from axis_stream.store.statelock import lock_state; l = lock_state({str(state)!r}, 'serve'); " \
           "print('held', flush=True); import time; time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StateLocked, match=f"pid {holder.pid}"):
            lock_state(state, "fold")
        holder.kill()
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
    with lock_state(state, "serve"):        # the stale pid in the file does not block
        pass


def test_a_state_folder_that_cannot_hold_the_lock_is_a_clear_error(tmp_path):
    state = tmp_path / "state"
    state.write_text("a file, not a folder")
    with pytest.raises(StateLocked, match=f"^{state / LOCK_FILE}: cannot open the state-folder lock: File exists$"):
        lock_state(state, "serve")


# -- the commands that write state without the daemon ---------------------------------------------------

def test_fold_rollback_and_adapt_local_refuse_while_another_process_holds_the_state(tiny_base, make_checkpoint,
                                                                                     tmp_path):
    base_cfg, base = tiny_base
    cfg_path = write_config(tmp_path, base_cfg)
    cfg = config.load(cfg_path, env={})
    basis = Basis.create(cfg.paths.basis_dir, base, cfg.basis, {"name": base_cfg.model, "pretrained": ""})
    basis.fold_checkpoint(make_checkpoint(1))
    before = sorted(p.name for p in (cfg.paths.basis_dir / "versions").iterdir())
    runner = CliRunner()
    pid = os.getpid()
    with lock_state(cfg.paths.state_dir, "serve"):
        res = runner.invoke(cli.main, ["fold", str(make_checkpoint(2)), "--config", str(cfg_path)])
        assert res.exit_code == 1
        assert res.output == (f"Error: {cfg.paths.state_dir} is in use by `axis-stream serve` (pid {pid}); one process "
                              "at a time writes a state folder: drop the files into the daemon's watched folder "
                              "instead\n")
        res = runner.invoke(cli.main, ["basis", "rollback", "1", "--basis", str(cfg.paths.basis_dir)])
        assert res.exit_code == 1 and f"(pid {pid})" in res.output and "stop it first" in res.output
        res = runner.invoke(cli.main, ["adapt", "--local", "--config", str(cfg_path), "--target", "flowers102"])
        assert res.exit_code == 1 and f"(pid {pid})" in res.output and "rerun without --local" in res.output
        assert not cfg.paths.jobs_dir.exists()
    assert sorted(p.name for p in (cfg.paths.basis_dir / "versions").iterdir()) == before
    assert Basis.open(cfg.paths.basis_dir).version == 1
    res = runner.invoke(cli.main, ["basis", "rollback", "1", "--config", str(cfg_path)])     # free again
    assert res.exit_code == 0, res.output


# -- the reproduction: a second `serve` while a job runs -----------------------------------------

def test_a_second_serve_exits_at_once_naming_the_pid_and_the_running_job_stays_running(tiny_base, tmp_path):
    base_cfg, _ = tiny_base
    cfg_path = write_config(tmp_path, base_cfg)
    cfg = config.load(cfg_path, env={})
    # A long job (the selftest kind, blocking until killed: a stand-in for `adapt --epochs 200`) queued
    # for the daemon, which dispatches it at start-up.
    seed = JobRunner(cfg, cfg.paths.basis_dir)
    job_id = seed.submit("selftest", {"mode": "hang"})
    seed.shutdown()
    first = start(cfg_path)
    try:
        wait_ready(first, cfg)
        running = wait_for(lambda: (r := api.request(cfg.paths.socket, "jobs.show", id=job_id))["state"] == "running"
                           and r["progress"] and r, 60, "the job to run", first)
        jobs_db = JobStore(cfg.paths.state_dir / "jobs.sqlite")
        second = subprocess.run(SERVE + [str(cfg_path)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr == (f"Error: {cfg.paths.state_dir} is in use by `axis-stream serve` (pid {first.pid}); "
                                 "one process at a time writes a state folder: stop it first, or give this one "
                                 "another state_dir\n")
        assert jobs_db.get(job_id).to_dict() == running         # not marked failed, not touched at all
        jobs_db.close()
        listed = CliRunner().invoke(cli.main, ["jobs", "list", "--config", str(cfg_path), "--json"])
        assert listed.exit_code == 0 and '"state": "running"' in listed.output
        assert api.request(cfg.paths.socket, "status")["pid"] == first.pid      # the first still serves
        assert (cfg.paths.state_dir / LOCK_FILE).read_text() == f"{first.pid} serve\n"
        assert stop(first) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert (cfg.paths.state_dir / LOCK_FILE).read_text() == ""               # released on a clean stop
