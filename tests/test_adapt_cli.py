"""``axis-stream adapt --local`` and ``axis-stream export`` from the command line."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_adapt_data import write_colour_folders

from axis_stream import cli, config
from axis_stream.store.basis import Basis


@pytest.fixture
def setup(tiny_base, make_checkpoint, tmp_path) -> tuple[Path, Path]:
    """A config TOML for the tiny base with a basis of one folded source, and a colour-folder target."""
    base_cfg, base_sd = tiny_base
    path = tmp_path / "axis-stream.toml"
    path.write_text(f"""
[paths]
state_dir = "{tmp_path / 'state'}"
[base]
model = "{base_cfg.model}"
pretrained = "{base_cfg.pretrained}"
model_config = "{base_cfg.model_config}"
[adapt]
num_workers = 0
device = "cpu"
""")
    cfg = config.load(path)
    identity = {"name": base_cfg.model, "pretrained": base_cfg.pretrained}
    basis = Basis.create(cfg.paths.basis_dir, base_sd, cfg.basis, identity)
    basis.fold_checkpoint(make_checkpoint(3))
    return path, write_colour_folders(tmp_path / "colours", n_train=10, n_test=4)


def test_adapt_local_then_export(setup, tmp_path):
    cfg_path, colours = setup
    runner = CliRunner()
    result = runner.invoke(cli.main, ["adapt", "--local", "--config", str(cfg_path), "--target",
                                      f"imagefolder:{colours}", "--epochs", "1", "--batch-size", "8",
                                      "--n-fraction", "0.2"])
    assert result.exit_code == 0, result.output
    assert "epoch 1/1: validation accuracy" in result.output and "test accuracy" in result.output
    assert "with 96 trainable values" in result.output
    job_id = result.output.split(" --job ")[1].split()[0]
    assert job_id.startswith("local-")
    job_dir = config.load(cfg_path).paths.jobs_dir / job_id
    assert json.loads((job_dir / "report.json").read_text())["basis_version"] == 1

    printed = next(line for line in result.output.splitlines() if line.startswith("full weights: "))
    args = shlex.split(printed.removeprefix("full weights: axis-stream "))   # the command as printed
    out = tmp_path / "adapted.safetensors"
    result = runner.invoke(cli.main, [*args[:-1], str(out)])                 # written here, not into the cwd
    assert args[-2:] == ["--out", "model.safetensors"] and result.exit_code == 0, result.output
    assert f"wrote {out}: the adapted model of job {job_id} (basis version 1)" in result.output
    assert "reading basis version 1" in result.output                    # says what it is doing
    open_clip.create_model("axis-tiny", pretrained=str(out))
    run_printed(result.output, tmp_path)
    card = (tmp_path / "adapted.README.md").read_text()
    assert 'library_name: "open_clip"' in card and f'id: "{job_id}"' in card
    again = tmp_path / "again.safetensors"
    assert runner.invoke(cli.main, ["export", "--config", str(cfg_path), "--job", job_id, "--out", str(again)]).exit_code == 0
    assert again.read_bytes() == out.read_bytes() and (tmp_path / "again.README.md").read_text() == card


def run_printed(output: str, cwd: Path) -> None:
    """Run every Python line the CLI printed (indented, starting with ``import``) in a fresh interpreter."""
    lines = [line.strip() for line in output.splitlines() if line.startswith("  import ")]
    assert lines, output
    for line in lines:
        done = subprocess.run([sys.executable, "-c", line], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"


def test_adapt_start_scale_reaches_the_model_and_the_report(setup):
    """--start-scale 0 starts Lambda at 0 (the base model), 1 at the merged values; the report says which."""
    cfg_path, colours = setup
    runner = CliRunner()
    args = ["adapt", "--local", "--config", str(cfg_path), "--target", f"imagefolder:{colours}", "--epochs", "1",
            "--batch-size", "8", "--lr", "1e-9"]  # Lambda barely moves: the saved best Lambda is its start
    jobs_dir = config.load(cfg_path).paths.jobs_dir
    for scale, start in (("0", "start Lambda = 0 s before training"), ("1", "merged model before training")):
        result = runner.invoke(cli.main, args + ["--start-scale", scale])
        assert result.exit_code == 0, result.output
        assert start in result.output
        job_dir = jobs_dir / result.output.split(" --job ")[1].split()[0]
        assert json.loads((job_dir / "report.json").read_text())["hyperparameters"]["start_scale"] == float(scale)
        biggest = max(v.abs().max().item() for v in load_file(str(job_dir / "lambda.safetensors")).values())
        assert biggest < 1e-6 if scale == "0" else biggest > 1e-3
    result = runner.invoke(cli.main, args + ["--start-scale", "-0.5"])
    assert result.exit_code == 1 and "start_scale must be a finite number >= 0" in result.output
    result = runner.invoke(cli.main, args + ["--start-scale", "weak"])
    assert result.exit_code == 2 and "'weak' is neither a number nor auto" in result.output
    for given in (["--start-scale", "auto"], []):  # auto is the default: the candidates are scored and printed
        result = runner.invoke(cli.main, args + given)
        assert result.exit_code == 0, result.output
        job_dir = jobs_dir / result.output.split(" --job ")[1].split()[0]
        report = json.loads((job_dir / "report.json").read_text())
        assert report["hyperparameters"]["start_scale"] == "auto"
        assert [c["name"] for c in report["start"]["candidates"]] == ["merged", "half", "zero"]  # 1 source: c = 1
        assert result.output.count(f"start: {report['start']['chosen']} (mean scale") == 2  # progress and summary
        assert "validation accuracy of each start on" in result.output


def test_cli_errors_are_one_clear_line(setup, tmp_path):
    cfg_path, colours = setup
    runner = CliRunner()
    result = runner.invoke(cli.main, ["adapt", "--local", "--config", str(cfg_path), "--target",
                                      f"imagefolder:{colours}", "--n-fraction", "1.5"])
    assert result.exit_code == 1 and "n_fraction must be a number in (0, 1]" in result.output
    result = runner.invoke(cli.main, ["adapt", "--local", "--config", str(cfg_path), "--target", "flowers102",
                                      "--data-root", str(tmp_path / "data")])
    assert result.exit_code == 1 and "flowers-102/" in result.output and "nothing is downloaded" in result.output
    result = runner.invoke(cli.main, ["export", "--config", str(cfg_path), "--job", "nope",
                                      "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "not a finished adapt job" in result.output
    result = runner.invoke(cli.main, ["export", "--config", str(cfg_path), "--job", "../x", "--out", "x.safetensors"])
    assert result.exit_code == 2 and "not a job id" in result.output


def test_export_merged_writes_the_base_plus_the_basis_at_its_stored_values(setup, tiny_base, make_checkpoint, tmp_path):
    cfg_path, _ = setup
    _, base_sd = tiny_base
    cfg = config.load(cfg_path)
    Basis.open(cfg.paths.basis_dir, base_sd).fold_checkpoint(make_checkpoint(4))      # version 2
    runner = CliRunner()
    for version in (None, 1):
        out = tmp_path / f"merged-{version}.safetensors"
        args = ["export", "--merged", "--config", str(cfg_path), "--out", str(out)]
        result = runner.invoke(cli.main, args + (["--version", str(version)] if version else []))
        assert result.exit_code == 0, result.output
        weights = load_file(str(out))
        snap = Basis.open(cfg.paths.basis_dir).load(version)
        assert snap.version == (version or 2)
        for name, b in base_sd.items():
            want = b.double()
            if name in snap.factors:
                f = snap.factors[name]
                c = snap.calibration.get(name, 1.0)   # the merged basis as calibrated (README "Calibration")
                want = want + c * ((f.U.double() * f.s.double()) @ f.V.double().mT).reshape(b.shape)
            elif name in snap.means:
                want = want + snap.means[name].double()
            assert (weights[name].double() - want).abs().max() < 1e-5, name
        assert any(not bool((weights[n] == base_sd[n]).all()) for n in snap.factors)
        open_clip.create_model("axis-tiny", pretrained=str(out))
    result = runner.invoke(cli.main, ["export", "--config", str(cfg_path), "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "give either --job ID or --merged" in result.output


def test_export_merged_on_an_open_clip_base_is_one_loadable_file(setup, tmp_path):
    cfg_path, _ = setup
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(cli.main, ["export", "--merged", "--config", str(cfg_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "the merged model of basis version 1" in result.output
    run_printed(result.output, tmp_path)                # in a fresh Python: the model config registered first
    assert "base_model: \"axis-tiny\"" in (tmp_path / "merged.README.md").read_text()
    # the base read from its safetensors file, open_clip never imported (3 s of the export); the same bytes
    fast = tmp_path / "fast.safetensors"
    code = (f"import sys; from axis_stream import config; from axis_stream.store.export import export_merged; "
            f"export_merged(config.load({str(cfg_path)!r}), {str(fast)!r}); assert 'open_clip' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert fast.read_bytes() == out.read_bytes()
    cfg = config.load(cfg_path)
    merged = Basis.open(cfg.paths.basis_dir, load_file(cfg.base.pretrained)).materialize(with_base=True)
    model = open_clip.create_model(cfg.base.model, pretrained=str(out))
    assert all(torch.equal(t, merged[name]) for name, t in model.state_dict().items() if name in merged)
    assert not torch.equal(merged["visual.transformer.resblocks.0.attn.in_proj_weight"],
                           load_file(cfg.base.pretrained)["visual.transformer.resblocks.0.attn.in_proj_weight"])
    result = CliRunner().invoke(cli.main, ["export", "--merged", "--config", str(cfg_path), "--out",
                                           str(tmp_path / "merged.pt")])
    assert result.exit_code == 1 and "one file ending in .safetensors" in result.output
    result = CliRunner().invoke(cli.main, ["export", "--merged", "--adapter", "--config", str(cfg_path), "--out",
                                           str(tmp_path / "adapter")])
    assert result.exit_code == 1 and "--adapter needs a Hugging Face (transformers) base" in result.output


def test_every_stage2_setting_is_one_adapt_option_and_one_job_parameter():
    """Declared once (config.AdaptConfig): the CLI's options and the job's parameters follow it."""
    import dataclasses

    from axis_stream.adapt.recipe import job_settings
    from axis_stream.cli import adapt as adapt_command
    from axis_stream.config import AdaptConfig, Config

    options = {p.name: p for p in adapt_command.params}
    for f in dataclasses.fields(AdaptConfig):
        assert f.name in options and options[f.name].help == f.metadata["help"], f.name
    settings = job_settings({"target": "mnist", "grad_clip": "0.5", "amp": False, "val_max": 7}, Config())
    assert (settings.hp.grad_clip, settings.hp.amp, settings.hp.val_max) == (0.5, False, 7)
