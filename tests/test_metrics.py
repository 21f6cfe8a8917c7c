"""Metric names and values, and the /metrics, /healthz, /readyz server on a free local port."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from axis_stream.service.metrics import Metrics, MetricsServer, parse_address


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_names_follow_conventions_and_updates_show():
    m = Metrics(reject_reasons=["truncated", "duplicate"])
    m.fold_succeeded(seconds=0.7, energy_kept=0.42, when=1700000000.0)
    m.fold_succeeded(seconds=1.5, energy_kept=0.40, when=1700000100.0)
    m.fold_rejected("truncated")
    m.fold_rejected("internal_error", internal=True)
    m.basis_state(version=7, sources=2, size_bytes=12345)
    m.queue_depth.set(3)
    m.job_states({"queued": 1, "running": 2})
    m.job_finished(seconds=42.0, target="flowers", accuracy=0.875)
    s = samples(m.exposition().decode())
    assert s[("axis_stream_folds_total", (("result", "folded"),))] == 2
    assert s[("axis_stream_folds_total", (("result", "rejected"),))] == 1
    assert s[("axis_stream_folds_total", (("result", "error"),))] == 1
    assert s[("axis_stream_rejects_total", (("reason", "truncated"),))] == 1
    assert s[("axis_stream_rejects_total", (("reason", "duplicate"),))] == 0      # pre-declared
    assert s[("axis_stream_rejects_total", (("reason", "internal_error"),))] == 1
    assert s[("axis_stream_fold_duration_seconds_count", ())] == 2
    assert s[("axis_stream_fold_duration_seconds_sum", ())] == pytest.approx(2.2)
    assert s[("axis_stream_fold_duration_seconds_bucket", (("le", "1.0"),))] == 1
    assert s[("axis_stream_basis_version", ())] == 7
    assert s[("axis_stream_sources_folded", ())] == 2
    assert s[("axis_stream_basis_size_bytes", ())] == 12345
    assert s[("axis_stream_last_fold_energy_kept_ratio", ())] == pytest.approx(0.40)
    assert s[("axis_stream_last_fold_success_timestamp_seconds", ())] == 1700000100.0
    assert s[("axis_stream_watch_queue_depth", ())] == 3
    assert s[("axis_stream_jobs", (("state", "running"),))] == 2
    assert s[("axis_stream_jobs", (("state", "failed"),))] == 0
    assert s[("axis_stream_job_duration_seconds_count", ())] == 1
    assert s[("axis_stream_last_accuracy_ratio", (("target", "flowers"),))] == 0.875
    build = [k for k in s if k[0] == "axis_stream_build_info"]
    assert len(build) == 1 and dict(build[0][1])["version"]


def test_each_metrics_object_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.basis_state(1, 1, 1)
    assert samples(b.exposition().decode())[("axis_stream_basis_version", ())] == 0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_server_routes_and_readiness():
    m = Metrics()
    m.basis_state(3, 3, 100)
    ready = [False]
    server = MetricsServer("127.0.0.1:0", m, ready=lambda: ready[0]).start()
    try:
        host, port = server.address
        assert host == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        assert _get(base + "/healthz")[0] == 200
        assert _get(base + "/readyz")[0] == 503
        ready[0] = True
        assert _get(base + "/readyz")[0] == 200
        code, body = _get(base + "/metrics")
        assert code == 200 and samples(body)[("axis_stream_basis_version", ())] == 3
        assert _get(base + "/nope")[0] == 404
    finally:
        server.stop()


def test_parse_address():
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)


def test_metrics_server_caps_connections_and_drops_idle_ones():
    import socket
    import threading
    import time
    import urllib.request

    server = MetricsServer("127.0.0.1:0", Metrics(), lambda: True, max_connections=2, idle_timeout_s=0.5).start()
    try:
        host, port = server.address
        before = threading.active_count()
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(6)]
        time.sleep(0.2)
        assert threading.active_count() - before <= 2            # 6 idle clients hold at most 2 threads
        closed = 0
        for s in idle:
            s.settimeout(3)
            closed += s.recv(1) == b""                            # beyond the cap at once, the rest when idle
        assert closed == 6
        for s in idle:
            s.close()
        time.sleep(0.1)
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as r:
            assert r.status == 200                               # a scraper still gets in
    finally:
        server.stop()
