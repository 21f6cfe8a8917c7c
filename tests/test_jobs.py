"""Job runner: durable SQLite records, one-at-a-time dispatch, child-process isolation, cancel, restart, triggers."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from apscheduler.triggers.cron import CronTrigger

from axis_stream import config, render
from axis_stream.errors import AxisError, ConfigError
from axis_stream.service.jobs.kinds import adapt_params
from axis_stream.service.jobs.records import (
    FINAL_STATES,
    NO_BASIS_ERROR,
    RESTART_ERROR,
    SHUTDOWN_ERROR,
    JobRecord,
    JobStore,
)
from axis_stream.service.jobs.runner import JobRunner
from axis_stream.store.basis import Basis
from axis_stream.testing import wait_until


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    return wait_until(predicate, timeout, what, interval=0.02, error=AssertionError)


def final(runner: JobRunner, job_id: str) -> JobRecord:
    return wait_for(lambda: (r := runner.get(job_id)).state in FINAL_STATES and r, what=f"job {job_id} to end")


def running_with_progress(runner: JobRunner, job_id: str) -> JobRecord:
    return wait_for(lambda: (r := runner.get(job_id)).state == "running" and r.pid and r.progress and r,
                    what=f"job {job_id} to run")


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists or is a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def make_config(state_dir: Path, gpu_slots: int = 1,
                triggers: list[config.TriggerConfig] | None = None) -> config.Config:
    cfg = config.Config()
    cfg.paths.state_dir = state_dir
    cfg.scheduler.gpu_slots = gpu_slots
    cfg.scheduler.triggers = triggers or []
    return cfg.validate()


@pytest.fixture
def start_runner(tmp_path):
    """``start_runner(**config_kw) -> JobRunner`` started on ``tmp_path/state``; shut down after the test."""
    runners = []

    def start(on_change=None, **kw) -> JobRunner:
        cfg = make_config(tmp_path / "state", **kw)
        runner = JobRunner(cfg, cfg.paths.basis_dir, on_change=on_change, kill_grace_s=2.0)
        runner.start()
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.shutdown()


def least_squares(seed: int) -> tuple[float, float]:
    """Float64 closed-form fit of the selftest's data (the same generator calls as ``run_selftest``)."""
    rng = random.Random(seed)
    xs = [rng.uniform(-1.0, 1.0) for _ in range(64)]
    ys = [3.0 * x - 1.0 + 0.01 * rng.gauss(0.0, 1.0) for x in xs]
    n, sx, sy = len(xs), sum(xs), sum(ys)
    sxx, sxy = sum(x * x for x in xs), sum(x * y for x, y in zip(xs, ys))
    w = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    return w, (sy - w * sx) / n


def test_selftest_job_runs_in_a_child_and_records_result_progress_log_and_files(start_runner):
    seen = []
    runner = start_runner(on_change=lambda r: seen.append(r.state))
    job_id = runner.submit("selftest", {"steps": 300, "seed": 4})
    record = final(runner, job_id)

    assert record.state == "succeeded", record.error
    w, b = least_squares(4)
    assert abs(record.result["w"] - w) < 1e-6 and abs(record.result["b"] - b) < 1e-6
    assert record.progress == {"step": 300, "of": 300, "loss": record.result["loss"]}
    assert record.pid is None and record.basis_version is None and record.origin == "request"
    assert record.created_at <= record.started_at <= record.finished_at
    assert (Path(record.log_path).parent / "selftest.json").is_file()
    log = runner.logs(job_id)
    assert "selftest: fitting y = 3x - 1" in log and f"job {job_id}: done" in log   # stdout and logging both land there
    assert runner.logs(job_id, tail=1).count("\n") == 1
    wait_for(lambda: seen[-1] == "succeeded", what="on_change to report the end")   # called just after the write
    assert seen[0] == "queued" and "running" in seen
    assert runner.list()[0].to_dict() == record.to_dict()


def test_one_gpu_slot_runs_jobs_one_at_a_time_in_submission_order(start_runner):
    runner = start_runner(gpu_slots=1)
    ids = [runner.submit("selftest", {"steps": 3, "sleep_s": 0.05}) for _ in range(3)]
    records = [final(runner, i) for i in ids]

    assert [r.state for r in records] == ["succeeded"] * 3
    assert ids == sorted(ids) and len(set(ids)) == 3
    for earlier, later in zip(records, records[1:]):
        assert earlier.finished_at <= later.started_at


def test_two_gpu_slots_run_two_jobs_at_once(start_runner):
    runner = start_runner(gpu_slots=2)
    ids = [runner.submit("selftest", {"mode": "hang"}) for _ in range(2)]
    both = [running_with_progress(runner, i) for i in ids]
    assert both[0].pid != both[1].pid
    for job_id in ids:
        assert runner.cancel(job_id).state == "cancelled"


