"""The ray executor: jobs and evaluation runs as Ray tasks on a local Ray instance started here.

Ray is optional (``pip install 'axis-stream[ray]'``): without it these tests skip, except the one
checking that asking for the ray executor then fails at start-up saying what to install.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from test_adapt_data import write_colour_folders
from test_evaluate import read_rows, write_experiment
from test_jobs import least_squares, process_gone, wait_for

from axis_stream import config
from axis_stream.cluster import connect
from axis_stream.errors import ConfigError
from axis_stream.experiments.evaluate.experiment import load_experiment
from axis_stream.experiments.evaluate.results import _key
from axis_stream.experiments.evaluate.runner import run_experiment
from axis_stream.service.jobs import ray as ray_executor
from axis_stream.service.jobs.records import FINAL_STATES, JobRecord
from axis_stream.service.jobs.runner import JobRunner

TIMING = ("seconds", "step_seconds")      # wall-clock columns: the only ones allowed to differ between runs
PATIENCE_S = 180.0                        # Ray workers start slowly on a busy 2-core machine


def final(runner: JobRunner, job_id: str) -> JobRecord:
    return wait_for(lambda: (r := runner.get(job_id)).state in FINAL_STATES and r, PATIENCE_S,
                    what=f"job {job_id} to end")


def closed_log(record: JobRecord) -> str:
    """The job's log once the runner has closed it with the outcome line (just after recording it)."""
    path = Path(record.log_path)
    return wait_for(lambda: f"axis-stream: job {record.id} " in (text := path.read_text()) and text, PATIENCE_S,
                    what=f"job {record.id}'s log to be closed")


def recorded(finals: list, count: int) -> list:
    """``finals`` once it holds ``count`` entries (on_change runs just after a record is written)."""
    return wait_for(lambda: len(finals) >= count and finals, PATIENCE_S, what=f"{count} final state(s) to be reported")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 2 CPUs for this module's tests (tasks ask for no GPU)."""
    ray = pytest.importorskip("ray")
    environ, sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    os.environ.clear()                        # ray.init leaves RAY_* variables and a SIGTERM handler behind
    os.environ.update(environ)
    signal.signal(signal.SIGTERM, sigterm)


def ray_config(state_dir: Path, **ray_settings) -> config.Config:
    cfg = config.Config()
    cfg.paths.state_dir = state_dir
    cfg.scheduler.executor = "ray"
    cfg.scheduler.ray = config.RayConfig(num_gpus=0, **ray_settings)
    return cfg.validate()


@pytest.fixture
def ray_runner(ray_local, tmp_path):
    """``ray_runner(**ray_settings) -> (JobRunner, finals)``; ``finals`` lists each final state recorded."""
    runners = []

    def start(cfg: config.Config | None = None, **ray_settings):
        finals: list[tuple[str, str]] = []
        cfg = cfg or ray_config(tmp_path / "state", **ray_settings)
        runner = JobRunner(cfg, cfg.paths.basis_dir, kill_grace_s=2.0,
                                on_change=lambda r: r.state in FINAL_STATES and finals.append((r.id, r.state)))
        runner.start()
        runners.append(runner)
        return runner, finals

    yield start
    for runner in runners:
        runner.shutdown()


def test_the_ray_executor_without_ray_installed_fails_at_start_up_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)         # import ray -> ImportError
    cfg = ray_config(tmp_path / "state")
    with pytest.raises(ConfigError, match=r"scheduler.executor = \"ray\" needs Ray.*pip install 'axis-stream\[ray\]'"):
        JobRunner(cfg, cfg.paths.basis_dir)
    with pytest.raises(ConfigError, match=r"executor = \"ray\" needs Ray.*pip install"):
        connect(config.RayConfig(), "executor")


