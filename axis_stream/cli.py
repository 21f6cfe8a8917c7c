"""The ``axis-stream`` command line: parse, call one function, print."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

import click

from axis_stream import __version__, render
from axis_stream.config import AdaptConfig
from axis_stream.errors import AxisError
from axis_stream.text import printable


class AxisGroup(click.Group):
    """A command group that turns every ``AxisError`` a command raises into one ``Error: ...`` line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AxisError as exc:
            raise click.ClickException(str(exc)) from None


class StartScale(click.ParamType):
    """``--start-scale``: a number or ``auto`` (the range is checked with the job's other parameters)."""

    name = "number|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or (isinstance(value, str) and value.strip().lower() == "auto"):
            return value if isinstance(value, float) else "auto"
        try:
            return float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor auto", param, ctx)


_START_SCALE = StartScale()


def _adapt_settings(command: Callable) -> Callable:
    """One optional ``--name`` per Stage 2 setting (``config.AdaptConfig``: its type and help); an
    unset option keeps the config's value."""
    hints = get_type_hints(AdaptConfig)
    for f in reversed(dataclasses.fields(AdaptConfig)):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            command = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=f.metadata["help"])(command)
        else:
            kind = _START_SCALE if f.name == "start_scale" else kind
            command = click.option(flag, f.name, type=kind, help=f.metadata["help"])(command)
    return command


@click.group(cls=AxisGroup)
@click.version_option(__version__, prog_name="axis-stream")
def main() -> None:
    """Fold fine-tuned checkpoints into one AXIS merged basis and adapt it to new tasks."""


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Workspace folder (default: a new temporary one).")
def quickstart(workdir: str | None) -> None:
    """Run the main job on an embedded default and print what happened.

    Fine-tunes a tiny CLIP on generated tasks, starts the daemon, drops the checkpoints into its
    watched folder, waits for the folds, runs an adaptation job, and reports.
    """
    from axis_stream.service.quickstart import run

    for line in run(workdir):
        click.echo(line)


# -- jobs and the control socket: these commands talk to a running `axis-stream serve` ---------------

_CONFIG_OPTION = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                              help="Config TOML (defaults apply without one); names the daemon's control socket.")


def _socket(config_path: str | None):
    """The control socket of the daemon that ``config_path`` describes."""
    from axis_stream import config

    return config.load(config_path).paths.socket


def _call(socket_path, op: str, hint: str = "start `axis-stream serve`", **args):
    """One control request; no daemon -> one line and exit 2, a refusal -> "Error: ..." and exit 1."""
    from axis_stream.service import api

    try:
        return api.request(socket_path, op, **args)
    except api.DaemonNotRunning as exc:
        click.echo(f"{exc}; {hint}", err=True)
        raise SystemExit(2) from None


@main.command()
@_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON reply (times as Unix seconds).")
def status(config_path: str | None, as_json: bool) -> None:
    """Show the running daemon's status."""

    reply = _call(_socket(config_path), "status")
    click.echo(json.dumps(reply, indent=2) if as_json else "\n".join(render.status_lines(reply)))


@main.command()
@_CONFIG_OPTION
@click.option("--target", required=True, help="Dataset to adapt to, e.g. flowers102, or imagefolder:PATH.")
@click.option("--data-root", type=click.Path(file_okay=False), help="Root folder of the datasets.")
@click.option("--max-train-samples", type=int, help="Use at most this many training images (quick runs).")
@click.option("--max-eval-samples", type=int, help="Use at most this many validation and test images (quick runs).")
@click.option("--classnames", "classnames_file", type=click.Path(exists=True, dir_okay=False),
              help="Your own class names, one per line, in label order (default: shipped or folder names).")
@click.option("--templates", "templates_file", type=click.Path(exists=True, dir_okay=False),
              help="Your own prompt templates, one per line, with {} where the class name goes.")
