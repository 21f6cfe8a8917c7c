#!/usr/bin/env python3
"""Render monitoring/dashboard.json's panels to a PNG with matplotlib, from a Prometheus server.

Each panel's queries run as Prometheus range queries (the dashboard's ``$job``, ``$instance``,
``$__rate_interval`` and ``$__interval`` substituted as Grafana would), and the results are drawn in
the dashboard's grid: stat panels as their last value, time series as lines or bars, the latency
heatmap as per-bucket counts over time, bar gauges as horizontal bars. So a reader without Grafana
sees what the operator sees.

    python monitoring/render_dashboard.py --prometheus http://127.0.0.1:9090 --range 15m -o monitoring/dashboard.png
    python monitoring/render_dashboard.py --prometheus ... --save run.json     # keep the query results
    python monitoring/render_dashboard.py --load run.json -o out.png           # redraw them, offline

Only the standard library and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "dashboard.json"
Results = dict[str, Any]


def parse_duration(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"1h30m"`` or a plain number of seconds, in seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * scale[u] for n, u in parts)


def prom_duration(seconds: float) -> str:
    """Seconds as a PromQL duration (whole seconds, at least 1s)."""
    return f"{max(1, int(round(seconds)))}s"


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The Grafana dashboard JSON."""
    return json.loads(Path(path).read_text())


def substitute(expr: str, variables: dict[str, str]) -> str:
    """``expr`` with Grafana's ``$name`` / ``${name}`` variables replaced (longest names first)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def query_range(base_url: str, expr: str, start: float, end: float, step: float,
                timeout: float = 10) -> list[dict[str, Any]]:
    """One /api/v1/query_range call; the result matrix, or ValueError with Prometheus's error."""
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/api/v1/query_range?{params}", timeout=timeout) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise ValueError(f"query failed: {expr}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def fetch(dashboard: dict[str, Any], base_url: str, start: float, end: float, step: float,
          variables: dict[str, str]) -> Results:
    """Run every panel's queries as range queries over [start, end]; a JSON-able results dict."""
    panels: dict[str, list[dict[str, Any]]] = {}
    for panel in dashboard["panels"]:
        out = []
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], variables)
            out.append({"refId": target.get("refId", ""), "expr": expr,
                        "series": query_range(base_url, expr, start, end, step)})
        panels[str(panel["id"])] = out
    return {"start": start, "end": end, "step": step, "variables": variables, "panels": panels}


# -- drawing --------------------------------------------------------------------------------------

