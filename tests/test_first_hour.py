"""A newcomer's first hour (issue 26): bad adapt requests fail at once, ``status`` reads like a tool and
starts fast, open_clip's noise stays out, ``basis show`` says what it means, a rollback through the
daemon says what it removed, and job processes come from the forkserver with the daemon's environment."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_daemon import write_config
from test_jobs import final, make_config

from axis_stream import cli, config, render
from axis_stream.service import api
from axis_stream.service.daemon import Daemon
from axis_stream.service.jobs import kinds
from axis_stream.service.jobs.control import handlers
from axis_stream.service.jobs.process import call_job
from axis_stream.service.jobs.runner import JobRunner, job_processes
from axis_stream.store import models
from axis_stream.store.basis import Basis
from axis_stream.testing import wait_until

# -- item 2: a bad adapt request fails the command, not the job ------------------------------------------


@pytest.fixture
def job_daemon(tmp_path, monkeypatch):
    """The job runner's real ops behind a control socket; the CLI finds it through AXIS_STREAM_STATE_DIR."""
    cfg = make_config(tmp_path / "state")
    runner = JobRunner(cfg, cfg.paths.basis_dir)
    runner.start()
    srv = api.ControlServer(cfg.paths.socket, handlers(runner))
    srv.start()
    monkeypatch.setenv("AXIS_STREAM_STATE_DIR", str(cfg.paths.state_dir))
    yield runner
    srv.stop()
    runner.shutdown()


@pytest.mark.parametrize("argv, message", [
    (["--target", "nosuchset"], "Error: unknown target 'nosuchset': use imagefolder:PATH or one of cars, "),
    (["--target", "imagefolder:/nonexistent"], "Error: imagefolder:/nonexistent: expected /nonexistent/train/<class>/"),
    (["--target", "flowers102"], "Error: flowers102: no data root: pass --data-root or set paths.data_root"),
    (["--target", "flowers102", "--data-root", "/nonexistent"], "Error: flowers102: the data root /nonexistent is "
                                                                "not a folder; expected flowers-102/"),
    (["--target", "eurosat", "--data-root", "/"], "Error: eurosat: no folder /eurosat/train; expected eurosat/train/"),
])
def test_a_bad_adapt_request_fails_at_once_in_one_line_and_queues_nothing(job_daemon, argv, message):
    result = CliRunner().invoke(cli.main, ["adapt", *argv])
    assert result.exit_code == 1
    assert result.output.startswith(message) and result.output.count("\n") == 1, result.output
    assert job_daemon.list() == []


def test_a_relative_image_folder_is_sent_as_an_absolute_path(job_daemon, tmp_path, monkeypatch):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "pets" / split / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, ["adapt", "--target", "imagefolder:pets"])
    assert result.exit_code == 0, result.output
    (record,) = job_daemon.list()
    assert record.params["target"] == f"imagefolder:{tmp_path / 'pets'}"


def test_a_user_error_in_a_job_is_one_log_line_and_a_bug_keeps_its_traceback(tiny_base, tmp_path, caplog):
    cfg = config.Config()
    cfg.base = tiny_base[0]
    ctx = kinds.JobContext("j1", cfg, tmp_path / "no-basis", 1, tmp_path / "out", lambda report: None)
    with caplog.at_level(logging.INFO, logger="axis_stream.job"):
        kind, error = call_job(kinds.JOB_KINDS["adapt"], {"target": "imagefolder:/nowhere"}, ctx)
    assert kind == "error" and "not a basis" in error
    (failed,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failed.exc_info is None and "\n" not in failed.getMessage() and "not a basis" in failed.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="axis_stream.job"):
        kind, error = call_job(kinds.JOB_KINDS["selftest"], {"mode": "fail", "steps": 1}, ctx)
    assert (kind, error) == ("error", "RuntimeError: selftest asked to fail")
    assert [r.exc_info is not None for r in caplog.records if r.levelno >= logging.ERROR] == [True]


# -- item 3: status in human units, --json for machines, and fast ------------------------------------------


