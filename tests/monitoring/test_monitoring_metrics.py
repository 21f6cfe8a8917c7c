"""The two metric additions the alerts need: axis_stream_ready (as /readyz) and the state dir's disk space."""

from __future__ import annotations

import math
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from axis_stream.service.metrics import Metrics, MetricsServer


def samples(m: Metrics) -> dict[str, float]:
    """Unlabelled samples of ``m`` by name."""
    return {s.name: s.value for fam in text_string_to_metric_families(m.exposition().decode())
            for s in fam.samples if not s.labels}


def test_ready_gauge_follows_readyz():
    m = Metrics()
    ready = [False]
    server = MetricsServer("127.0.0.1:0", m, ready=lambda: ready[0]).start()
    try:
        url = f"http://127.0.0.1:{server.address[1]}"
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            assert "axis_stream_ready 0.0" in r.read().decode()
        try:
            urllib.request.urlopen(url + "/readyz", timeout=5)
            raise AssertionError("/readyz answered 200 before ready")
        except urllib.error.HTTPError as e:
            assert e.code == 503
        ready[0] = True
        assert samples(m)["axis_stream_ready"] == 1.0
        with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
            assert r.status == 200
        ready[0] = False                          # the daemon's close() sets ready back to False
        assert samples(m)["axis_stream_ready"] == 0.0
    finally:
        server.stop()


def test_state_dir_disk_gauges_are_read_at_scrape_time(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    s = samples(Metrics(state_dir=state))
    usage = shutil.disk_usage(state)
    assert s["axis_stream_state_dir_size_bytes"] == usage.total
    assert 0 < s["axis_stream_state_dir_free_bytes"] <= s["axis_stream_state_dir_size_bytes"]
    assert abs(s["axis_stream_state_dir_free_bytes"] - usage.free) < 0.05 * usage.total   # other writers
    state.rmdir()                                 # an unreadable state dir gives NaN, never a failed scrape
    s = samples(Metrics(state_dir=state))
    assert math.isnan(s["axis_stream_state_dir_free_bytes"]) and math.isnan(s["axis_stream_state_dir_size_bytes"])


def test_no_disk_gauges_without_a_state_dir():
    s = samples(Metrics())
    assert "axis_stream_state_dir_free_bytes" not in s and "axis_stream_state_dir_size_bytes" not in s
