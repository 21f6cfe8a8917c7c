"""What the CLI prints: jobs, basis versions and Stage 2 reports as lines of text.

Rendering lives here, apart from the domain modules, so that a record's shape and its display can
change separately; every function takes plain data (dicts, a ``Basis``) and returns lines. It imports
nothing heavy at module level (no torch), so that ``status`` and the job commands start at once.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from axis_stream.adapt.files import HEAD_FILE, LAMBDA_FILE, REPORT_FILE
from axis_stream.text import printable

if TYPE_CHECKING:
    from axis_stream.service.foldworker import Outcome
    from axis_stream.store.basis import Basis


# --- jobs ---

def progress_line(progress: dict[str, Any] | None) -> str:
    """``{"epoch": 2, "step": 40, "of": 100, "loss": 0.31}`` -> ``"epoch 2  step 40/100  loss 0.31"``."""
    if not progress:
        return ""
    parts = []
    for key, value in progress.items():
        if key == "of":
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        if key == "step" and "of" in progress:
            text += f"/{progress['of']}"
        parts.append(f"{key} {text}")
    return "  ".join(parts)


def update_line(record: dict[str, Any]) -> str:
    """One line per change while waiting on a job: its state, and what it reports while running."""
    if record["state"] != "running":
        return record["state"]
    if record["progress"]:
        return f"running  {progress_line(record['progress'])}"
    version = record["basis_version"]
    return "running" + ("" if version is None else f" on basis version {version}")


def describe(record: dict[str, Any], config: str | None = None) -> list[str]:
    """A job as "key: value" lines for ``jobs show`` (times local, ISO 8601)."""
    lines = [f"{key}: {record[key]}" for key in ("id", "kind", "target", "state", "origin") if record.get(key) != ""]
    lines.append(f"basis version: {'-' if record['basis_version'] is None else record['basis_version']}")
    for key in ("created_at", "started_at", "finished_at"):
        lines.append(f"{key.replace('_at', '')}: {_when(record[key])}")
    if record["started_at"]:
        lines.append(f"duration: {_duration(record)}")
    lines.append("params: " + ", ".join(f"{k}={v}" for k, v in record["params"].items()))
    if record["progress"]:
        lines.append(f"progress: {progress_line(record['progress'])}")
    if record["error"]:
        lines.append(f"error: {record['error']}")
    result = record["result"]
    if result is not None:
        lines.append("result:")
        report = _report_lines(record, config)
        if report is not None:
            lines.extend(f"  {line}" for line in report)
        else:
            lines.extend(f"  {k}: {_value(v)}" for k, v in result.items() if k != "start")
            if result.get("start"):
                lines.append(f"  {start_line(result['start'])}")
    lines.append(f"log: {record['log_path']}")
    return lines


def final_lines(record: dict[str, Any], config: str | None = None) -> list[str]:
    """How ``adapt --wait`` ends: the outcome in one line, a Stage 2 report as ``adapt --local`` prints it
    (``config``: the command's ``--config``, for the export command it prints), and where the log is."""
    took = f" in {_duration(record)}" if record["started_at"] else ""
    lines = [f"job {record['id']} {record['state']}{took}" + (f": {record['error']}" if record["error"] else "")]
    result, report = record["result"], _report_lines(record, config)
    if report is not None:
        lines += report
    elif result is not None:
        lines.append("result: " + ", ".join(f"{k} {_value(v)}" for k, v in result.items()))
    lines.append(f"log: {record['log_path']}")
    return lines


_REPORT_KEYS = {"target_name", "num_classes", "sizes", "trainable_params", "n_fraction", "val_accuracy",
                "initial_val_accuracy", "best_epoch", "test_accuracy", "initial_test_accuracy",
                "peak_memory_bytes", "peak_memory_kind", "device", "seconds", "basis_version"}


def _report_lines(record: dict[str, Any], config: str | None) -> list[str] | None:
    """A job's result as ``adapt --local`` prints it when it is a Stage 2 report; None otherwise."""
    result = record["result"]
    if result is None or not result.keys() >= _REPORT_KEYS:
        return None
    return adapt_summary_lines(dict(result, job_id=record["id"], out_dir=str(Path(record["log_path"]).parent)), config)


def _value(value: Any) -> str:
    """A result's value for a "key: value" line: numbers short, a mapping as ``k=v, ...``, never a repr."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        if all(isinstance(v, (str, int, float)) for v in value):
            return ", ".join(map(_value, value)) or "-"
        return f"{len(value)} entries (--json shows them)"
    return "-" if value is None else str(value)


def table(records: list[dict[str, Any]]) -> list[str]:
    """Jobs as aligned rows for ``jobs list``, newest first."""
    rows = [("ID", "STATE", "KIND", "TARGET", "BASIS", "CREATED", "DURATION", "NOTE")]
    for r in records:
        note = _summary(r["result"]) if r["state"] == "succeeded" else (r["error"] or progress_line(r["progress"]))
        rows.append((r["id"], r["state"], r["kind"], r["target"] or "-",
                     "-" if r["basis_version"] is None else f"v{r['basis_version']}", _when(r["created_at"]),
                     _duration(r) if r["started_at"] else "-", note or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]).rstrip() for row in rows]


def _summary(result: dict[str, Any] | None) -> str:
    keys = [k for k in ("val_accuracy", "test_accuracy") if k in (result or {})]
    return "  ".join(f"{k} {result[k]:.4f}" for k in keys)


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")


def _duration(record: dict[str, Any]) -> str:
    seconds = int((record["finished_at"] or time.time()) - record["started_at"])
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --- the daemon ---

def status_lines(status: Mapping[str, Any], now: float | None = None) -> list[str]:
    """``axis-stream status``: the daemon's state as aligned "field  value" lines, in human units; keys
    this version does not know yet come last as they are."""
    now = time.time() if now is None else now
    s = dict(status)
    state = "stopping" if s.pop("stopping", False) else ("ready" if s.pop("ready", False) else "starting")
    basis, queue, folds = s.pop("basis", {}), s.pop("queue", {}), s.pop("folds", {})
    started, last, waiting = s.pop("started_at", None), s.pop("last", None), s.pop("waiting", {})
    s.pop("uptime_s", None)
    rows = [("daemon", f"axis-stream {s.pop('version', '?')}, pid {s.pop('pid', '?')}: {state}"),
            ("started", "-" if started is None else f"{_when(started)} (up {human_seconds(now - started)})"),
            ("watching", f"{s.pop('watch_dir', '-')} ({s.pop('observer', None) or 'no observer yet'})")]
    if basis.get("version"):
        rows.append(("basis", f"v{basis['version']}: {plural(basis.get('sources', 0), 'source')}, "
                              f"{human_bytes(basis.get('bytes', 0))}; on disk "
                              + ", ".join(f"v{v}" for v in basis.get("versions", []))))
    else:
        rows.append(("basis", "none yet (created at the first fold)"))
    current, progress = queue.get("current"), queue.get("progress")
    at = f" (matrix {progress[0]} of {progress[1]})" if current and progress else ""
    rows.append(("queue", f"{plural(queue.get('depth', 0), 'file')} waiting their turn; "
                          + (f"folding {current}{at}" if current else "idle")))
    rows.append(("folds", ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in folds.items() if n)
                 or "none since the start"))
    if last:
        rows.append(("last", f"{last['result'].replace('_', ' ')} {last['file']}: {last['message']}"
                             + (f" [{last['reason']}]" if last.get("reason") else "")))
    error = s.pop("last_error", None)
    rows.append(("last error", error or "none"))
    for name, entry in sorted(waiting.items()):
        rows.append(("waiting", f"{name}: {entry['cause']} (unchanged {human_seconds(entry['seconds'])})"))
    rows.extend((key.replace("_", " "), "-" if value is None else str(value)) for key, value in s.items())
    width = max(len(key) for key, _ in rows)
    return [printable(f"{key:<{width}}  {value}") for key, value in rows]


def human_seconds(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3 min 12 s``, ``2 h 05 min``, ``3 d 4 h``."""
    if seconds < 10:
        return f"{max(seconds, 0):.1f} s"
    total = int(seconds)
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60} s"
    if total < 86400:
        return f"{total // 3600} h {total // 60 % 60:02d} min"
    return f"{total // 86400} d {total // 3600 % 24} h"