def test_executor_settings_are_validated(tmp_path):
    path = tmp_path / "axis-stream.toml"
    for text, key in (('[scheduler]\nexecutor = "slurm"\n', "scheduler.executor"),
                      ("[scheduler.ray]\nmax_retries = -1\n", "scheduler.ray.max_retries"),
                      ("[scheduler.ray]\nnum_gpus = -0.5\n", "scheduler.ray.num_gpus"),
                      ('[scheduler.ray]\naddress = ""\n', "scheduler.ray.address")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=key):
            config.load(path, env={})
    path.write_text('[scheduler]\nexecutor = "ray"\n[scheduler.ray]\naddress = "ray://head:10001"\nmax_retries = 2\n')
    cfg = config.load(path, env={})
    assert (cfg.scheduler.executor, cfg.scheduler.ray.address, cfg.scheduler.ray.max_retries) == ("ray", "ray://head:10001", 2)


def test_experiment_executor_settings_are_validated_and_name_the_file(tmp_path, tiny_base):
    path = write_experiment(tmp_path, tiny_base, files=False, replace={"seeds = [0]": 'seeds = [0]\nexecutor = "slurm"'})
    with pytest.raises(ConfigError, match=r"experiment.toml: executor: 'slurm' is not one of local, ray"):
        load_experiment(path)
    path.write_text(path.read_text().replace('"slurm"', '"ray"') + "\n[ray]\nmax_retries = -1\n")
    with pytest.raises(ConfigError, match=r"experiment.toml: ray.max_retries: must be >= 0"):
        load_experiment(path)


@pytest.mark.parametrize("ship_basis", [False, True])
def test_a_job_runs_as_a_ray_task_with_its_result_progress_log_and_files(ray_runner, ship_basis):
    runner, finals = ray_runner(ship_basis=ship_basis)
    job_id = runner.submit("selftest", {"steps": 30, "seed": 4})
    record = final(runner, job_id)
    assert record.state == "succeeded", record.error
    w, b = least_squares(4)
    assert abs(record.result["w"] - w) < 0.05 and abs(record.result["b"] - b) < 0.05
    assert record.progress == {"step": 30, "of": 30, "loss": record.result["loss"]}
    text = closed_log(record)
    assert "attempt 1 of 1 started on Ray node" in text and "selftest: fitting y = 3x - 1" in text
    assert text.rstrip().endswith(f"job {job_id} succeeded")
    # written on the worker: in the job folder directly (shared filesystem) or sent back with the result
    written = Path(record.log_path).parent / "selftest.json"
    assert json.loads(written.read_text())["w"] == record.result["w"]
    assert recorded(finals, 1) == [(job_id, "succeeded")]


def test_a_worker_killed_mid_run_is_retried_as_configured_and_recorded_once(ray_runner):
    runner, finals = ray_runner(max_retries=1)

    def kill_running(job_id: str, not_pid: int | None = None) -> int:
        pid = wait_for(lambda: (r := runner.get(job_id)).state == "running" and r.pid != not_pid and r.progress
                       and r.pid, PATIENCE_S, what="the job's worker")
        os.kill(pid, signal.SIGKILL)
        return pid

    # killed once: Ray runs it again, and it succeeds; one result, recorded once
    once = runner.submit("selftest", {"steps": 150, "sleep_s": 0.02, "seed": 1})
    first = kill_running(once)
    record = final(runner, once)
    assert record.state == "succeeded" and record.result["steps"] == 150, record.error
    text = closed_log(record)
    assert "attempt 1 of 2 started on Ray node" in text and f"(pid {first})" in text
    assert "attempt 2 of 2 started" in text and text.count(f"job {once} succeeded") == 1

    # killed at both attempts: retries used up, failed with the reason, recorded once
    twice = runner.submit("selftest", {"steps": 150, "sleep_s": 0.02, "seed": 2})
    first = kill_running(twice)
    kill_running(twice, not_pid=first)
    record = final(runner, twice)
    assert record.state == "failed" and record.result is None
    assert "Ray worker running the job was lost (2 attempt(s), scheduler.ray.max_retries = 1)" in record.error
    assert recorded(finals, 2) == [(once, "succeeded"), (twice, "failed")]