def format_value(value: float, unit: str | None) -> str:
    """A value as Grafana would show it for the panel's unit."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "percentunit":
        return f"{100 * value:.1f}%"
    if unit == "bytes":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or suffix == "TiB":
                return f"{value:.0f} {suffix}" if suffix == "B" else f"{value:.1f} {suffix}"
            value /= 1024
    if unit == "s":
        if abs(value) >= 86400 * 365:
            return f"{value / 86400 / 365:.0f} y"
        if abs(value) >= 86400:
            return f"{value / 86400:.1f} d"
        if abs(value) >= 3600:
            return f"{value / 3600:.1f} h"
        if abs(value) >= 60:
            return f"{value / 60:.1f} min"
        return f"{value:.3g} s"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format filled from a series' labels."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "")
    return text or "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__") + "}"


def _points(series: dict[str, Any]) -> tuple[list[float], list[float]]:
    ts = [float(t) for t, _ in series["values"]]
    vs = [float(v) for _, v in series["values"]]
    return ts, vs


def render(dashboard: dict[str, Any], results: Results, out: Path, title: str | None = None) -> dict[str, int]:
    """Draw every panel of ``dashboard`` from ``results`` into ``out`` (PNG); {panel title: series with data}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = rows * 0.5 + 1.2
    fig = plt.figure(figsize=(22, height), dpi=100)
    grid = GridSpec(rows, 24, figure=fig, hspace=3.2, wspace=1.6, left=0.04, right=0.99, top=1 - 1.1 / height,
                    bottom=0.02)
    start, end = results["start"], results["end"]
    timefmt = "%H:%M:%S" if end - start <= 1800 else "%H:%M"
    span = f"{datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} to {datetime.fromtimestamp(end):%H:%M:%S}"
    fig.suptitle(f"{title or dashboard.get('title', 'dashboard')}   ({span}, step {results['step']:g} s, "
                 f"job={results['variables'].get('job', '')})", fontsize=15, fontweight="bold")
    counts: dict[str, int] = {}
    for panel in panels:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        legends = {t.get("refId", ""): t.get("legendFormat", "") for t in panel.get("targets", [])}
        fetched = results["panels"].get(str(panel["id"]), [])
        series = [(legend(legends.get(q["refId"], ""), s["metric"]), *_points(s)) for q in fetched for s in q["series"]]
        series = [(name, ts, vs) for name, ts, vs in series if any(not math.isnan(v) for v in vs)]
        counts[panel["title"]] = len(series)
        ax.set_title(panel["title"], fontsize=11, fontweight="bold", loc="left")
        kind = panel["type"]
        if not series:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", fontsize=12, color="grey", transform=ax.transAxes)
            ax.set_xticks([]), ax.set_yticks([])
        elif kind == "stat":
            _stat(ax, series, unit)
        elif kind == "bargauge":
            _bargauge(ax, series, unit)
        elif kind == "heatmap":
            _heatmap(ax, fig, series, mdates, results["step"], timefmt)
        else:
            _timeseries(ax, panel, series, unit, mdates, timefmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():          # AutoDateLocator on ranges of a few minutes
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(out)
    plt.close(fig)
    return counts


def _stat(ax: Any, series: list, unit: str | None) -> None:
    lines = []
    for name, _, vs in series:
        last = next((v for v in reversed(vs) if not math.isnan(v)), math.nan)
        lines.append(format_value(last, unit) + (f"  ({name})" if len(series) > 1 else ""))
    ax.text(0.5, 0.45, "\n".join(lines), ha="center", va="center", transform=ax.transAxes,
            fontsize=22 if len(series) == 1 else 12, fontweight="bold", color="#1f6f3f")
    if len(series) == 1:
        ax.text(0.5, 0.05, series[0][0], ha="center", va="bottom", transform=ax.transAxes, fontsize=8, color="grey")
    ax.set_xticks([]), ax.set_yticks([])


def _bargauge(ax: Any, series: list, unit: str | None) -> None:
    names = [name for name, _, _ in series]
    last = [next((v for v in reversed(vs) if not math.isnan(v)), 0.0) for _, _, vs in series]
    ax.barh(names, last, color="#3274d9")
    ax.set_xlim(0, 1 if unit == "percentunit" else max(last) * 1.15 or 1)
    for i, v in enumerate(last):
        ax.text(v, i, " " + format_value(v, unit), va="center", fontsize=9)
    ax.invert_yaxis()
    ax.tick_params(labelsize=9)


def _timeseries(ax: Any, panel: dict, series: list, unit: str | None, mdates: Any, timefmt: str) -> None:
    custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
    bars = custom.get("drawStyle") == "bars"
    bottom: dict[float, float] = {}
    for name, ts, vs in sorted(series, key=lambda s: s[0]):
        xs = [datetime.fromtimestamp(t) for t in ts]
        if bars:
            width = (ts[1] - ts[0]) / 86400 * 0.9 if len(ts) > 1 else 1 / 86400
            base = [bottom.get(t, 0.0) for t in ts]
            clean = [0.0 if math.isnan(v) else v for v in vs]
            ax.bar(xs, clean, width=width, bottom=base, label=name)
            for t, v in zip(ts, clean):
                bottom[t] = bottom.get(t, 0.0) + v
        else:
            ax.plot(xs, vs, label=name, linewidth=1.6, marker="." if len(ts) < 30 else None)
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=6))
    ax.xaxis.set_major_formatter(mdates.DateFormatter(timefmt))
    ax.yaxis.set_major_formatter(_ticker(lambda v, _: format_value(v, unit)))
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    if "min" in defaults:
        ax.set_ylim(bottom=defaults["min"])
    if "max" in defaults:
        ax.set_ylim(top=defaults["max"])
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="upper left", ncol=min(4, len(series)), framealpha=0.7)


