"""Where adaptation jobs and evaluation runs execute: on this machine (``local``) or on a Ray cluster (``ray``).

The local executor is the default and lives where it always did: ``jobs.JobRunner`` runs each job
in a spawned child process, ``evaluate`` runs each run in its own process. With ``executor = "ray"``
the same work is submitted as Ray tasks to an existing cluster (``ray.init(address=...)``), each
requesting ``ray.num_gpus`` GPUs; the daemon (or ``axis-stream evaluate``) stays the only writer of
job records and CSV rows, and writes them once, from the task's final result. Ray retries a task
whose worker process or node was lost up to ``ray.max_retries`` times (an exception raised by the
job itself is not retried: it would fail again), and ``ray.cancel(force=True)`` stops a cancelled one.

What travels: the job's parameters and the config go with the task; progress, log text and the
worker's pid come back through one small actor (``_Inbox``) that the daemon drains every 0.2 s.
Workers read the pinned basis version from the daemon's own path (a shared filesystem), or, with
``ray.ship_basis``, from the version's files put once into the object store (a version is small
and immutable) and unpacked once per node; the job's output files then come back with its result.
Ray is an optional dependency (``pip install 'axis-stream[ray]'``), imported only here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from axis_stream.cluster import connect
from axis_stream.config import Config
from axis_stream.errors import AxisError, first_line
from axis_stream.service.api import one_line
from axis_stream.service.jobs.kinds import JobContext
from axis_stream.service.jobs.process import call_job, redirect_output
from axis_stream.store.atomic import atomic_write_bytes
from axis_stream.store.basis import CURRENT, MANIFEST, VERSIONS

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

POLL_S = 0.2                  # how often the daemon drains progress and log text and checks for a cancel
LOG_RELAY_S = 0.5             # how often a worker sends the new text of its job log
SHIPPED_VERSIONS = 2          # basis versions the daemon keeps in the object store at once
Message = Callable[[str, Any], None]


# --- the daemon's jobs ---

@dataclass(frozen=True)
class JobTask:
    """One job as a Ray task gets it: what ``jobs._child_main`` gets, less the pipe and the parent."""

    spec: str                        # "module:function" (jobs.JOB_KINDS)
    params: dict[str, Any]
    job_id: str
    config: Config
    basis_dir: Path
    basis_version: int | None
    out_dir: Path
    log_path: Path


class _Inbox:
    """A Ray actor: each job's messages from its worker, in order, until the daemon takes them."""

    def __init__(self) -> None:
        self.boxes: dict[str, list[tuple[str, Any]]] = {}

    def put(self, job_id: str, kind: str, payload: Any) -> None:
        self.boxes.setdefault(job_id, []).append((kind, payload))

    def take(self, job_id: str) -> list[tuple[str, Any]]:
        return self.boxes.pop(job_id, [])


class RayJobs:
    """The ``ray`` executor of ``jobs.JobRunner``: runs one job as a Ray task and relays what it reports."""

    def __init__(self, config: Config):
        self.settings = config.scheduler.ray
        self.ray = connect(self.settings, "scheduler.executor")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(), soft=True)
        self._inbox = self.ray.remote(num_cpus=0, scheduling_strategy=here)(_Inbox).remote()   # on the daemon's node
        # max_calls=1: a fresh worker process per job (GPU memory released, no state left from the last job)
        self._task = self.ray.remote(num_gpus=self.settings.num_gpus, num_cpus=self.settings.num_cpus,
                                     max_retries=self.settings.max_retries, retry_exceptions=False,
                                     max_calls=1)(_run_job)
        self._shipped: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def run(self, task: JobTask, stop: threading.Event, on_message: Message, on_pid: Callable[[int], None]) -> None:
        """Run ``task`` to its end, cancelling it once ``stop`` is set.

        ``on_message(kind, payload)`` gets ``progress`` reports as they come, then ``result`` or
        ``error`` (nothing after a cancel); ``on_pid`` the worker's pid at each attempt's start.
        """
        ray = self.ray
        shipped = self._basis_ref(task) if self.settings.ship_basis and task.basis_version is not None else None
        ref = self._task.options(name=f"axis-job-{task.job_id}").remote(self._inbox, task, shipped,
                                                                          self.settings.ship_basis)
        attempts, cancelled = 0, False
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            attempts = self._drain(task, on_message, on_pid, attempts)
            if stop.is_set() and not cancelled:
                ray.cancel(ref, force=True)
                cancelled = True
            if ready:
                break
        attempts = self._drain(task, on_message, on_pid, attempts)   # the worker put its last ones before returning
        try:
            outcome = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return
        except ray.exceptions.RayTaskError as exc:        # the wrapper itself failed (e.g. an unpicklable result)
            on_message("error", one_line(f"the Ray task failed: {first_line(exc.cause or exc, limit=None)}"))
            return
        except ray.exceptions.RayError as exc:            # worker process or node lost, retries used up
            if not cancelled:
                on_message("error", one_line(
                    f"the Ray worker running the job was lost ({attempts} attempt(s), "
                    f"scheduler.ray.max_retries = {self.settings.max_retries}): {type(exc).__name__}: "
                    f"{first_line(exc, limit=None)}"))
            return
        for name, data in outcome["files"].items():
            atomic_write_bytes(task.out_dir / name, data)
        on_message(*outcome["message"])

    def _drain(self, task: JobTask, on_message: Message, on_pid: Callable[[int], None], attempts: int) -> int:
        """Hand the worker's messages on: progress to ``on_message``, log text to the job log.

        Returns ``attempts`` plus the attempts that started since (Ray's retries after a lost worker).
        """
        for kind, payload in self.ray.get(self._inbox.take.remote(task.job_id)):
            if kind == "started":
                attempts += 1
                on_pid(payload["pid"])
                _append(task.log_path, f"axis-stream: attempt {attempts} of {1 + self.settings.max_retries} "
                                       f"started on Ray node {payload['node']} (pid {payload['pid']})\n")
            elif kind == "log":
                _append(task.log_path, payload)
            else:
                on_message(kind, payload)
        return attempts

    def _basis_ref(self, task: JobTask):
        """The pinned version's files in the object store, put once per version."""
        key = (str(task.basis_dir), task.basis_version)
        with self._lock:
            if key not in self._shipped:
                self._shipped[key] = self.ray.put(basis_files(task.basis_dir, task.basis_version))
                while len(self._shipped) > SHIPPED_VERSIONS:
                    del self._shipped[next(iter(self._shipped))]
            return self._shipped[key]