def human_bytes(n: float) -> str:
    """``512 B``, ``121.2 KiB``, ``3.4 GiB``."""
    units, i = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


# --- Stage 2 reports ---

def adapt_summary_lines(result: Mapping[str, Any], config: str | None = None) -> list[str]:
    """A finished job's report as the lines ``adapt --local`` prints (``config``: the command's ``--config``,
    named in the export command it prints so that the command runs as printed)."""
    mib = result["peak_memory_bytes"] / 2**20
    step = f"{result['step_seconds'] * 1000:.0f} ms/step" if result.get("step_seconds") else "no steps run"
    chosen = result.get("start") or {}
    scale = chosen.get("scale", result.get("hyperparameters", {}).get("start_scale", 1.0))
    start = "merged model" if scale == 1 else f"start Lambda = {scale:.3g} s"
    lines = [
        f"adapted basis version {result['basis_version']} to {result['target_name']} ({result['num_classes']} classes, "
        f"{result['sizes']['train']} train images) with {result['trainable_params']:,} trainable values "
        f"(N = {result['n_fraction']:g})",
        f"validation accuracy {result['val_accuracy']:.2%} ({start} before training "
        f"{result['initial_val_accuracy']:.2%}, best epoch {result['best_epoch']})",
        f"test accuracy {result['test_accuracy']:.2%} (before training {result['initial_test_accuracy']:.2%})",
        f"{step}, peak memory {mib:,.0f} MiB ({result['peak_memory_kind']}) on {result['device']}, "
        f"{result['seconds']:.0f} s in all",
    ]
    if chosen.get("candidates"):
        lines.insert(1, start_line(chosen))
    if "out_dir" in result:
        lines.append(f"saved {LAMBDA_FILE}, {HEAD_FILE} and {REPORT_FILE} in {result['out_dir']}")
        flag = f" --config {shlex.quote(str(Path(config).resolve()))}" if config else ""
        lines.append(f"full weights: axis-stream export{flag} --job {result['job_id']} --out model.safetensors")
    return lines