def test_crashed_failed_and_killed_jobs_fail_with_a_reason_and_the_runner_keeps_working(start_runner):
    runner = start_runner()
    crash = runner.submit("selftest", {"mode": "crash", "exit_code": 3})
    fail = runner.submit("selftest", {"mode": "fail"})
    killed = runner.submit("selftest", {"mode": "hang"})
    pid = running_with_progress(runner, killed).pid
    os.kill(pid, signal.SIGKILL)                 # what the kernel's OOM killer does
    after = runner.submit("selftest", {"steps": 2})

    assert final(runner, crash).error == "job process exited with code 3 without a result"
    assert final(runner, fail).error == "RuntimeError: selftest asked to fail"
    assert "Traceback" in runner.logs(fail)
    assert final(runner, killed).error == "job process was killed by SIGKILL (out of memory?)"
    assert runner.logs(killed, tail=1).endswith(f"axis-stream: job {killed} failed: job process was killed by SIGKILL "
                                                "(out of memory?)\n")
    assert final(runner, after).state == "succeeded"


def test_cancel_stops_a_running_child_and_drops_a_queued_job(start_runner):
    runner = start_runner(gpu_slots=1)
    running = runner.submit("selftest", {"mode": "hang"})
    queued = runner.submit("selftest", {"steps": 2})
    pid = running_with_progress(runner, running).pid

    record = runner.cancel(queued)
    assert (record.state, record.error, record.started_at) == ("cancelled", "cancelled before it started", None)
    record = runner.cancel(running)
    assert (record.state, record.error) == ("cancelled", "cancelled while running")
    assert process_gone(pid)
    with pytest.raises(AxisError, match="already cancelled"):
        runner.cancel(running)
    with pytest.raises(AxisError, match="no job 'nope'"):
        runner.cancel("nope")
    assert final(runner, runner.submit("selftest", {"steps": 1})).state == "succeeded"
    assert runner.get(queued).state == "cancelled"          # the worker skipped it


def test_shutdown_fails_running_jobs_and_keeps_queued_ones_for_the_next_start(start_runner, tmp_path):
    runner = start_runner(gpu_slots=1)
    running = runner.submit("selftest", {"mode": "hang"})
    queued = runner.submit("selftest", {"steps": 2})
    pid = running_with_progress(runner, running).pid
    runner.shutdown()

    assert process_gone(pid)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    assert (store.get(running).state, store.get(running).error) == ("failed", SHUTDOWN_ERROR)
    assert store.get(queued).state == "queued"
    store.close()
    runner = start_runner(gpu_slots=1)
    assert final(runner, queued).state == "succeeded"


RESTART_SCRIPT = """
import sys, time
from pathlib import Path
from axis_stream import config
from axis_stream.service.jobs.kinds import adapt_params
from axis_stream.service.jobs.records import FINAL_STATES, JobRecord, JobStore, NO_BASIS_ERROR, RESTART_ERROR, SHUTDOWN_ERROR
from axis_stream.service.jobs.runner import JobRunner
from axis_stream.store.basis import Basis
if __name__ == "__main__":
    cfg = config.Config()
    cfg.paths.state_dir = Path(sys.argv[1])
    runner = JobRunner(cfg, cfg.paths.basis_dir)
    runner.start()
    first = runner.submit("selftest", {"mode": "hang"})
    second = runner.submit("selftest", {"steps": 2})
    while runner.get(first).progress is None:
        time.sleep(0.02)
    print(first, second, runner.get(first).pid, flush=True)
    time.sleep(600)
"""


def test_restart_fails_the_job_a_dead_daemon_left_running_and_dispatches_queued_ones(start_runner, tmp_path):
    daemon = subprocess.Popen([sys.executable, "-c", RESTART_SCRIPT, str(tmp_path / "state")],
                              stdout=subprocess.PIPE, text=True)
    try:
        first, second, pid = daemon.stdout.readline().split()
    finally:
        daemon.kill()                             # the daemon dies without any cleanup
        daemon.wait()
    wait_for(lambda: process_gone(int(pid)), what="the orphaned job process to exit with its daemon")

    runner = start_runner()
    record = runner.get(first)
    assert (record.state, record.error) == ("failed", RESTART_ERROR)
    assert record.finished_at is not None and record.pid is None
    assert final(runner, second).state == "succeeded"


def test_adapt_without_a_basis_fails_clearly_without_starting_a_process(start_runner):
    runner = start_runner()
    record = final(runner, runner.submit("adapt", {"target": "flowers102"}))
    assert (record.state, record.error, record.pid) == ("failed", NO_BASIS_ERROR, None)
    assert not Path(record.log_path).exists()


def test_the_basis_version_current_at_start_is_pinned_and_handed_to_the_job(start_runner, tiny_base, make_checkpoint,
                                                                             tmp_path):
    base_cfg, base = tiny_base
    runner = start_runner()
    basis = Basis.create(runner.basis_dir, base, config.BasisConfig(svd="exact"),
                         {"name": base_cfg.model, "pretrained": base_cfg.pretrained})
    record = final(runner, runner.submit("adapt", {"target": "flowers102"}))
    assert record.error == NO_BASIS_ERROR                   # version 0 holds no sources yet
    basis.fold_checkpoint(make_checkpoint(1))
    record = final(runner, runner.submit("selftest", {"steps": 1}))
    assert record.basis_version == 1 and record.result["basis_version"] == 1


