"""The alert and recording rules, the example scrape config and the dashboard: promtool's checks and
unit tests (every alert fires on a bad series and stays silent on healthy ones, and each alert's test
fails when the alert is broken), the conventions, and that they read only metrics the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from monitoring_helpers import (
    ALERTS,
    DASHBOARD,
    JOB,
    MONITORING,
    PROMTOOL,
    RULES,
    SCRAPE_CONFIG,
    UNIT_TESTS,
    dashboard_exprs,
    exported_names,
    metric_names,
    render_module,
    rules_of,
)

from axis_stream.service.daemon import REJECT_REASONS
from axis_stream.service.metrics import Metrics

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run promtool with ``args``; its completed process (output captured)."""
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@needs_promtool
def test_promtool_checks_the_rules_and_the_scrape_config():
    for path in (ALERTS, RULES):
        r = promtool("check", "rules", str(path))
        assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules_of(ALERTS))} rules found" in promtool("check", "rules", str(ALERTS)).stdout
    r = promtool("check", "config", str(SCRAPE_CONFIG))      # also checks the two rule files it names
    assert r.returncode == 0 and "2 rule files found" in r.stdout, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    r = promtool("test", "rules", str(UNIT_TESTS))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    cases = [case for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in group["alert_rule_test"]]
    for name in [r["alert"] for r in rules_of(ALERTS)]:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no test where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no test where it stays silent"
        fired = {lab.get("instance", "") for c in mine for a in c.get("exp_alerts") or [] for lab in [a["exp_labels"]]}
        assert all("ok" not in i for i in fired), f"{name}: a healthy instance is expected to fire: {fired}"


def _mutated(tmp: Path, name: str, expr: str) -> Path:
    """A copy of alerts.yml (beside a copy of the unit tests) with alert ``name``'s expression replaced."""
    doc = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == name]
    rule["expr"] = expr
    (tmp / "tests").mkdir(parents=True)
    (tmp / "alerts.yml").write_text(yaml.safe_dump(doc))
    shutil.copy(UNIT_TESTS, tmp / "tests" / "alerts_test.yml")
    return tmp / "tests" / "alerts_test.yml"


@needs_promtool
def test_the_unit_tests_catch_each_alert_never_firing_or_always_firing(tmp_path):
    """Mutation check: an alert that can never fire, or that always fires, fails its unit tests."""
    names = [r["alert"] for r in rules_of(ALERTS)]
    jobs = [(n, kind, e) for n in names
            for kind, e in (("never", 'vector(1) == 2'), ("always", f'up{{{JOB}}} > -1 or vector(1)'))]

    def run(job: tuple[str, str, str]) -> tuple[str, str, int, str]:
        name, kind, expr = job
        path = _mutated(tmp_path / f"{name}-{kind}", name, expr)
        r = promtool("test", "rules", str(path))
        return name, kind, r.returncode, r.stdout + r.stderr

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, jobs))
    survived = [(n, k) for n, k, rc, _ in results if rc == 0]
    assert survived == [], f"these broken alerts still pass the unit tests: {survived}"
    for name, kind, _, out in results:
        assert f"alertname: {name}," in out, (name, kind, out[-2000:])          # failed where it should


