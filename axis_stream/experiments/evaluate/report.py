"""The summary table and the plots, drawn from the whole results file."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised only on Python 3.10
    pass







from axis_stream.store.atomic import atomic_write

DEFAULTS = {"corrupt": "no", "prune_ratio": "0", "train_fraction": "1", "patch_dropout": "0"}
SWEEPS = ("k_fraction", "corrupt", "prune_ratio", "train_fraction", "patch_dropout")
VS_SOURCES = (("test_accuracy", "mean test accuracy", "accuracy_vs_sources.png"),
              ("peak_memory_mb", "peak memory of one Stage 2 step (MiB)", "memory_vs_sources.png"),
              ("step_seconds", "median Stage 2 step (s)", "step_time_vs_sources.png"))
"""What is drawn against the number of sources (paper Figures 1 and 21): accuracy and the two costs."""


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _default_rows(rows: Sequence[Mapping[str, str]], but: str | None = None) -> list[Mapping[str, str]]:
    """Rows at the default robustness settings and the first K (except along the ``but`` axis)."""
    default_k = _default_k(rows)
    return [r for r in rows
            if all(r[k] == v for k, v in DEFAULTS.items() if k != but)
            and (but == "k_fraction" or r["k_fraction"] in ("", default_k))]


def _default_k(rows: Sequence[Mapping[str, str]]) -> str:
    """The K the tables and plots show: 0.1 if it was run, else the smallest."""
    ks = sorted({r["k_fraction"] for r in rows if r["k_fraction"]}, key=float)
    return "0.1" if "0.1" in ks else (ks[0] if ks else "")


def summary(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Mean test accuracy per method and budget over targets, aggregation levels and seeds (default settings)."""
    rows = _default_rows(rows)
    if not rows:
        return ["no results yet"]
    budgets = sorted({r["budget"] for r in rows}, key=float)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = ["method"] + [("N=" + b if float(b) > 0 else "no budget") for b in budgets] + ["params (max)"]
    table = [head]
    for m in methods:
        line = [m]
        for b in budgets:
            acc = [float(r["test_accuracy"]) for r in rows if r["method"] == m and r["budget"] == b]
            line.append(f"{_mean(acc):.2%} ({len(acc)})" if acc else "-")
        line.append(str(max(int(r["trainable_params"]) for r in rows if r["method"] == m)))
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["mean test accuracy (number of rows) at default settings:"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return lines


def plot(rows: Sequence[Mapping[str, str]], out_dir: Path) -> list[Path]:
    """PNG plots: accuracy, peak memory and step time vs number of sources, accuracy vs trainable
    parameters, and accuracy along each swept setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        written.append(_save(fig, out_dir / name))

    base = _default_rows(rows)
    if not base:
        return written
    groups = _group(base, ("method", "budget"))

    for column, ylabel, name in VS_SOURCES:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for i, ((method, budget), grp) in enumerate(groups.items()):
            label = method + (f" N={budget}" if float(budget) > 0 else "")
            by_level = _group([r for r in grp if r.get(column, "") != ""], ("sources",))
            xs = sorted(int(k[0]) for k in by_level)
            ys = [_mean([float(r[column]) for r in by_level[(str(x),)]]) for x in xs]
            if not xs:
                continue
            drawn = True
            if xs == [0]:  # a reference that uses no sources: a level line
                ax.axhline(ys[0], linestyle="--", linewidth=1, label=label, color=f"C{i % 10}")
            else:
                ax.plot(xs, ys, marker="o", label=label, color=f"C{i % 10}")
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("number of source models")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method,), grp in _group(base, ("method",)).items():
        pts = sorted((_mean([float(r["trainable_params"]) for r in g]), _mean([float(r["test_accuracy"]) for r in g]))
                     for g in _group(grp, ("budget",)).values())
        ax.plot([max(p[0], 1) for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (zero-shot drawn at 1)")
    ax.set_ylabel("mean test accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_params.png")

    for axis in SWEEPS:
        swept = _default_rows(rows, but=axis)
        values = {r[axis] for r in swept if r[axis] != ""}
        if len(values) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (method, budget), grp in _group(swept, ("method", "budget")).items():
            by_value = _group([r for r in grp if r[axis] != ""], (axis,))
            if len(by_value) < 2:
                continue
            xs = sorted(by_value, key=lambda k: _numeric(k[0]))
            ax.plot([_numeric(x[0]) for x in xs], [_mean([float(r["test_accuracy"]) for r in by_value[x]]) for x in xs],
                    marker="o", label=method + (f" N={budget}" if float(budget) > 0 else ""))
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylabel("mean test accuracy")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, f"accuracy_vs_{axis}.png")
    return written


def _numeric(value: str) -> float:
    return {"yes": 1.0, "no": 0.0}[value] if value in ("yes", "no") else float(value)


def _group(rows: Sequence[Mapping[str, str]], keys: Sequence[str]) -> dict[tuple[str, ...], list[Mapping[str, str]]]:
    out: dict[tuple[str, ...], list[Mapping[str, str]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG crash-safely and close it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def _multitask_curves(rows: Sequence[Mapping[str, str]]) -> dict[str, dict[int, list[Mapping[str, str]]]]:
    """Multi-task rows at the default K, by method then number of sources (one row per arrival order)."""
    out: dict[str, dict[int, list[Mapping[str, str]]]] = {}
    default_k = _default_k(rows)
    for r in (r for r in rows if r["k_fraction"] in ("", default_k)):
        out.setdefault(r["method"], {}).setdefault(int(r["sources"]), []).append(r)
    return out


def multitask_summary(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Multi-task accuracy and backward transfer per method and number of sources, mean over the arrival orders."""
    curves = _multitask_curves(rows)
    if not curves:
        return ["no multi-task results yet"]
    levels = sorted({t for c in curves.values() for t in c})
    table = [["method"] + [f"t={t}" for t in levels]]
    for method, by_t in curves.items():
        cells = []
        for t in levels:
            got = by_t.get(t, [])
            mta = _mean([float(r["multitask_accuracy"]) for r in got])
            bwt = _mean([float(r["backward_transfer"]) for r in got])
            cells.append(f"{mta:.2%} {100 * bwt:+.1f} ({len(got)})" if got else "-")
        table.append([method] + cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["multi-task accuracy of the merged models, BWT in points (number of arrival orders):"]
    return lines + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def plot_multitask(rows: Sequence[Mapping[str, str]], out_dir: Path) -> list[Path]:
    """``multitask_vs_sources.png``: multi-task accuracy and backward transfer of each method's merged
    model against the number of sources folded (mean over arrival orders; the band: their min and max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _multitask_curves(rows)
    if not curves:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (method, by_t) in enumerate(curves.items()):
        xs = sorted(by_t)
        for ax, column in zip(axes, ("multitask_accuracy", "backward_transfer")):
            values = [[float(r[column]) for r in by_t[x]] for x in xs]
            ax.plot(xs, [_mean(v) for v in values], marker="o", label=method, color=f"C{i % 10}")
            if any(len(v) > 1 for v in values):
                ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], alpha=0.15,
                                color=f"C{i % 10}")
    for ax, ylabel in zip(axes, ("multi-task accuracy (tasks folded so far)", "backward transfer")):
        ax.set_xlabel("number of sources folded")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return [_save(fig, out_dir / "multitask_vs_sources.png")]
