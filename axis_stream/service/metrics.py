"""Prometheus metrics of the daemon and the small HTTP server for /metrics, /healthz and /readyz.

All metrics live in a private ``CollectorRegistry`` owned by ``Metrics`` (never the global one, so
tests and an in-process quickstart can build several). Names follow Prometheus conventions: base
units, ``_total`` on counters (added by prometheus_client on export), ``_seconds``, ``_bytes``,
``_ratio``. Job processes report back to the daemon, which is the only process that exports.
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from axis_stream import __version__

log = logging.getLogger(__name__)

FOLD_RESULTS = ("folded", "rejected", "error")
RETRY_CAUSES = ("no_space", "environment", "basis", "source_changed")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class Metrics:
    """Every metric the daemon exports, in one private registry, with small methods to update them."""

    def __init__(self, reject_reasons: Iterable[str] = (), state_dir: Path | None = None):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.folds = Counter("axis_stream_folds", "Checkpoints taken off the fold queue, by result "
                             "(folded, rejected into quarantine, error: an internal failure).",
                             ["result"], registry=r)
        self.rejects = Counter("axis_stream_rejects", "Checkpoints moved to quarantine, by reason.",
                               ["reason"], registry=r)
        self.fold_duration = Histogram(
            "axis_stream_fold_duration_seconds", "Time to fold one checkpoint until its basis version is durable.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.retries = Counter("axis_stream_fold_retries", "Folds that failed for a reason outside the file, "
                               "which stays in the folder for a retry, by cause (no_space, environment: "
                               "another I/O error, basis, source_changed).", ["cause"], registry=r)
        self.basis_version = Gauge("axis_stream_basis_version", "Current basis version.", registry=r)
        self.sources_folded = Gauge("axis_stream_sources_folded",
                                    "Sources folded into the current basis version.", registry=r)
        self.basis_size = Gauge("axis_stream_basis_size_bytes",
                                "On-disk size of the current basis version.", registry=r)
        self.energy_kept = Gauge("axis_stream_last_fold_energy_kept_ratio",
                                 "Mean fraction of the last folded source's energy kept in the basis "
                                 "(NaN for a dense fold strategy, which keeps no components).", registry=r)
        self.last_fold_success = Gauge("axis_stream_last_fold_success_timestamp_seconds",
                                       "Unix time of the last successful fold.", registry=r)
        self.queue_depth = Gauge("axis_stream_watch_queue_depth",
                                 "Checkpoints that have arrived and wait to be folded.", registry=r)
        self.waiting = Gauge("axis_stream_watch_waiting",
                             "Entries left in the watched folder because they are incomplete (a file shorter than "
                             "its header, a model folder lacking weights), quarantined after "
                             "watch.incomplete_timeout_s.", registry=r)
        self.jobs = Gauge("axis_stream_jobs", "Adaptation jobs known to the scheduler, by state.",
                          ["state"], registry=r)
        self.job_duration = Histogram(
            "axis_stream_job_duration_seconds", "Run time of finished adaptation jobs.",
            buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800), registry=r)
        self.last_accuracy = Gauge("axis_stream_last_accuracy_ratio",
                                   "Test accuracy of the last successful adaptation, by target.",
                                   ["target"], registry=r)
        self.start_scale = Gauge("axis_stream_adapt_start_scale",
                                 "Mean scale of the start Stage 2 chose (Lambda = scale * s; 1 is the merged "
                                 "start) in the last successful adaptation, by target.", ["target"], registry=r)
        self.ready = Gauge("axis_stream_ready", "1 once the start-up scan is done (as /readyz), else 0.", registry=r)
        if state_dir is not None:       # read at scrape time; not exported without a state dir
            Gauge("axis_stream_state_dir_free_bytes", "Bytes available to unprivileged users on the "
                  "filesystem of the state dir.", registry=r).set_function(lambda: _disk_usage(state_dir)[1])
            Gauge("axis_stream_state_dir_size_bytes", "Size of the filesystem holding the state dir.",
                  registry=r).set_function(lambda: _disk_usage(state_dir)[0])
        self.build = Info("axis_stream_build", "Versions of axis-stream and its runtime.", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version(),
                         "torch": _version_of("torch"), "open_clip": _version_of("open_clip_torch")})
        for result in FOLD_RESULTS:
            self.folds.labels(result)
        for reason in reject_reasons:
            self.rejects.labels(reason)
        for cause in RETRY_CAUSES:
            self.retries.labels(cause)
        for state in JOB_STATES:
            self.jobs.labels(state)

    def fold_succeeded(self, seconds: float, energy_kept: float, when: float) -> None:
        """A checkpoint was folded and its basis version is durable."""
        self.folds.labels("folded").inc()
        self.fold_duration.observe(seconds)
        self.energy_kept.set(energy_kept)
        self.last_fold_success.set(when)

    def fold_rejected(self, reason: str, internal: bool = False) -> None:
        """A checkpoint went to quarantine; ``internal`` when the cause was a bug, not the file."""
        self.folds.labels("error" if internal else "rejected").inc()
        self.rejects.labels(reason).inc()

    def fold_failed(self, cause: str = "environment") -> None:
        """A fold failed for a reason outside the file (``cause``: disk full, permissions, ...); the file
        stays for a retry."""
        self.folds.labels("error").inc()
        self.retries.labels(cause).inc()

    def basis_state(self, version: int, sources: int, size_bytes: int) -> None:
        """The current basis version, how many sources it holds, and its size on disk."""
        self.basis_version.set(version)
        self.sources_folded.set(sources)
        self.basis_size.set(size_bytes)

    def job_states(self, counts: dict[str, int]) -> None:
        """How many jobs are in each state now."""
        for state in set(JOB_STATES) | set(counts):
            self.jobs.labels(state).set(counts.get(state, 0))

    def job_finished(self, seconds: float | None, target: str | None, accuracy: float | None,
                     start_scale: float | None = None) -> None:
        """A job ended; a successful one may carry the test accuracy of its target and the mean scale
        of the start Stage 2 chose (``result["start"]["scale"]``, :func:`start_scale_of`)."""
        if seconds is not None:
            self.job_duration.observe(seconds)
        if target and accuracy is not None:
            self.last_accuracy.labels(target).set(accuracy)
        if target and start_scale is not None:
            self.start_scale.labels(target).set(start_scale)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def start_scale_of(result: dict | None) -> float | None:
    """The chosen start's mean scale in an adapt job's result, if it records one."""
    start = (result or {}).get("start")
    return float(start["scale"]) if isinstance(start, dict) and start.get("scale") is not None else None


def _disk_usage(path: Path) -> tuple[float, float]:
    """(total, free) bytes of the filesystem holding ``path``; NaNs when it cannot be read (never fails a scrape)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return math.nan, math.nan
    return float(usage.total), float(usage.free)


