"""Shared by the monitoring tests: where the files are, a real Prometheus server, its HTTP API, metric names."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
RULES = MONITORING / "rules.yml"
UNIT_TESTS = MONITORING / "tests" / "alerts_test.yml"
DASHBOARD = MONITORING / "dashboard.json"
SCRAPE_CONFIG = MONITORING / "prometheus.yml"
JOB = 'job="axis-stream"'

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def render_module() -> ModuleType:
    """monitoring/render_dashboard.py, imported by path (monitoring/ is a folder, not a package)."""
    spec = importlib.util.spec_from_file_location("axis_stream_render_dashboard", MONITORING / "render_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rules_of(path: Path) -> list[dict[str, Any]]:
    """Every rule (alerting and recording) of a Prometheus rule file."""
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    """Every query expression of dashboard.json (panels and templating)."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            exprs.append(var["definition"])
    return exprs


TOKEN = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The axis_stream_* metric names an expression reads (recorded series, with a colon, excluded)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # label values are not names
    return {t for t in TOKEN.findall(expr) if t.startswith("axis_stream_") and ":" not in t}


def exported_names(exposition: str) -> set[str]:
    """Every sample name an exposition can carry: the samples, plus each # TYPE family with its suffixes."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"],
                        "summary": ["_count", "_sum", "_created"], "info": ["_info"]}.get(kind, [""])
            base = name[:-6] if kind == "counter" and name.endswith("_total") else name
            names |= {base + s for s in suffixes} | {name}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def wait_for(cond: Callable[[], Any], timeout: float, what: str, procs: tuple = ()) -> Any:
    """Poll ``cond()`` every 0.2 s until truthy; fail after ``timeout`` s or when a process in ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


class Prometheus:
    """A real ``prometheus`` on 127.0.0.1 (a free port) with a temporary TSDB, scraping ``targets`` every second."""

    def __init__(self, workdir: Path, targets: list[str], port: int):
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{port}"
        conf = yaml.safe_load(SCRAPE_CONFIG.read_text())               # the shipped example, made fast
        conf["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
        conf["rule_files"] = [str(ALERTS), str(RULES)]
        (job,) = [j for j in conf["scrape_configs"] if j["job_name"] == "axis-stream"]
        job["static_configs"] = [{"targets": targets}]
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(conf))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=workdir)  # noqa: SIM115 (the server's log)

    def get(self, path: str, **params: str) -> dict[str, Any] | None:
        """GET an API path; the decoded JSON, or None while the server does not answer."""
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"null")
        except (OSError, ValueError):
            return None

    def ready(self) -> bool:
        """True once /-/ready answers 200."""
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> dict[tuple, float]:
        """An instant query: {sorted label pairs: value}; empty while the server is not up."""
        body = self.get("/api/v1/query", query=expr)
        if not body or body.get("status") != "success":
            assert body is None or body.get("errorType") != "bad_data", f"bad query {expr}: {body}"
            return {}
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in body["data"]["result"]}

    def value(self, expr: str) -> float | None:
        """The value of a query with exactly one result, else None."""
        result = self.query(expr)
        return next(iter(result.values())) if len(result) == 1 else None

    def log_tail(self) -> str:
        """The end of the server's log."""
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