@click.option("--wait", is_flag=True, help="Print progress until the job ends, then its result.")
@click.option("--local", is_flag=True, help="Run it here in the foreground (no daemon needed), with a progress bar.")
@_adapt_settings
def adapt(config_path: str | None, target: str, data_root: str | None, max_train_samples: int | None,
          max_eval_samples: int | None, classnames_file: str | None, templates_file: str | None, wait: bool,
          local: bool, **settings: Any) -> None:
    """Queue a Stage 2 adaptation of the current basis to TARGET on the daemon (--local: run it here)."""

    from axis_stream.service.jobs.client import watch_job

    if target.startswith("imagefolder:"):    # the daemon runs elsewhere: a path relative to here means nothing there
        target = "imagefolder:" + str(Path(target.split(":", 1)[1]).expanduser().resolve())
    given = {"target": target, "data_root": str(Path(data_root).resolve()) if data_root else None,
             "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples,
             "classnames": _text_lines(classnames_file), "templates": _text_lines(templates_file), **settings}
    if local:
        return _adapt_local(config_path, {k: v for k, v in given.items() if v is not None})
    socket_path = _socket(config_path)
    record = _call(socket_path, "adapt", hint="start `axis-stream serve` or rerun with --local",
                   **{k: v for k, v in given.items() if v is not None})
    click.echo(printable(f"queued job {record['id']}: adapt {target}"))
    if not wait:
        click.echo(f"follow it with `axis-stream jobs show {record['id']}` "
                   f"or `axis-stream jobs logs --follow {record['id']}`")
        return
    try:
        for record in _guard(watch_job, socket_path, record["id"]):  # noqa: B020 (the id is read once, before the loop)
            click.echo(render.update_line(record))
    except KeyboardInterrupt:
        click.echo(f"\nstopped waiting; job {record['id']} keeps running (`axis-stream jobs cancel {record['id']}` "
                   "stops it)", err=True)
        raise SystemExit(130) from None
    click.echo("\n".join(render.final_lines(record, config_path)))
    if record["state"] != "succeeded":
        raise SystemExit(1)


def _text_lines(path: str | None) -> list[str] | None:
    """The non-empty lines of a text file (class names, templates)."""
    if path is None:
        return None

    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _adapt_local(config_path: str | None, params: dict) -> None:
    """``adapt --local``: Stage 2 in this process against the current basis, then its result."""
    from axis_stream import config
    from axis_stream.service.jobs.kinds import run_local
    from axis_stream.store.statelock import lock_state

    cfg = config.load(config_path)
    with lock_state(cfg.paths.state_dir, "adapt --local", hint="rerun without --local to queue it on the daemon"):
        result = run_local(params, cfg, _StageProgress())
    click.echo("\n".join(render.adapt_summary_lines(result, config_path)))