def start_line(start: Mapping[str, Any]) -> str:
    """Where Stage 2 started (``report["start"]``, the ``start`` progress event): the choice and every
    candidate's validation accuracy, e.g. ``start: calibrated (mean scale 0.42); validation: merged 31.0 %, ...``."""
    head = f"start: {start['chosen']} (mean scale {start['scale']:.3g})"
    if not start.get("candidates"):
        return head
    n = start["candidates"][0]["n"]
    scores = ", ".join(f"{c['name']} {c['val_accuracy']:.1%} (scale {c['scale']:.3g})" for c in start["candidates"])
    return f"{head}; validation accuracy of each start on {n} samples: {scores}"


# --- the basis ---

def basis_summary_lines(basis: Basis, version: int | None = None, top_sources: int = 3,
                        top_totals: int = 20) -> list[str]:
    """``axis-stream basis show``: the fold strategy and its state size; per matrix its rank, K, state
    bytes, energy kept and the sources' shares; the sources with the largest shares overall; disk use
    per version on disk."""
    from axis_stream.core.strategies import FOLD_STRATEGIES  # torch: only the basis commands need it

    man = basis.manifest_of(version)
    ident = man["identity"]
    records, shares = basis.shares(man["version"])
    labels = [Path(r.file).stem for r in records]
    strategy = FOLD_STRATEGIES[man["settings"].get("strategy", "axis")]
    params = ", ".join(f"{k}={v:g}" for k, v in strategy.check(man["settings"].get("strategy_params", {})).items())
    sizes = {name: strategy.state_bytes(tuple(info["shape"]), info["k"]) for name, info in man["matrices"].items()}
    what = "a dense float32 tensor" if strategy.dense else "U, s, V of rank <= k (float32)"
    lines = [f"basis {basis.directory} version {man['version']} (on disk: "
             f"{', '.join(map(str, basis.versions()))}; keep_versions {basis.settings.keep_versions}), "
             f"{plural(man['count'], 'source')}",
             f"base {ident['name']} (weights {ident['pretrained'] or 'random init'}, sha256 {ident['sha256'][:16]}); "
             + k_rule(man["settings"], [info["k"] for info in man["matrices"].values()]),
             f"strategy {strategy.name}" + (f" ({params})" if params else "") + f": state per matrix {what}, "
             f"{sum(sizes.values()) / 2**20:.2f} MiB at most for the {len(sizes)} matrices"]
    calib = basis.calibration_summary(man["version"])
    unknown = sum(c is None for c in calib["factors"].values())
    lines.append(f"calibration {calib['rule']}: the merged matrices are scaled by {calib['min']:.3g} .. "
                 f"{calib['max']:.3g} (median {calib['median']:.3g}; 1 = as summed"
                 + (f"; {unknown} matrices folded before calibration existed keep 1" if unknown else "") + ")")
    width = max(len(n) for n in man["matrices"])
    if not strategy.dense:
        lines.append("energy: the matrix's kept energy (sum of s^2) over the sum of its sources' own energies; "
                     "above 100% where the sources' task matrices add up in the same directions")
    lines.append(f"{'matrix':<{width}}  {'shape':>11}  {'k':>4}  {'rank':>4}  {'max state':>10}  {'energy':>7}  "
                 f"{'calib':>6}  top sources")
    totals = [0.0] * len(records)
    for name, info in man["matrices"].items():
        share = shares[name]
        order = sorted(range(len(share)), key=lambda i: -share[i])[:top_sources]
        for i, x in enumerate(share):
            totals[i] += x / len(man["matrices"])
        shape = "x".join(map(str, info["shape"]))
        state = f"{sizes[name] / 1024:,.1f} KiB"
        if strategy.dense:   # a dense state keeps no components: no rank, energy kept or shares to show
            lines.append(f"{name:<{width}}  {shape:>11}  {info['k']:>4}  {'-':>4}  {state:>10}  {'-':>7}  {'-':>6}")
            continue
        kept = info["energy"] / info["source_energy"] if info["source_energy"] else 0.0
        c = calib["factors"].get(name, 1.0)
        lines.append(f"{name:<{width}}  {shape:>11}  {info['k']:>4}  {info['rank']:>4}  {state:>10}  {kept:>7.1%}  "
                     f"{'?' if c is None else f'{c:.3f}':>6}  " + ", ".join(f"{labels[i]} {share[i]:.0%}" for i in order))
    if records and not strategy.dense:
        best = sorted(range(len(records)), key=lambda i: -totals[i])[:top_totals]
        more = f", the top {len(best)} of {len(records)}" if len(best) < len(records) else ""
        lines.append(f"share of the kept energy by source (mean over matrices{more}):")
        lines += [f"  {labels[i]:<30} {totals[i]:>6.1%}" for i in best]
    lines.append(f"disk per version (own bytes are in no other version; ledger {basis.ledger_nbytes() / 2**20:.2f} MiB):")
    for v, (total, own) in basis.disk_use().items():
        lines.append(f"  v{v:<6} {total / 2**20:>9.2f} MiB, own {own / 2**20:>9.2f} MiB, "
                     f"shared {(total - own) / 2**20:>9.2f} MiB")
    return lines


