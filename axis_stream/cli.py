"""The ``axis-stream`` command line: parse, call one function, print."""

from __future__ import annotations

import click

from axis_stream import __version__


@click.group()
@click.version_option(__version__, prog_name="axis-stream")
def main() -> None:
    """Fold fine-tuned checkpoints into one AXIS merged basis and adapt it to new tasks."""


@main.command()
def quickstart() -> None:
    """Run the main job on an embedded default and print what happened."""
    from axis_stream.quickstart import fold_summary

    for line in fold_summary():
        click.echo(line)


# -- jobs and the control socket: these commands talk to a running `axis-stream serve` ---------------

_CONFIG_OPTION = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                              help="Config TOML (defaults apply without one); names the daemon's control socket.")


def _socket(config_path: str | None):
    """The control socket of the daemon that ``config_path`` describes."""
    from axis_stream import config
    from axis_stream.errors import AxisError

    try:
        return config.load(config_path).paths.socket
    except AxisError as exc:
        raise click.ClickException(str(exc)) from None


def _call(socket_path, op: str, hint: str = "start `axis-stream serve`", **args):
    """One control request; no daemon -> one line and exit 2, a refusal -> "Error: ..." and exit 1."""
    from axis_stream import api
    from axis_stream.errors import AxisError

    try:
        return api.request(socket_path, op, **args)
    except api.DaemonNotRunning as exc:
        click.echo(f"{exc}; {hint}", err=True)
        raise SystemExit(2) from None
    except AxisError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON reply.")
def status(config_path: str | None, as_json: bool) -> None:
    """Show the running daemon's status."""
    import json

    reply = _call(_socket(config_path), "status")
    click.echo(json.dumps(reply, indent=2) if as_json else "\n".join(_mapping_lines(reply)))


def _mapping_lines(value, indent: str = "") -> list[str]:
    """Nested dicts as indented "key: value" lines."""
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{indent}{key}:")
            lines.extend(_mapping_lines(item, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {item}")
    return lines


@main.command()
@_CONFIG_OPTION
@click.option("--target", required=True, help="Dataset to adapt to, e.g. flowers102, or imagefolder:PATH.")
@click.option("--n-fraction", type=float, help="Trained top-N singular values per matrix, fraction of min(m, n).")
@click.option("--epochs", type=int, help="Training epochs.")
@click.option("--lr", type=float, help="Learning rate.")
@click.option("--batch-size", type=int, help="Batch size.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--data-root", type=click.Path(file_okay=False), help="Root folder of the datasets.")
@click.option("--wait", is_flag=True, help="Print progress until the job ends, then its result.")
def adapt(config_path: str | None, target: str, n_fraction: float | None, epochs: int | None, lr: float | None,
          batch_size: int | None, seed: int | None, data_root: str | None, wait: bool) -> None:
    """Queue a Stage 2 adaptation of the current basis to TARGET on the daemon."""
    from pathlib import Path

    from axis_stream import jobs

    socket_path = _socket(config_path)
    given = {"target": target, "n_fraction": n_fraction, "epochs": epochs, "lr": lr, "batch_size": batch_size,
             "seed": seed, "data_root": str(Path(data_root).resolve()) if data_root else None}
    record = _call(socket_path, "adapt", hint="start `axis-stream serve` or rerun with --local",
                   **{k: v for k, v in given.items() if v is not None})
    click.echo(f"queued job {record['id']}: adapt {target}")
    if not wait:
        click.echo(f"follow it with `axis-stream jobs show {record['id']}` "
                   f"or `axis-stream jobs logs --follow {record['id']}`")
        return
    try:
        for record in _guard(jobs.watch_job, socket_path, record["id"]):
            click.echo(jobs.update_line(record))
    except KeyboardInterrupt:
        click.echo(f"\nstopped waiting; job {record['id']} keeps running (`axis-stream jobs cancel {record['id']}` "
                   "stops it)", err=True)
        raise SystemExit(130) from None
    click.echo("\n".join(jobs.describe(record)))
    if record["state"] != "succeeded":
        raise SystemExit(1)


def _guard(generator, *args):
    """Iterate a client-side generator, turning control-API failures into a clean CLI exit."""
    from axis_stream import api
    from axis_stream.errors import AxisError

    try:
        yield from generator(*args)
    except api.DaemonNotRunning as exc:
        click.echo(f"{exc} (did it stop?)", err=True)
        raise SystemExit(2) from None
    except AxisError as exc:
        raise click.ClickException(str(exc)) from None


@main.group(name="jobs")
def jobs_group() -> None:
    """List, inspect, cancel and read the logs of adaptation jobs on the daemon."""


@jobs_group.command(name="list")
@_CONFIG_OPTION
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Newest jobs to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON reply.")
def jobs_list(config_path: str | None, limit: int, as_json: bool) -> None:
    """Jobs, newest first."""
    import json

    from axis_stream import jobs

    reply = _call(_socket(config_path), "jobs.list", limit=limit)
    click.echo(json.dumps(reply["jobs"], indent=2) if as_json else "\n".join(jobs.table(reply["jobs"])))


@jobs_group.command(name="show")
@_CONFIG_OPTION
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON record.")
def jobs_show(config_path: str | None, job_id: str, as_json: bool) -> None:
    """One job: state, basis version, parameters, progress, result or error."""
    import json

    from axis_stream import jobs

    record = _call(_socket(config_path), "jobs.show", id=job_id)
    click.echo(json.dumps(record, indent=2) if as_json else "\n".join(jobs.describe(record)))


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
    from axis_stream import jobs

    socket_path = _socket(config_path)
    if not follow:
        click.echo(_call(socket_path, "jobs.logs", id=job_id, tail=tail)["text"], nl=False)
        return
    try:
        for text in _guard(jobs.follow_log, socket_path, job_id):
            click.echo(text, nl=False)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


# -- the daemon -------------------------------------------------------------------------------------

@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="Config TOML, e.g. config/axis-stream.toml or /etc/axis-stream/axis-stream.toml.")
def serve(config_path: str) -> None:
    """Run the daemon: fold checkpoints dropped into the watched folder, run jobs, serve metrics."""
    from axis_stream import config, daemon
    from axis_stream.errors import AxisError

    try:
        raise SystemExit(daemon.serve(config.load(config_path)))
    except AxisError as exc:
        raise click.ClickException(str(exc)) from None

