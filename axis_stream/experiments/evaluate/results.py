"""The results file: one row per (method, target, sources, budget, seed, variant), appended durably."""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised only on Python 3.10
    pass







from axis_stream.errors import AxisError
from axis_stream.store.atomic import atomic_write_bytes

KEY = ("method", "target", "sources", "budget", "seed", "k_fraction", "corrupt", "prune_ratio",
       "train_fraction", "patch_dropout")
COLUMNS = KEY + ("source_names", "trainable_params", "val_accuracy", "test_accuracy", "peak_memory_mb",
                 "step_seconds", "seconds")
RESULTS = "results.csv"


class Results:
    """``results.csv`` (or another table with its own ``key`` and ``columns``): rows appended and
    fsynced one run at a time; the keys already there are skipped."""

    def __init__(self, path: Path, key: Sequence[str] = KEY, columns: Sequence[str] = COLUMNS):
        self.path = path
        self.key, self.columns = tuple(key), tuple(columns)
        self.done: set[tuple[str, ...]] = set()
        if not path.exists():
            atomic_write_bytes(path, _csv_line(self.columns).encode())
            return
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a crash in the middle of an append: drop the partial line
            raw = raw[: raw.rfind(b"\n") + 1]
            atomic_write_bytes(path, raw)
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
        if tuple(reader.fieldnames or ()) != self.columns:
            raise AxisError(f"{path}: its columns are not this version's ({', '.join(self.columns)}); "
                            f"use another output_dir or move the file away")
        for row in reader:
            self.done.add(tuple(row[k] for k in self.key))

    def has(self, row: Mapping[str, Any]) -> bool:
        return _key(row, self.key) in self.done

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8", newline="") as fh:
            fh.write("".join(_csv_line([_cell(r.get(c, "")) for c in self.columns]) for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
        self.done.update(_key(r, self.key) for r in rows)

    def rows(self) -> list[dict[str, str]]:
        with open(self.path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _key(row: Mapping[str, Any], key: Sequence[str] = KEY) -> tuple[str, ...]:
    return tuple(_cell(row[k]) for k in key)


def _csv_line(cells: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()
