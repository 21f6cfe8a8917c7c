"""End to end: the real daemon (`axis-stream serve`) scraped by a real Prometheus every second, with
alerts.yml and rules.yml loaded; one good and one truncated checkpoint dropped into the watched folder
show up through Prometheus's query API, the rules evaluate cleanly, and the dashboard renders with data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import finetuned_like
from monitoring_helpers import (
    ALERTS,
    PROMETHEUS,
    RULES,
    Prometheus,
    dashboard_exprs,
    exported_names,
    metric_names,
    render_module,
    rules_of,
    wait_for,
)
from safetensors.torch import save_file
from test_daemon import drop, free_port, http, read_log, start, stop, write_config

from axis_stream import config

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed "
                                "(apt-get install prometheus)")


@pytest.fixture
def daemon(tiny_base, tmp_path):
    """A running `axis-stream serve` on a temporary config; SIGTERM (then SIGKILL) at teardown."""
    base_cfg, base = tiny_base
    cfg_path = write_config(tmp_path, base_cfg)
    cfg = config.load(cfg_path, env={})
    proc = start(cfg_path)
    try:
        yield proc, cfg, base
    finally:
        if proc.poll() is None:
            stop(proc)


@pytest.fixture
def prometheus(daemon, tmp_path):
    """A real Prometheus scraping the daemon; stopped at teardown."""
    _, cfg, _ = daemon
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prom = Prometheus(workdir, [cfg.metrics.address], free_port())
    try:
        yield prom
    finally:
        prom.stop()


def test_prometheus_sees_a_fold_and_a_reject_and_the_rules_evaluate(daemon, prometheus, tmp_path):
    proc, cfg, base = daemon
    procs = (proc, prometheus.proc)
    staging = tmp_path / "staging"
    staging.mkdir()
    good = staging / "good.safetensors"
    save_file(finetuned_like(base, 1), good)
    bad = staging / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    try:
        wait_for(prometheus.ready, 60, "prometheus /-/ready", procs)
        # scraped and ready (axis_stream_ready is what /readyz says), before anything arrives
        wait_for(lambda: prometheus.value('up{job="axis-stream"}') == 1
                 and prometheus.value('axis_stream_ready{job="axis-stream"}') == 1, 90, "up and ready", procs)
        assert prometheus.value('axis_stream_folds_total{job="axis-stream", result="folded"}') == 0
        assert prometheus.value('axis_stream_rejects_total{job="axis-stream", reason="truncated"}') == 0
        assert prometheus.value('axis_stream_state_dir_free_bytes{job="axis-stream"}') > 0

        drop(good, cfg.paths.watch_dir)
        drop(bad, cfg.paths.watch_dir)
        wait_for(lambda: prometheus.value('axis_stream_folds_total{job="axis-stream", result="folded"}') == 1
                 and prometheus.value('axis_stream_rejects_total{job="axis-stream", reason="truncated"}') == 1,
                 90, "the fold and the reject in Prometheus", procs)
        assert prometheus.value('axis_stream_folds_total{job="axis-stream", result="rejected"}') == 1
        assert prometheus.value('axis_stream_sources_folded{job="axis-stream"}') == 1
        assert prometheus.value('axis_stream_basis_version{job="axis-stream"}') >= 1
        assert prometheus.value('axis_stream_fold_duration_seconds_count{job="axis-stream"}') == 1
        assert 0 < prometheus.value('axis_stream_last_fold_energy_kept_ratio{job="axis-stream"}') <= 1
        assert abs(prometheus.value('time() - axis_stream_last_fold_success_timestamp_seconds'
                                    '{job="axis-stream"}')) < 120
        # the recorded series see the same (evaluated every second here)
        wait_for(lambda: (prometheus.value('instance_result:axis_stream_folds:rate5m{result="folded"}') or 0) > 0,
                 60, "the recording rule's fold rate", procs)

        # every rule of both files is loaded and has evaluated without an error; nothing fires
        def rules() -> list[dict] | None:
            body = prometheus.get("/api/v1/rules")
            found = [r for g in body["data"]["groups"] for r in g["rules"]] if body else []
            return found if found and all(r["health"] != "unknown" for r in found) else None

        loaded = wait_for(rules, 60, "every rule evaluated once", procs)
        assert sorted(r["name"] for r in loaded) == sorted(r.get("alert") or r["record"]
                                                           for r in rules_of(ALERTS) + rules_of(RULES))
        assert [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []
        assert prometheus.query('ALERTS{alertstate="firing"}') == {}

        # every metric the rules and the dashboard read is in the real daemon's /metrics
        status, text = http(cfg, "/metrics")
        assert status == 200
        used = set().union(*(metric_names(e) for e in dashboard_exprs()),
                           *(metric_names(r["expr"]) for r in rules_of(ALERTS) + rules_of(RULES)))
        assert used and used <= exported_names(text), used - exported_names(text)

        # the dashboard, drawn from this Prometheus: the fold and the reject are on it
        render = render_module()
        end = time.time()
        variables = {"job": "axis-stream", "instance": ".*", "__rate_interval": "4s", "__interval": "1s"}
        results = render.fetch(render.load_dashboard(), prometheus.url, end - 120, end, 1, variables)
        counts = render.render(render.load_dashboard(), results, tmp_path / "dashboard.png")
        for title in ("Folds per minute by result", "Fold latency (histogram)", "Rejects by reason",
                      "Basis version and sources folded", "Watch queue depth", "Adaptation jobs by state"):
            assert counts[title] > 0, (title, counts)
        assert counts["Last accuracy per target"] == 0          # no adaptation job ran
        rejects = results["panels"][str(_panel_id("Rejects by reason"))][0]["series"]
        assert [s["metric"]["reason"] for s in rejects] == ["truncated"]
        assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- daemon log:\n{read_log(proc)}\n--- prometheus log:\n"
                             f"{prometheus.log_tail()}") from None


def _panel_id(title: str) -> int:
    from monitoring_helpers import DASHBOARD

    (pid,) = [p["id"] for p in json.loads(Path(DASHBOARD).read_text())["panels"] if p["title"] == title]
    return pid