class _StageProgress:
    """Stage 2 progress events as a progress bar per epoch and a line per evaluation."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, event: dict) -> None:
        if event["phase"] == "train":
            if self.bar is None:
                self.bar = click.progressbar(length=event["of"], label=f"epoch {event['epoch']}/{event['epochs']}",
                                             show_pos=True, item_show_func=lambda loss: None if loss is None else f"loss {loss:.4f}")
                self.bar.__enter__()
            self.bar.update(1, event["loss"])
            if event["step"] == event["of"]:
                self.bar.__exit__(None, None, None)
                self.bar = None
        elif event["phase"] == "start":
            click.echo(render.start_line(event))
        elif event["phase"] == "validate":
            best = f" (best {event['best_val_accuracy']:.2%})" if "best_val_accuracy" in event else " (before training)"
            click.echo(f"epoch {event['epoch']}/{event['epochs']}: validation accuracy {event['val_accuracy']:.2%}{best}")


@main.command(name="export")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config TOML (defaults apply without one): the base model, the basis and <state_dir>/jobs.")
@click.option("--job", "job_id", help="The adapt job's id (its folder under <state_dir>/jobs).")
@click.option("--merged", is_flag=True, help="Instead: the merged model of Stage 1 (base + basis + averaged "
                                             "parameters); a Hugging Face folder for a transformers base.")
@click.option("--version", "basis_version", type=int, help="With --merged: the basis version (default: current).")
@click.option("--adapter", is_flag=True, help="A PEFT LoRA adapter folder of the base instead of the full model "
                                              "(a Hugging Face base; needs the hf extra).")
@click.option("--out", required=True, type=click.Path(),
              help="Output: a .safetensors file (open_clip), or a new folder (a transformers base, --adapter).")
def export_cmd(config_path: str | None, job_id: str | None, merged: bool, basis_version: int | None,
               adapter: bool, out: str) -> None:
    """Write an adapt job's full adapted weights (an open_clip state dict in safetensors, or a Hugging Face
    folder), or with --merged the basis's merged model; with --adapter either as a LoRA adapter. A model
    card (README.md) goes with every export."""

    from axis_stream import config

    if merged == bool(job_id):
        raise click.UsageError("give either --job ID or --merged")
    cfg = config.load(config_path)

    def say(line: str) -> None:  # what the export is doing, as it goes
        click.echo(f"  {line}")

    if merged:
        from axis_stream.store.export import export_merged, load_line

        path, version = export_merged(cfg, Path(out), basis_version, adapter=adapter, say=say)
        what = "a LoRA adapter of" if adapter else "the merged model of"
        click.echo(f"wrote {path}: {what} basis version {version}; load it in Python with:\n"
                   f"  {load_line(cfg.base, path, adapter)}")
        return
    from axis_stream.adapt.export import export_job
    from axis_stream.adapt.files import HEAD_FILE
    from axis_stream.store.export import load_line

    if Path(job_id).name != job_id or job_id in ("", ".", ".."):
        raise click.BadParameter(f"{job_id!r} is not a job id", param_hint="--job")
    path, version = export_job(cfg.paths.jobs_dir / job_id, Path(out), cfg, adapter=adapter, say=say)
    what = "a LoRA adapter of" if adapter else "the adapted model of"
    click.echo(f"wrote {path}: {what} job {job_id} (basis version {version}); load it in Python with:\n"
               f"  {load_line(cfg.base, path, adapter)}\n"
               f"the job's zero-shot head is {cfg.paths.jobs_dir / job_id / HEAD_FILE}")


def _guard(generator, *args):
    """Iterate a client-side generator, turning control-API failures into a clean CLI exit."""
    from axis_stream.service import api

    try:
        yield from generator(*args)
    except api.DaemonNotRunning as exc:
        click.echo(f"{exc} (did it stop?)", err=True)
        raise SystemExit(2) from None


@main.group(name="jobs")
def jobs_group() -> None:
    """List, inspect, cancel and read the logs of adaptation jobs on the daemon."""


@jobs_group.command(name="list")
@_CONFIG_OPTION
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Newest jobs to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON reply.")
def jobs_list(config_path: str | None, limit: int, as_json: bool) -> None:
    """Jobs, newest first."""


    reply = _call(_socket(config_path), "jobs.list", limit=limit)
    click.echo(json.dumps(reply["jobs"], indent=2) if as_json else "\n".join(render.table(reply["jobs"])))


@jobs_group.command(name="show")
@_CONFIG_OPTION
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON record.")
def jobs_show(config_path: str | None, job_id: str, as_json: bool) -> None:
    """One job: state, basis version, parameters, progress, result or error."""


    record = _call(_socket(config_path), "jobs.show", id=job_id)
    click.echo(json.dumps(record, indent=2) if as_json else "\n".join(render.describe(record, config_path)))


@jobs_group.command(name="cancel")
@_CONFIG_OPTION
@click.argument("job_id")
def jobs_cancel(config_path: str | None, job_id: str) -> None:
    """Cancel a queued job, or stop a running one."""
    record = _call(_socket(config_path), "jobs.cancel", id=job_id, timeout=60.0)
    click.echo(f"job {record['id']}: {record['state']}" + (f" ({record['error']})" if record["error"] else ""))


@jobs_group.command(name="logs")
@_CONFIG_OPTION
@click.argument("job_id")
@click.option("--tail", type=click.IntRange(0), default=200, show_default=True, help="Last lines to print.")
@click.option("--follow", "-f", is_flag=True, help="Print the whole log and keep printing until the job ends.")
def jobs_logs(config_path: str | None, job_id: str, tail: int, follow: bool) -> None:
    """A job's log: its stdout, stderr and logging."""
    from axis_stream.service.jobs.client import follow_log

    socket_path = _socket(config_path)
    if not follow:
        click.echo(_call(socket_path, "jobs.logs", id=job_id, tail=tail)["text"], nl=False)
        return
    try:
        for text in _guard(follow_log, socket_path, job_id):
            click.echo(text, nl=False)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


# -- the daemon -------------------------------------------------------------------------------------

@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="Config TOML, e.g. config/axis-stream.toml or /etc/axis-stream/axis-stream.toml.")
def serve(config_path: str) -> None:
    """Run the daemon: fold checkpoints dropped into the watched folder, run jobs, serve metrics."""
    from axis_stream import config
    from axis_stream.service import daemon

    raise SystemExit(daemon.serve(config.load(config_path)))


