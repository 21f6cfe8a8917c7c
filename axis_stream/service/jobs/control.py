"""The jobs' control-API operations, served by the daemon's job runner."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from axis_stream.service.api import RequestError, arg
from axis_stream.service.jobs.kinds import adapt_request
from axis_stream.service.jobs.runner import JobRunner

log = logging.getLogger(__name__)


def handlers(runner: JobRunner) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    """The control-API ops served by the job runner: adapt, jobs.list, jobs.show, jobs.cancel, jobs.logs."""

    def adapt(args: dict[str, Any]) -> dict[str, Any]:
        return runner.get(runner.submit("adapt", adapt_request(args, runner.config))).to_dict()

    def jobs_list(args: dict[str, Any]) -> dict[str, Any]:
        limit = arg(args, "limit", int, 50)
        if not 1 <= limit <= 10_000:
            raise RequestError(f"limit must be between 1 and 10000, got {limit}")
        return {"jobs": [r.to_dict() for r in runner.list(limit=limit)]}

    def jobs_show(args: dict[str, Any]) -> dict[str, Any]:
        return runner.get(arg(args, "id", str)).to_dict()

    def jobs_cancel(args: dict[str, Any]) -> dict[str, Any]:
        return runner.cancel(arg(args, "id", str)).to_dict()

    def jobs_logs(args: dict[str, Any]) -> dict[str, Any]:
        """``tail`` lines, or with ``offset`` the text from that byte on (for following)."""
        job_id, offset = arg(args, "id", str), arg(args, "offset", int, None)
        state = runner.get(job_id).state
        if offset is None:
            return {"id": job_id, "state": state, "text": runner.logs(job_id, tail=arg(args, "tail", int, 200))}
        if offset < 0:
            raise RequestError(f"offset must be >= 0, got {offset}")
        text, offset = runner.log_chunk(job_id, offset)
        return {"id": job_id, "state": state, "text": text, "offset": offset}

    return {"adapt": adapt, "jobs.list": jobs_list, "jobs.show": jobs_show, "jobs.cancel": jobs_cancel,
            "jobs.logs": jobs_logs}
