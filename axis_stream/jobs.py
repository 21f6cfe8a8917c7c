"""Adaptation jobs: what a job function receives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from axis_stream.config import Config


@dataclass
class JobContext:
    """Everything a job function gets besides its parameters; it runs in a child process."""

    job_id: str
    config: Config
    basis_dir: Path
    basis_version: int                       # pinned when the job started
    out_dir: Path                            # the job's own folder under <state_dir>/jobs/<id>
    progress: Callable[[dict[str, Any]], None]   # report e.g. {"epoch": 1, "step": 10, "of": 100, "loss": 0.3}