def k_rule(settings: Mapping[str, Any], ks: list[int]) -> str:
    """How K, the rank kept per matrix, is chosen (``[basis] k_mode``), and the K the matrices have now."""
    mode = settings["k_mode"]
    rule = {"fraction": f"floor({settings['k_fraction']:g} * min(m, n)), at least 1",
            "count": f"{settings['k_count']} (at most min(m, n))",
            "gavish-donoho": "the Gavish-Donoho rank of each fold, at least the current rank"}.get(mode, mode)
    now = "" if not ks else f"; now {min(ks)}" + ("" if min(ks) == max(ks) else f" .. {max(ks)}")
    return f"K per matrix (k_mode {mode}): {rule}{now}"


def plural(n: int, noun: str) -> str:
    """``1 source``, ``3 sources``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def rollback_lines(report: Mapping[str, Any]) -> list[str]:
    """``axis-stream basis rollback``: the new version, and the sources that left the ledger (they may be
    folded again) or came back into it (``store.rollback.rollback``'s report)."""
    if report["version"] == report["previous"]:
        return [f"version {report['version']} is current already; nothing changed"]
    lines = [f"version {report['version']} now holds version {report['restored']}'s basis "
             f"({plural(report['count'], 'source')}; version {report['previous']} was current)"]
    for key, what in (("removed", "left the ledger and may be folded again"),
                      ("returned", "came back into the ledger")):
        if report[key]:
            lines.append(f"{plural(len(report[key]), 'source')} {what}:")
            lines += [printable(f"  v{r['version']:<5} {r['file']}  sha256 {r['sha256'][:12]}") for r in report[key]]
    return lines


def history_lines(basis: Basis, offset: int | None = None, limit: int = 50) -> list[str]:
    """``axis-stream basis history``: a page of the current version's ledger, one source per line
    (``offset`` None: the last page)."""
    count = basis.count
    offset = max(0, count - limit) if offset is None else offset
    lines = [f"versions on disk: {', '.join(map(str, basis.versions()))} (current {basis.version})"]
    restored = basis.manifest.get("restored_from")
    if restored is not None:
        lines.append(f"version {basis.version} restores version {restored}")
    records = basis.ledger(offset=offset, limit=limit)
    if len(records) < count:
        lines.append(f"sources {offset + 1}-{offset + len(records)} of {count} (--offset, --limit for others)")
    for r in records:
        kept = "dense state" if r.dense else f"new components {r.new_kept_total}, energy kept {r.energy_kept:.1%}"
        lines.append(f"v{r.version:<5} {r.folded_at}  {printable(r.file)}  sha256 {r.sha256[:12]}  "
                     f"{r.size / 2**20:.1f} MiB  {kept}, |tau|/|base| {r.relative_norm:.3f}, {r.seconds:.1f} s")
    return lines


# --- backfill ---

def outcome_line(outcome: Outcome) -> str:
    """One file of ``axis-stream backfill``: what happened to it."""
    reason = f" [{outcome.reason}]" if outcome.reason else ""
    return printable(f"{outcome.result.replace('_', ' ')} {outcome.file}: {outcome.message}{reason}")


def backfill_summary(counts: Mapping[str, int], seconds: float) -> str:
    """The last line of ``axis-stream backfill``."""
    total = sum(counts.values())
    extra = "".join(f", {counts[k]} {k}" for k in ("error", "vanished") if counts.get(k))
    return (f"backfill: {total} files in {seconds:.1f} s ({total / max(seconds, 1e-9) * 60:.1f} files/min): "
            f"{counts.get('folded', 0)} folded, {counts.get('rejected', 0)} rejected, "
            f"{counts.get('already_folded', 0)} already folded{extra}")