def _version_of(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) into a bindable pair; config.py has validated the form."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


MAX_CONNECTIONS = 16     # connections served at once; more are closed at once (a scraper needs one)
IDLE_TIMEOUT_S = 10.0    # a connection that sends no request within this is closed


class _BoundedServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` with at most ``slots`` connections (threads) at once: one beyond them is
    closed unanswered, so idle clients cannot pile up threads."""

    slots: threading.BoundedSemaphore

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class MetricsServer:
    """/metrics, /healthz (the process answers: 200) and /readyz (200 once ``ready()``, else 503).

    A ``ThreadingHTTPServer`` bound to exactly the configured host; prometheus_client's own
    ``start_http_server`` cannot serve extra routes.
    """

    def __init__(self, address: str, metrics: Metrics, ready: Callable[[], bool], *,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout_s: float = IDLE_TIMEOUT_S):
        host, port = parse_address(address)
        metrics.ready.set_function(lambda: 1.0 if ready() else 0.0)
        handler = _handler(metrics, ready)
        handler.timeout = idle_timeout_s          # a client that sends nothing is dropped after this
        server_cls = type("_Server", (_BoundedServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
            "daemon_threads": True,
        })
        self._server = server_cls((host, port), handler)
        self._server.slots = threading.BoundedSemaphore(max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), useful when port 0 asked the kernel for a free one."""
        return self._server.server_address[:2]

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.address)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(metrics: Metrics, ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                ok = ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"starting\n")
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("metrics http: " + fmt, *args)

    return Handler