def test_unknown_kind_is_refused(start_runner):
    with pytest.raises(AxisError, match="unknown job kind 'train'"):
        start_runner().submit("train", {})


def test_every_m_folds_trigger_queues_an_adaptation_and_its_count_survives_restarts(start_runner):
    trigger = config.TriggerConfig(target="flowers102", every_folds=2)
    runner = start_runner(triggers=[trigger])
    runner.notify_fold(1)
    assert runner.list() == []
    runner.notify_fold(2)
    [record] = runner.list()
    assert (record.kind, record.target, record.origin) == ("adapt", "flowers102", "folds:2@v2")
    assert record.params == {"target": "flowers102"}                   # the config's [adapt] applies when it runs
    final(runner, record.id)
    runner.notify_fold(3)
    runner.shutdown()

    runner = start_runner(triggers=[trigger])
    runner.notify_fold(4)
    assert [r.origin for r in runner.list()] == ["folds:2@v4", "folds:2@v2"]


def test_a_trigger_does_not_queue_a_second_job_while_one_for_its_target_waits(start_runner):
    trigger = config.TriggerConfig(target="flowers102", every_folds=1)
    runner = start_runner(triggers=[trigger])
    blocker = runner.submit("selftest", {"mode": "hang"})         # holds the only slot
    running_with_progress(runner, blocker)
    runner.notify_fold(1)
    runner.notify_fold(2)
    assert [r.kind for r in runner.list()] == ["adapt", "selftest"]
    runner.cancel(blocker)


def test_cron_trigger_is_armed_and_fires_an_adaptation(start_runner):
    runner = start_runner(triggers=[config.TriggerConfig(target="cars", cron="30 3 * * *")])
    job = runner._scheduler.get_job("trigger-0")
    assert isinstance(job.trigger, CronTrigger)
    assert (job.next_run_time.hour, job.next_run_time.minute) == (3, 30)
    job.func(*job.args)                           # what APScheduler calls at 03:30
    [record] = runner.list()
    assert (record.kind, record.target, record.origin) == ("adapt", "cars", "cron:30 3 * * *")


def test_an_invalid_crontab_is_a_config_error(tmp_path):
    cfg = make_config(tmp_path, triggers=[config.TriggerConfig(target="cars", cron="61 * * * *")])
    with pytest.raises(ConfigError, match=r"scheduler.triggers\[0\].cron: '61 \* \* \* \*'"):
        JobRunner(cfg, cfg.paths.basis_dir)


def test_adapt_params_are_checked_by_stage_2s_rules_when_submitted(tmp_path):
    cfg = make_config(tmp_path)
    args = {"target": "imagefolder:/data/x", "epochs": 3, "lr": None}
    assert adapt_params(args, cfg) == {"target": "imagefolder:/data/x", "epochs": 3}
    for args, message in [({}, "adapt needs a target"),
                          ({"target": "x", "epoch": 3}, "unknown adapt parameter.* epoch;"),
                          ({"target": "x", "epochs": "ten"}, "adapt parameter epochs: expected int"),
                          ({"target": "x", "n_fraction": 1.5}, r"n_fraction must be a number in \(0, 1\]"),
                          ({"target": "x", "epochs": 0}, "adapt.epochs: must be >= 1, got 0")]:
        with pytest.raises(AxisError, match=message):
            adapt_params(args, cfg)


def test_job_store_refuses_a_newer_schema_and_a_non_database(tmp_path):
    path = tmp_path / "jobs.sqlite"
    JobStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(AxisError, match="schema version 99 is newer"):
        JobStore(path)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(AxisError, match="garbage.sqlite: not a usable jobs database"):
        JobStore(garbage)


def test_progress_line_and_table_render_records():
    line = render.progress_line({"epoch": 2, "step": 40, "of": 100, "loss": 0.31234})
    assert line == "epoch 2  step 40/100  loss 0.3123"
    record = {"id": "j1", "state": "succeeded", "kind": "adapt", "target": "cars", "basis_version": 3,
              "created_at": 0.0, "started_at": 10.0, "finished_at": 3735.0, "error": None, "progress": None,
              "result": {"val_accuracy": 0.5, "test_accuracy": 0.25}}
    header, row = render.table([record])
    assert row.split()[:5] == ["j1", "succeeded", "adapt", "cars", "v3"]
    assert "1:02:05" in row and row.endswith("val_accuracy 0.5000  test_accuracy 0.2500")


def test_a_submit_beyond_max_queued_jobs_is_refused_with_the_key_named(start_runner):
    runner = start_runner()
    runner.config.scheduler.max_queued_jobs = 2
    running = runner.submit("selftest", {"mode": "hang"})
    wait_for(lambda: runner.get(running).state == "running", what="the first job to run")
    queued = [runner.submit("selftest", {"steps": 1}) for _ in range(2)]
    with pytest.raises(AxisError, match=r"2 jobs are queued already \(scheduler.max_queued_jobs\)"):
        runner.submit("selftest", {"steps": 1})
    assert [runner.get(j).state for j in queued] == ["queued", "queued"] and len(runner.list()) == 3
    runner.cancel(queued[0])
    runner.submit("selftest", {"steps": 1})          # room again