# -- the basis: fold checkpoints, inspect it, roll it back (no daemon needed) ------------------------

def _basis_options(command):
    """``--config`` and ``--basis`` (which overrides the config's <state_dir>/basis)."""
    command = click.option("--basis", "basis_dir", type=click.Path(file_okay=False),
                           help="Basis directory (default: <state_dir>/basis from the config).")(command)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="Config TOML (defaults apply without one).")(command)


def _open_basis(config_path: str | None, basis_dir: str | None):
    """The basis for reading only (no base model needed)."""
    from axis_stream import config
    from axis_stream.store.basis import Basis

    return Basis.open(basis_dir or config.load(config_path).paths.basis_dir)


def _lock_basis_state(config_path: str | None, basis_dir: str | None, command: str, hint: str):
    """The state-folder lock of the folder holding the basis (``<state_dir>``, or ``--basis``'s parent)."""
    from axis_stream import config
    from axis_stream.store.statelock import lock_state

    state_dir = Path(basis_dir).resolve().parent if basis_dir else config.load(config_path).paths.state_dir
    return lock_state(state_dir, command, hint)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@_basis_options
def fold(paths: tuple[str, ...], config_path: str | None, basis_dir: str | None) -> None:
    """Fold checkpoints (files, or Hugging Face model folders) into the basis one after another
    (creating the basis on first use)."""

    from axis_stream import config
    from axis_stream.errors import CheckpointError
    from axis_stream.store import basis

    with _lock_basis_state(config_path, basis_dir, "fold",
                           hint="drop the files into the daemon's watched folder instead"):
        target = basis.open_from_config(config.load(config_path), basis_dir, create=True)
        total, rejected = len(target.manifest["matrices"]), 0
        for path in paths:
            try:
                with click.progressbar(length=total, label=printable(Path(path).name)) as bar:
                    record = target.fold_checkpoint(path, progress=lambda done, _: bar.update(done - bar.pos))
            except CheckpointError as exc:
                rejected += 1
                click.echo(printable(f"rejected {exc} ({exc.reason})"), err=True)
                continue
            click.echo(printable(record.line()))
    if rejected:
        raise SystemExit(1)


@main.group(name="basis")
def basis_group() -> None:
    """Inspect the merged basis, its ledger of folded sources, and roll it back."""


@basis_group.command(name="show")
@click.argument("version", type=int, required=False)
@_basis_options
def basis_show(version: int | None, config_path: str | None, basis_dir: str | None) -> None:
    """Per matrix: rank, K, energy kept, and the sources' shares (VERSION: default the current).
    Before the first fold: the matrices the configured base yields and their K."""
    import tempfile

    from axis_stream import config
    from axis_stream.store.basis import CURRENT, open_from_config

    cfg = config.load(config_path)
    directory = Path(basis_dir) if basis_dir else cfg.paths.basis_dir
    if (directory / CURRENT).exists() or version is not None:
        click.echo("\n".join(render.basis_summary_lines(_open_basis(config_path, basis_dir), version)))
        return
    with tempfile.TemporaryDirectory() as tmp:  # an empty version 0 of the configured base and settings
        preview = open_from_config(cfg, Path(tmp) / "basis", create=True)
        click.echo(f"no basis in {directory} yet; the configured base and settings give:")
        click.echo("\n".join(render.basis_summary_lines(preview)[1:]))


@basis_group.command(name="history")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Sources to show.")
@click.option("--offset", type=click.IntRange(min=0), help="Sources to skip (default: show the newest).")
@_basis_options
def basis_history(limit: int, offset: int | None, config_path: str | None, basis_dir: str | None) -> None:
    """The versions on disk and a page of the ledger of the folded sources, in folding order."""

    click.echo("\n".join(render.history_lines(_open_basis(config_path, basis_dir), offset, limit)))


@basis_group.command(name="rollback")
@click.argument("version", type=int)
@_basis_options
def basis_rollback(version: int, config_path: str | None, basis_dir: str | None) -> None:
    """Make VERSION's basis current again (written as a new version) and say which sources left the
    ledger; done by the daemon through its control socket while it runs, else here."""
    from axis_stream import config
    from axis_stream.service import api

    cfg, report = config.load(config_path), None
    if basis_dir is None or Path(basis_dir).resolve() == cfg.paths.basis_dir.resolve():
        with contextlib.suppress(api.DaemonNotRunning):   # the daemon waits for a fold in progress: allow a long one
            report = api.request(cfg.paths.socket, "basis.rollback", timeout=3600.0, version=version)
    if report is None:
        from axis_stream.store.rollback import rollback

        with _lock_basis_state(config_path, basis_dir, "basis rollback",
                               hint="stop it first, or give the daemon's --config: it rolls back through its "
                                    "control socket"):
            report = rollback(_open_basis(config_path, basis_dir), version)
    click.echo("\n".join(render.rollback_lines(report)))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--workers", type=click.IntRange(min=1),
              help="Matrices folded at once; with --executor ray, shards (default: the cores).")
