"""``axis-stream data prepare SUITE``: build a suite's task files from the installed packages."""

from __future__ import annotations

import os
from pathlib import Path

from axis_stream.experiments.suites import SUITES, SuiteDataError, save_task


def default_root() -> Path:
    """Where suites keep data, the pretrained vision base and source checkpoints by default."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "axis-stream" / "suites"


def task_names(suite: str) -> list[str]:
    """The source/target tasks of ``suite`` (the vision suites' pretraining task not included)."""
    if suite == "text":
        from axis_stream.experiments.suites.text import POOL_TASKS, TASKS

        return list(TASKS) + list(POOL_TASKS)
    from axis_stream.experiments.suites.vision import SUITE_TASKS

    return list(SUITE_TASKS[suite]["tasks"])


def prepare(suite: str, out: Path | None = None) -> list[Path]:
    """Write every task of ``suite`` under ``out`` (default ``<root>/<suite>/data``); returns the files.

    A missing package is a ``SuiteDataError`` naming the package to install.
    """
    if suite not in SUITES:
        raise SuiteDataError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    out = Path(out) if out is not None else default_root() / suite / "data"
    if suite == "text":
        from axis_stream.experiments.suites.text import build_tasks

        tasks = build_tasks()
    else:
        from axis_stream.experiments.suites.vision import build_tasks

        tasks = build_tasks(suite)
    return [save_task(t, out) for t in tasks]