def basis_files(basis_dir: Path, version: int) -> dict[str, bytes]:
    """A basis version's files (factors, means, manifest) by name: what ``ship_basis`` sends to workers."""
    folder = Path(basis_dir) / VERSIONS / f"v{version:06d}"
    if not folder.is_dir():
        raise AxisError(f"{folder}: basis version {version} is gone (pruned?); cannot ship it to the workers")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def unpack_basis(files: dict[str, bytes], version: int, root: Path | None = None) -> Path:
    """A basis directory holding only ``version`` (made current), built once per node from shipped files.

    It lives under ``root`` (default: the system temporary folder) in a folder named by the
    manifest's hash, written under a temporary name and renamed, so concurrent workers agree.
    """
    root = Path(root or tempfile.gettempdir()) / "axis-stream-basis"
    target = root / f"{hashlib.sha256(files[MANIFEST]).hexdigest()[:20]}-v{version:06d}"
    if (target / CURRENT).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        folder = tmp / VERSIONS / f"v{version:06d}"
        folder.mkdir(parents=True)
        for name, data in files.items():
            atomic_write_bytes(folder / name, data)
        atomic_write_bytes(tmp / CURRENT, f"v{version:06d}\n".encode())
        os.rename(tmp, target)
    except OSError:
        if not (target / CURRENT).exists():      # not a lost race with another worker: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _run_job(inbox, task: JobTask, shipped: dict[str, bytes] | None, return_files: bool) -> dict[str, Any]:
    """The Ray task (in a fresh worker process): run the job function, relaying progress and its log.

    ``shipped`` is the pinned basis version's files (None: read ``task.basis_dir`` in place). Returns
    ``{"message": ("result", dict) | ("error", line), "files": {name: bytes}}``; with ``return_files``
    the job writes into a scratch folder on this node, and its files come back (no shared filesystem).
    """
    import ray


    def send(kind: str, payload: Any) -> None:
        inbox.put.remote(task.job_id, kind, payload)

    send("started", {"pid": os.getpid(), "node": ray.util.get_node_ip_address()})
    scratch = Path(tempfile.mkdtemp(prefix=f"axis-job-{task.job_id}-"))
    try:
        log_file = scratch / "job.log"
        redirect_output(log_file, task.config.log.level)
        relay = _LogRelay(log_file, lambda text: send("log", text))
        out_dir = scratch / "out" if return_files else task.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        basis_dir = unpack_basis(shipped, task.basis_version) if shipped is not None else task.basis_dir
        ctx = JobContext(job_id=task.job_id, config=task.config, basis_dir=basis_dir,
                         basis_version=task.basis_version, out_dir=out_dir, progress=lambda r: send("progress", r))
        message = call_job(task.spec, task.params, ctx)
        relay.stop()
        files = ({p.relative_to(out_dir).as_posix(): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}
                 if return_files else {})
        ray.get(inbox.put.remote(task.job_id, "log", ""))  # every message sent before is in the inbox now
        return {"message": message, "files": files}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _LogRelay:
    """Sends the text appended to a file every ``LOG_RELAY_S`` seconds, and the rest when stopped."""

    def __init__(self, path: Path, send: Callable[[str], None]):
        self.path, self.send = path, send
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="axis-log-relay", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(LOG_RELAY_S):
            self._flush()

    def _flush(self) -> None:
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        if data:
            self._offset += len(data)
            self.send(data.decode(errors="replace"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        sys.stdout.flush()
        sys.stderr.flush()
        self._flush()


def _append(path: Path, text: str) -> None:
    if text:
        try:
            with path.open("a") as fh:
                fh.write(text)
        except OSError as exc:
            log.warning("%s: cannot append the job's log text: %s", path, exc.strerror)