@click.option("--memory-budget", "memory_mib", type=click.IntRange(min=1),
              help="MiB the matrices folding at once may use (default: half the available memory).")
@click.option("--quarantine", is_flag=True, help="Move rejected files into the quarantine, as the daemon does.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: the daemon's basis, file after file; ray: a tree reduction over --workers shards on Ray.")
@click.option("--ray-address", default="local", show_default=True,
              help="With --executor ray: 'local' starts Ray here with --workers CPUs; 'auto', host:port or "
                   "ray://host:port joins a cluster (the files and the state folder on a shared file system).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config TOML (defaults apply without one).")
def backfill(paths: tuple[str, ...], workers: int | None, memory_mib: int | None, quarantine: bool, executor: str,
             ray_address: str, config_path: str | None) -> None:
    """Fold existing checkpoints (a folder: its checkpoints by name) as the daemon would; run again to resume."""
    import logging
    import sys
    import time

    from axis_stream import config
    from axis_stream.service import backfill as bf

    files = bf.checkpoint_files(paths)
    log, quiet = logging.getLogger("axis_stream"), logging.NullHandler()
    saved = log.propagate
    log.propagate = False                    # the lines come from here, not from the log (restored after:
    log.addHandler(quiet)                    # CliRunner and the tests run commands in one process)
    start = time.monotonic()
    try:
        with click.progressbar(length=len(files), label="backfill", file=sys.stderr, show_eta=True,
                               item_show_func=lambda rate: rate) as bar:
            def done(outcome) -> None:
                click.echo(printable(render.outcome_line(outcome)))
                bar.update(1, f"{(bar.pos + 1) / max(time.monotonic() - start, 1e-9) * 60:.1f} files/min")

            counts = bf.backfill(config.load(config_path), files, done, workers=workers, quarantine=quarantine,
                                 memory_budget=memory_mib * 2**20 if memory_mib else None, executor=executor,
                                 ray_address=ray_address, paths=paths)
    finally:
        log.propagate = saved
        log.removeHandler(quiet)
    click.echo(render.backfill_summary(counts, time.monotonic() - start))
    if counts["rejected"] or counts["error"]:
        raise SystemExit(1)


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config TOML naming the base model the releases were fine-tuned from.")
def convert(src: str, out: str, config_path: str | None) -> None:
    """Convert task-vector releases (SRC/<MODEL>/<Dataset>Val/finetuned.pt, heads) to safetensors in OUT."""
    from axis_stream import config
    from axis_stream.store.convert import convert_from_config

    results = convert_from_config(config.load(config_path), src, out)
    for r in results:
        click.echo(r.line())
    if not results or not all(r.ok for r in results):
        raise SystemExit(1)


@main.command(name="evaluate")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Experiment TOML (see config/experiment-tiny.toml): base, sources, targets, methods, budgets.")
def evaluate_cmd(config_path: str) -> None:
    """Run the baseline comparisons; results go to <output_dir>/results.csv (resumable) and plots/."""
    from axis_stream.experiments.evaluate.experiment import load_experiment
    from axis_stream.experiments.evaluate.runner import run_experiment

    run_experiment(load_experiment(config_path), click.echo)


# -- real offline suites: data from installed packages -----------------------------------------------

@main.group(name="data")
def data_group() -> None:
    """Build the real-data suites' task files from installed packages (no download)."""


@data_group.command(name="prepare")
@click.argument("suite", type=click.Choice(["text", "vision", "vision-ci"]))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: ~/.cache/axis-stream/suites/SUITE/data).")
def data_prepare(suite: str, out: str | None) -> None:
    """Write SUITE's task files; says which package to install when one is missing."""
    from axis_stream.experiments.suites.prepare import prepare

    paths = prepare(suite, out)
    for path in paths:
        click.echo(f"wrote {path}")
