"""The client side of jobs: loops the CLI runs over the control socket to watch a job and follow its log."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from axis_stream.service import api
from axis_stream.service.jobs.records import FINAL_STATES


def watch_job(socket_path: Path, job_id: str, interval_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """Yield job ``job_id`` (as the daemon returns it) each time its state or progress changes, until it ends."""
    seen = None
    while True:
        record = api.request(socket_path, "jobs.show", id=job_id)
        if (record["state"], record["progress"]) != seen:
            seen = (record["state"], record["progress"])
            yield record
        if record["state"] in FINAL_STATES:
            return
        time.sleep(interval_s)


def follow_log(socket_path: Path, job_id: str, interval_s: float = 0.5) -> Iterator[str]:
    """Yield the job's log text as it grows, from the start, until the job has ended and all is read."""
    offset = 0
    while True:
        reply = api.request(socket_path, "jobs.logs", id=job_id, offset=offset)
        offset = reply["offset"]
        if reply["text"]:
            yield reply["text"]
        elif reply["state"] in FINAL_STATES:
            return
        else:
            time.sleep(interval_s)