def test_status_lines_are_aligned_in_human_units_and_json_stays_raw(tmp_path, monkeypatch):
    cfg = make_config(tmp_path / "state")
    status = Daemon(cfg).status()                 # the real reply's shape, before the start
    lines = render.status_lines(status, now=status["started_at"] + 200)
    column = lines[0].index("axis-stream")        # every value starts in the same column
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines), lines
    text = "\n".join(lines)
    assert "(up 3 min 20 s)" in text and "starting" in lines[0] and "None" not in text
    assert str(status["started_at"]) not in text and "basis       none yet" in text
    status.update(ready=True, basis={"version": 3, "sources": 1, "bytes": 124088, "versions": [2, 3]},
                  queue={"depth": 2, "current": "cars.safetensors", "progress": [3, 24]}, folds=dict(status["folds"], folded=1),
                  last={"file": "a.pt", "result": "rejected", "message": "visual.proj contains NaN", "reason": "nan",
                        "version": None, "seconds": 0.1},
                  waiting={"hf-model": {"seconds": 75.0, "cause": "no config.json"}}, future_key=None)
    text = "\n".join(render.status_lines(status, now=status["started_at"] + 90000))
    for part in ("pid", "ready", "(up 1 d 1 h)", "v3: 1 source, 121.2 KiB; on disk v2, v3",
                 "2 files waiting their turn; folding cars.safetensors (matrix 3 of 24)", "folds       1 folded",
                 "rejected a.pt: visual.proj contains NaN [nan]", "hf-model: no config.json (unchanged 1 min 15 s)",
                 "future key  -"):
        assert part in text, (part, text)

    cfg.paths.state_dir.mkdir(parents=True)
    srv = api.ControlServer(cfg.paths.socket, {"status": lambda args: status})
    srv.start()
    try:
        monkeypatch.setenv("AXIS_STREAM_STATE_DIR", str(cfg.paths.state_dir))
        shown = CliRunner().invoke(cli.main, ["status"])
        raw = CliRunner().invoke(cli.main, ["status", "--json"])
    finally:
        srv.stop()
    assert shown.exit_code == 0 and shown.output.startswith("daemon ") and "{" not in shown.output
    assert json.loads(raw.output) == status


def test_the_cli_and_its_status_command_import_no_torch(tmp_path):
    """``status`` took 2.6 s: importing the CLI imported torch (render -> core.strategies)."""
    code = ("import sys\nfrom axis_stream import cli\nloaded = 'torch' in sys.modules\n"
            "try:\n    cli.main(['status'], standalone_mode=False)\nexcept SystemExit as exc:\n    code = exc.code\n"
            "print(loaded, 'torch' in sys.modules, code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AXIS_STREAM_STATE_DIR": str(tmp_path)})
    assert done.stdout.split() == ["False", "False", "2"], done.stdout + done.stderr


# -- item 4: open_clip's noise --------------------------------------------------------------------------------