def _heatmap(ax: Any, fig: Any, series: list, mdates: Any, step: float, timefmt: str) -> None:
    """Cumulative ``le`` buckets (increase per step) as counts per bucket over time."""
    def le(name: str) -> float:
        return math.inf if name in ("+Inf", "Inf") else float(name)

    buckets = sorted(series, key=lambda s: le(s[0]))
    ts = sorted({t for _, times, _ in buckets for t in times})
    at = [dict(zip(times, vs)) for _, times, vs in buckets]
    cum = [[0.0 if math.isnan(row.get(t, math.nan)) else row[t] for t in ts] for row in at]
    counts = [[max(0.0, c - (cum[i - 1][j] if i else 0.0)) for j, c in enumerate(row)] for i, row in enumerate(cum)]
    used = [i for i, row in enumerate(counts) if any(row)]
    lo, hi = (max(0, min(used) - 1), min(len(counts), max(used) + 2)) if used else (0, len(counts))
    counts, names = counts[lo:hi], [b[0] for b in buckets[lo:hi]]
    x0 = mdates.date2num(datetime.fromtimestamp(ts[0] - step / 2))
    x1 = mdates.date2num(datetime.fromtimestamp(ts[-1] + step / 2))
    im = ax.imshow(counts, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest",
                   extent=(x0, x1, -0.5, len(names) - 0.5))
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"<= {n} s" if n != "+Inf" else "> last" for n in names], fontsize=8)
    ax.xaxis_date()
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=6))
    ax.xaxis.set_major_formatter(mdates.DateFormatter(timefmt))
    ax.tick_params(labelsize=8)
    fig.colorbar(im, ax=ax, pad=0.01).set_label("folds per interval", fontsize=8)


def _ticker(fn: Any) -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(fn)


# -- command line ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """The command line; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus", help="base URL of a Prometheus server, e.g. http://127.0.0.1:9090")
    src.add_argument("--load", type=Path, help="query results saved earlier with --save")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("-o", "--output", type=Path, default=HERE / "dashboard.png")
    ap.add_argument("--range", default="1h", help="how far back from --end (default 1h)")
    ap.add_argument("--end", type=float, default=None, help="Unix time of the right edge (default now)")
    ap.add_argument("--step", default=None, help="query resolution (default range/240)")
    ap.add_argument("--scrape-interval", default="15s", help="the scrape interval, for $__rate_interval")
    ap.add_argument("--rate-interval", default=None, help="override $__rate_interval (default max(step+scrape, 4*scrape))")
    ap.add_argument("--job", default="axis-stream")
    ap.add_argument("--instance", default=".*", help="regex for $instance (default all)")
    ap.add_argument("--save", type=Path, help="also write the query results here (JSON)")
    args = ap.parse_args(argv)
    dashboard = load_dashboard(args.dashboard)
    if args.load:
        results = json.loads(args.load.read_text())
    else:
        end = args.end if args.end is not None else time.time()
        span = parse_duration(args.range)
        step = parse_duration(args.step) if args.step else max(1.0, span / 240)
        scrape = parse_duration(args.scrape_interval)
        rate = parse_duration(args.rate_interval) if args.rate_interval else max(step + scrape, 4 * scrape)
        variables = {"job": args.job, "instance": args.instance, "__rate_interval": prom_duration(rate),
                     "__interval": prom_duration(step), "datasource": "prometheus"}
        results = fetch(dashboard, args.prometheus, end - span, end, step, variables)
        if args.save:
            args.save.write_text(json.dumps(results, separators=(",", ":")) + "\n")
    counts = render(dashboard, results, args.output)
    empty = [t for t, n in counts.items() if not n]
    print(f"wrote {args.output}: {len(counts)} panels, {len(counts) - len(empty)} with data"
          + (f"; no data: {', '.join(empty)}" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
