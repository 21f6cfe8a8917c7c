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