def test_cancel_stops_the_ray_task_and_its_worker(ray_runner):
    runner, finals = ray_runner()
    job_id = runner.submit("selftest", {"mode": "hang"})
    pid = wait_for(lambda: (r := runner.get(job_id)).state == "running" and r.progress and r.pid, PATIENCE_S,
                   what="the job's worker")
    record = runner.cancel(job_id)
    assert record.state == "cancelled" and record.error == "cancelled while running"
    wait_for(lambda: process_gone(pid), PATIENCE_S, what="the worker process to end")
    assert recorded(finals, 1) == [(job_id, "cancelled")]


def test_a_shipped_basis_version_reaches_the_worker_and_an_adapt_job_returns_its_files(
        ray_runner, tiny_base, make_checkpoint, tmp_path):
    from axis_stream.store.basis import Basis

    base_cfg, base_sd = tiny_base
    cfg = ray_config(tmp_path / "state", ship_basis=True)
    cfg.base = base_cfg
    basis = Basis.create(cfg.paths.basis_dir, base_sd, cfg.basis, {"name": base_cfg.model,
                                                                   "pretrained": base_cfg.pretrained})
    basis.fold_checkpoint(make_checkpoint(5))
    basis.fold_checkpoint(make_checkpoint(6))

    # the unpacked copy holds the pinned version exactly
    files = ray_executor.basis_files(cfg.paths.basis_dir, basis.version)
    copy = ray_executor.unpack_basis(files, basis.version, root=tmp_path / "node")
    assert ray_executor.unpack_basis(files, basis.version, root=tmp_path / "node") == copy   # once per node
    original, shipped = basis.load(), Basis.open(copy, base_sd).load(basis.version)
    for name, f in original.factors.items():
        for a, b in zip((f.U, f.s, f.V), (shipped.factors[name].U, shipped.factors[name].s, shipped.factors[name].V)):
            assert torch.equal(a, b)

    colours = write_colour_folders(tmp_path / "colours", n_train=8, n_test=4)
    runner, finals = ray_runner(cfg)
    job_id = runner.submit("adapt", {"target": f"imagefolder:{colours}", "device": "cpu", "num_workers": 0,
                                     "batch_size": 16, "epochs": 1, "n_fraction": 0.1})
    record = final(runner, job_id)
    assert record.state == "succeeded", record.error
    assert record.basis_version == basis.version == record.result["basis_version"]
    out = Path(record.log_path).parent
    assert {"lambda.safetensors", "report.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "report.json").read_text())["test_accuracy"] == record.result["test_accuracy"]


def test_an_evaluation_through_ray_gives_the_local_executors_rows(ray_local, tmp_path, tiny_base):
    """2 targets x 2 seeds of the tiny experiment, once here and once as Ray tasks: the same rows."""
    rows = {}
    for executor in ("local", "ray"):
        folder = tmp_path / executor
        folder.mkdir()
        path = write_experiment(folder, tiny_base, methods=["axis"],
                                replace={"seeds = [0]": f'seeds = [0, 1]\nexecutor = "{executor}"',
                                         "levels = []": "levels = [1]"},
                                extra="\n[ray]\nnum_gpus = 0\nmax_retries = 1\n")
        exp = load_experiment(path)
        assert exp.executor == executor and exp.ray.num_gpus == 0
        lines = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)              # as in a Ray worker with one CPU: the same float reductions
        try:
            run_experiment(exp, lines.append)
        finally:
            torch.set_num_threads(threads)
        rows[executor] = sorted(({k: v for k, v in r.items() if k not in TIMING}
                                 for r in read_rows(exp.output_dir / "results.csv")), key=_key)
        assert sum(line.startswith("[") for line in lines) == 4
    assert len(rows["local"]) == 4 and {(r["target"], r["seed"]) for r in rows["local"]} == {
        (t, s) for t in ("cars", "dtd") for s in ("0", "1")}
    assert rows["ray"] == rows["local"]