def test_building_the_base_logs_nothing_and_configures_no_root_logger(tiny_base):
    code = (f"import logging\nfrom axis_stream import config\nfrom axis_stream.store import models\n"
            f"models.create_base(config.BaseConfig(model='axis-tiny', pretrained='', "
            f"model_config={str(tiny_base[0].model_config)!r}))\n"
            f"models.tokenizer_for(config.BaseConfig(model='axis-tiny'))\n"
            f"print(logging.getLogger().handlers)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.stdout, done.stderr) == ("[]\n", "")


def test_a_daemon_like_log_gets_no_open_clip_info_but_its_other_warnings(tiny_base, caplog):
    with caplog.at_level(logging.INFO):
        models.create_base(tiny_base[0])
        models.create_base(config.BaseConfig(model="axis-tiny", pretrained="", model_config=tiny_base[0].model_config))
    assert not [r for r in caplog.records if r.name == "root"], [r.getMessage() for r in caplog.records]
    import open_clip

    with caplog.at_level(logging.INFO), models.quiet_open_clip(random_init=True):
        logging.warning("a real warning")         # not from open_clip's files: kept
        record = logging.LogRecord("root", logging.WARNING, str(Path(open_clip.__file__).parent / "factory.py"),
                                   1, "Model %s initialized partially.", ("x",), None)
        logging.getLogger().handle(record)
    assert [r.getMessage() for r in caplog.records] == ["a real warning", "Model x initialized partially."]


# -- item 5: basis show ---------------------------------------------------------------------------------------


def test_basis_show_says_what_k_and_energy_mean(tiny_base, make_checkpoint, tmp_path):
    cfg_path = write_config(tmp_path, tiny_base[0])
    runner = CliRunner()
    assert runner.invoke(cli.main, ["fold", str(make_checkpoint(1)), "--config", str(cfg_path)]).exit_code == 0
    out = runner.invoke(cli.main, ["basis", "show", "--config", str(cfg_path)]).output
    first, base = out.splitlines()[:2]
    assert first.endswith("version 1 (on disk: 0, 1; keep_versions 3), 1 source")
    assert base.startswith(f"base axis-tiny (weights {tiny_base[0].pretrained}, sha256 ") and "//" not in base
    assert base.endswith("K per matrix (k_mode fraction): floor(0.1 * min(m, n)), at least 1; now 6")
    assert "energy: the matrix's kept energy (sum of s^2) over the sum of its sources' own energies" in out


# -- item 6: rollback through the daemon -------------------------------------------------------------------------


def test_rollback_through_the_running_daemon_says_what_left_the_ledger(tiny_base, make_checkpoint, tmp_path):
    base_cfg, base = tiny_base
    cfg_path = write_config(tmp_path, base_cfg)
    cfg = config.load(cfg_path, env={})
    basis = Basis.create(cfg.paths.basis_dir, base, cfg.basis, {"name": base_cfg.model, "pretrained": ""})
    first, second = make_checkpoint(1), make_checkpoint(2)
    basis.fold_checkpoint(first)
    basis.fold_checkpoint(second)
    daemon = Daemon(cfg, env={})
    daemon.start()
    writer = threading.Thread(target=daemon.run, daemon=True)
    writer.start()
    runner = CliRunner()
    try:
        res = runner.invoke(cli.main, ["basis", "rollback", "1", "--config", str(cfg_path)])
        assert res.exit_code == 0, res.output
        assert res.output.splitlines() == [
            "version 3 now holds version 1's basis (1 source; version 2 was current)",
            "1 source left the ledger and may be folded again:",
            f"  v2     ckpt-2.safetensors  sha256 {basis.ledger(2)[-1].sha256[:12]}"]
        assert api.request(cfg.paths.socket, "status")["basis"]["version"] == 3
        again = runner.invoke(cli.main, ["basis", "rollback", "3", "--config", str(cfg_path)])
        assert again.output == "version 3 is current already; nothing changed\n"
        missing = runner.invoke(cli.main, ["basis", "rollback", "9", "--config", str(cfg_path)])
        assert missing.exit_code == 1 and "no version 9 to roll back to" in missing.output
        (cfg.paths.watch_dir / second.name).write_bytes(second.read_bytes())     # it may be folded again
        wait_until(lambda: daemon.counts["folded"] == 1, 60, "the refold")
        assert [r.file for r in Basis.open(cfg.paths.basis_dir).ledger()] == ["ckpt-1.safetensors", "ckpt-2.safetensors"]
    finally:
        daemon.request_stop()
        writer.join(60)
        daemon.close()
    res = runner.invoke(cli.main, ["basis", "rollback", "3", "--config", str(cfg_path)])   # no daemon: here
    assert res.exit_code == 0 and res.output.splitlines()[1:] == [
        "1 source left the ledger and may be folded again:",
        f"  v4     ckpt-2.safetensors  sha256 {basis.ledger(2)[-1].sha256[:12]}"], res.output
    res = runner.invoke(cli.main, ["basis", "rollback", "4", "--config", str(cfg_path)])   # forward again
    assert res.output.splitlines() == [
        "version 6 now holds version 4's basis (2 sources; version 5 was current)",
        "1 source came back into the ledger:", f"  v4     ckpt-2.safetensors  sha256 {basis.ledger(2)[-1].sha256[:12]}"]


# -- item 9: job processes from the forkserver, with the daemon's environment -------------------------------------


def report_environment(params: dict, ctx: kinds.JobContext) -> dict:
    """A job function for the test below: what the job process sees."""
    return {"omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads(),
            "parent_is_daemon": os.getppid() == params["daemon"]}


def test_a_job_forks_from_the_server_and_gets_the_daemon_environment_of_now(tmp_path, monkeypatch):
    warm = job_processes().Process(target=time.sleep, args=(0,))   # the server runs, with the env of then
    warm.start()
    warm.join()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setitem(kinds.JOB_KINDS, "environment", f"{Path(__file__).stem}:report_environment")
    runner = JobRunner(make_config(tmp_path / "state"), tmp_path / "state" / "basis")
    runner.start()
    try:
        record = final(runner, runner.submit("environment", {"daemon": os.getpid()}))
    finally:
        runner.shutdown()
    assert record.state == "succeeded", record.error
    assert record.result == {"omp": "1", "threads": 1, "parent_is_daemon": False}
