"""The Stage 2 recipe end to end on a tiny CLIP: it learns, reports, resumes, exports, and runs on a real basis."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from test_adapt_data import write_colour_folders
from test_adapt_model import snapshot_from_sources

from axis_stream import config
from axis_stream.adapt.export import export_job, read_job, write_adapted
from axis_stream.adapt.head import logits
from axis_stream.adapt.model import AdaptError, SVDAdapted
from axis_stream.adapt.recipe import adapt, job_settings
from axis_stream.errors import ConfigError
from axis_stream.service.jobs.kinds import JobContext, run_adapt
from axis_stream.store import models


@pytest.fixture(scope="module")
def snapshot(tiny_base):
    return snapshot_from_sources(tiny_base[1])


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_colour_folders(tmp_path_factory.mktemp("colours"), n_train=20, n_test=10)


def quick(colours: Path, **params) -> dict:
    return {"target": f"imagefolder:{colours}", "device": "cpu", "num_workers": 0, "batch_size": 16,
            "n_fraction": 0.4, "epochs": 2, **params}


def run(tiny_base, snapshot, out: Path, params: dict, progress=None) -> dict:
    out.mkdir(exist_ok=True)
    job = job_settings(params, config.Config())
    return adapt(models.create_base(tiny_base[0]), tiny_base[0], snapshot, job, out, progress or (lambda e: None))


@pytest.fixture(scope="module")
def seed_runs(tiny_base, snapshot, colours, tmp_path_factory):
    """Three seeds of a 3-epoch run: (report, job folder, progress events) each."""
    runs = []
    for seed in range(3):
        out, events = tmp_path_factory.mktemp(f"job-{seed}"), []
        report = run(tiny_base, snapshot, out, quick(colours, seed=seed, epochs=3), events.append)
        runs.append((report, out, events))
    return runs


def test_stage2_improves_over_the_unadapted_merged_model(seed_runs):
    gains = [r["test_accuracy"] - r["initial_test_accuracy"] for r, _, _ in seed_runs]
    assert statistics.mean(gains) >= 0.25, gains
    assert all(r["val_accuracy"] >= r["initial_val_accuracy"] for r, _, _ in seed_runs)


def test_report_files_and_progress(seed_runs, snapshot):
    report, out, events = seed_runs[0]
    assert report["trainable_params"] == 8 * 25  # 8 matrices of min(m, n) = 64, N = floor(0.4 * 64)
    assert report["basis_version"] == 3 and report["target"].startswith("imagefolder:")
    assert report["sizes"] == {"train": 72, "val": 8, "test": 40}
    assert 0 <= report["test_accuracy"] <= 1 and report["best_epoch"] in range(4)
    assert report["peak_memory_bytes"] > 0 and report["step_seconds"] > 0
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3]
    assert json.loads((out / "report.json").read_text()) == report
    lam = load_file(out / "lambda.safetensors")
    assert sorted(lam) == sorted(snapshot.factors) and sum(t.numel() for t in lam.values()) == 200
    assert load_file(out / "head.safetensors")["head"].shape == (4, models.TINY_CLIP["embed_dim"])
    train = [e for e in events if e["phase"] == "train"]
    assert train[0] == {**train[0], "epoch": 1, "epochs": 3, "step": 1, "of": 5} and "loss" in train[0]
    assert [e["epoch"] for e in events if e["phase"] == "validate"] == [0, 1, 2, 3]
    assert events[-1] == {"phase": "test", "test_accuracy": report["test_accuracy"]}
    # start_scale "auto" (the default): every candidate scored on validation, the chosen one is epoch 0
    start = report["start"]
    assert report["hyperparameters"]["start_scale"] == "auto" and events[0] == {"phase": "start", **start}
    assert [c["name"] for c in start["candidates"]] == ["merged", "half", "zero"]  # no calibration in this basis
    assert all(c["n"] == report["sizes"]["val"] for c in start["candidates"])
    chosen = next(c for c in start["candidates"] if c["name"] == start["chosen"])
    assert report["initial_val_accuracy"] == chosen["val_accuracy"] and start["scale"] == chosen["scale"]


class Crash(Exception):
    pass


def test_a_crashed_job_resumes_after_its_last_epoch(tiny_base, snapshot, colours, tmp_path):
    whole = run(tiny_base, snapshot, tmp_path / "whole", quick(colours))

    def crash_after_epoch_1(event):
        if event["phase"] == "validate" and event["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        run(tiny_base, snapshot, tmp_path / "resumed", quick(colours), crash_after_epoch_1)
    assert not (tmp_path / "resumed" / "report.json").exists()
    events = []
    resumed = run(tiny_base, snapshot, tmp_path / "resumed", quick(colours), events.append)
    assert {e["epoch"] for e in events if e["phase"] == "train"} == {2}
    assert "start" not in {e["phase"] for e in events} and resumed["start"] == whole["start"]  # not re-scored
    assert resumed["history"] == whole["history"] and resumed["test_accuracy"] == whole["test_accuracy"]
    a, b = load_file(tmp_path / "whole" / "lambda.safetensors"), load_file(tmp_path / "resumed" / "lambda.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(AdaptError, match="other settings"):
        run(tiny_base, snapshot, tmp_path / "resumed", quick(colours, lr=0.05))
    with pytest.raises(AdaptError, match="other settings"):  # another start is another run
        run(tiny_base, snapshot, tmp_path / "resumed", quick(colours, start_scale=0.3))


def test_export_loads_in_open_clip_with_the_jobs_predictions(tiny_base, snapshot, seed_runs, tmp_path):
    _, job_dir, _ = seed_runs[1]
    report, lambdas = read_job(job_dir)
    out = write_adapted(models.create_base(tiny_base[0]), snapshot, report, lambdas, tmp_path / "model.safetensors",
                        "the card\n")
    assert (tmp_path / "model.README.md").read_text() == "the card\n"
    exported = open_clip.create_model("axis-tiny", pretrained=str(out))
    job_model = SVDAdapted(models.create_base(tiny_base[0]), snapshot.factors, snapshot.means, report["n_fraction"],
                           seed=report["seed"])
    job_model.load_lambdas(lambdas)
    head = load_file(job_dir / "head.safetensors")["head"]
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = logits(job_model.call("encode_image", images), head)
        got = logits(exported.encode_image(images), head)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(AdaptError, match="must end in .safetensors"):
        write_adapted(models.create_base(tiny_base[0]), snapshot, report, lambdas, tmp_path / "model.pt", "")


@pytest.mark.parametrize("params, error, message", [
    ({"target": "dtd", "learning_rate": 1}, AdaptError, "unknown adapt parameter.*learning_rate"),
    ({"epochs": 2}, AdaptError, "needs a target"),
    ({"target": "dtd", "n_fraction": 1.5}, AdaptError, r"n_fraction must be a number in \(0, 1\]"),
    ({"target": "dtd", "n_fraction": 0}, AdaptError, "n_fraction"),
    ({"target": "dtd", "epochs": "two"}, AdaptError, "epochs: expected int"),
    ({"target": "dtd", "start_scale": -0.3}, AdaptError, "start_scale must be a finite number >= 0"),
    ({"target": "dtd", "start_scale": "weak"}, AdaptError, "start_scale: expected float or \"auto\""),
    ({"target": "dtd", "start_scale": True}, AdaptError, "start_scale: expected float or \"auto\""),
    ({"target": "dtd", "start_scale": "nan"}, AdaptError, "start_scale must be a finite number >= 0 or \"auto\""),
    ({"target": "dtd", "epochs": 0}, ConfigError, "adapt.epochs"),
    ({"target": "dtd", "max_train_samples": -3}, AdaptError, "max_train_samples"),
    ({"target": "dtd", "classnames": "cat dog"}, AdaptError, "classnames: expected a list of strings"),
])
def test_bad_job_parameters_are_clear_errors(params, error, message):
    with pytest.raises(error, match=message):
        job_settings(params, config.Config())


def test_job_parameters_override_the_config():
    job = job_settings({"target": "dtd", "n_fraction": "0.2", "epochs": 3, "data_root": "/data"}, config.Config())
    assert (job.hp.n_fraction, job.hp.epochs, job.hp.lr, job.data_root) == (0.2, 3, 0.1, Path("/data"))
    assert job.hp.start_scale == "auto"
    assert job_settings({"target": "dtd", "start_scale": "0.3"}, config.Config()).hp.start_scale == 0.3
    assert job_settings({"target": "dtd", "start_scale": 1}, config.Config()).hp.start_scale == 1.0
    assert job_settings({"target": "dtd", "start_scale": "AUTO"}, config.Config()).hp.start_scale == "auto"


def test_the_adapt_job_runs_against_a_basis_version_and_exports(tiny_base, make_checkpoint, colours, tmp_path):
    from axis_stream.store.basis import Basis

    base_cfg, base_sd = tiny_base
    cfg = config.Config(paths=config.PathsConfig(state_dir=tmp_path / "state"), base=base_cfg)
    identity = {"name": base_cfg.model, "pretrained": base_cfg.pretrained}
    basis = Basis.create(cfg.paths.basis_dir, base_sd, cfg.basis, identity)
    for seed in (5, 6):
        basis.fold_checkpoint(make_checkpoint(seed))
    snap = basis.load()
    start = SVDAdapted(models.create_base(base_cfg), snap.factors, snap.means, 0.1)
    start.set_start(snap.calibration)   # the calibrated start is the merged model export --merged writes
    assert snap.calibration   # two sources on the same base pile up: a factor below 1
    tau = basis.materialize()
    for name, w in start.merged_state_dict().items():
        torch.testing.assert_close(w, base_sd[name] + tau.get(name, 0), rtol=0, atol=1e-6)

    ctx = JobContext("job-1", cfg, cfg.paths.basis_dir, basis.version, cfg.paths.jobs_dir / "job-1", lambda e: None)
    basis.fold_checkpoint(make_checkpoint(7))  # a later fold does not change the pinned version
    result = run_adapt(quick(colours, epochs=1, n_fraction=0.1), ctx)
    assert result["basis_version"] == ctx.basis_version == basis.version - 1
    assert {"val_accuracy", "test_accuracy", "trainable_params", "peak_memory_bytes", "step_seconds"} <= set(result)
    out, version = export_job(ctx.out_dir, tmp_path / "adapted.safetensors", cfg)
    assert version == ctx.basis_version
    exported = open_clip.create_model("axis-tiny", pretrained=str(out))
    job_model = SVDAdapted(models.create_base(base_cfg), snap.factors, snap.means, 0.1, seed=0)
    job_model.load_lambdas(load_file(ctx.out_dir / "lambda.safetensors"))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_image(images), job_model.call("encode_image", images),
                                   rtol=0, atol=1e-5)