def test_alerts_follow_the_conventions():
    readme = (MONITORING / "README.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)}
    names = []
    for rule in rules_of(ALERTS):
        name = rule["alert"]
        names.append(name)
        assert re.fullmatch(r"AxisStream[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        ann = rule["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, name
        assert ann["runbook_url"] == f"monitoring/README.md#{name.lower()}", name
        assert name.lower() in anchors, f"{name}: no section in monitoring/README.md"
        assert not ann["summary"].endswith(" ") and len(ann["summary"]) < 120, name
    assert len(names) == len(set(names))
    for rule in rules_of(RULES):
        assert re.fullmatch(r"[a-z_]+:axis_stream_[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_every_selector_carries_the_one_job_selector():
    """So that one `sed` changes the job everywhere: each axis_stream_* and `up` selector names it."""
    for path in (ALERTS, RULES):
        for rule in rules_of(path):
            expr = rule["expr"]
            selectors = re.findall(r"\b(up|axis_stream_[a-z_]+)\b(\{[^}]*\})?", expr)
            assert selectors, rule
            for name, labels in selectors:
                assert JOB in labels, f"{path.name}: {name} without {JOB} in {expr}"
            assert len(re.findall(r'job\s*=~?\s*"', expr)) == len(selectors), expr     # no other job matcher
    for expr in dashboard_exprs():
        for name, labels in re.findall(r"\b(axis_stream_[a-z_]+|up)\b(\{[^}]*\})?", expr):
            assert 'job="$job"' in labels, f"dashboard: {name} without job=\"$job\" in {expr}"


def test_rules_and_dashboard_read_only_metrics_the_daemon_exports(tmp_path):
    m = Metrics(REJECT_REASONS, state_dir=tmp_path)
    m.job_finished(1.0, "t", 0.5)
    exported = exported_names(m.exposition().decode())
    for source, exprs in (("alerts.yml", [r["expr"] for r in rules_of(ALERTS)]),
                          ("rules.yml", [r["expr"] for r in rules_of(RULES)]), ("dashboard.json", dashboard_exprs())):
        used = set().union(*(metric_names(e) for e in exprs))
        assert used, source
        assert used <= exported, f"{source} reads metrics the daemon does not export: {sorted(used - exported)}"
    assert not any(":" in t for e in dashboard_exprs() for t in re.findall(r"[a-z_]+:[a-z_:0-9]+", e)), \
        "the dashboard must not need the recording rules"
    # and the check itself can fail
    assert not metric_names("rate(axis_stream_no_such_total[5m])") <= exported


def test_dashboard_has_the_operator_panels_and_a_sane_layout():
    dash = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dash["panels"]]
    for wanted in ("Folds per minute by result", "Fold latency (histogram)", "Fold latency p50 / p95",
                   "Watch queue depth", "Basis version and sources folded", "Rejects by reason",
                   "Adaptation jobs by state", "Last accuracy per target"):
        assert wanted in titles
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job", "instance"}
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
    (heatmap,) = [p for p in dash["panels"] if p["type"] == "heatmap"]
    assert "axis_stream_fold_duration_seconds_bucket" in heatmap["targets"][0]["expr"]
    assert heatmap["targets"][0]["format"] == "heatmap"


SAMPLE = MONITORING / "tests" / "sample_range.json"


def test_render_dashboard_draws_a_saved_run(tmp_path):
    """The script on range-query results saved from a real run (daemon, folds, rejects, a failed job)."""
    out = tmp_path / "dash.png"
    r = subprocess.run([sys.executable, str(MONITORING / "render_dashboard.py"), "--load", str(SAMPLE), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000
    render = render_module()
    counts = render.render(render.load_dashboard(), json.loads(SAMPLE.read_text()), tmp_path / "again.png")
    assert set(counts) == {p["title"] for p in render.load_dashboard()["panels"]}
    assert counts["Folds per minute by result"] >= 2 and counts["Rejects by reason"] >= 2
    assert f"{len(counts)} panels, {sum(1 for n in counts.values() if n)} with data" in r.stdout


def test_render_helpers():
    render = render_module()
    assert render.parse_duration("1h30m") == 5400 and render.parse_duration("15s") == 15
    with pytest.raises(ValueError):
        render.parse_duration("15 minutes")
    assert render.substitute('x{job="$job", i=~"${instance}"}[$__rate_interval]',
                             {"job": "a", "instance": ".*", "__rate_interval": "1m"}) == 'x{job="a", i=~".*"}[1m]'
    assert render.format_value(0.256, "percentunit") == "25.6%"
    assert render.format_value(3 * 1024 ** 3, "bytes") == "3.0 GiB"
    assert render.format_value(90, "s") == "1.5 min"
    assert render.legend("{{reason}}", {"reason": "truncated"}) == "truncated"
