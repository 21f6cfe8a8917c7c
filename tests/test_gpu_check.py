"""benchmarks/gpu_check.sh, the GPU readiness check, runs on CPU on the tiny CLIP and writes its table."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_with_the_tiny_clip(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CUDA available" in done.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["what"], r["sources"]) for r in rows] == [
        ("fold", 1), ("fold", 2), ("fold", 20), ("Stage 2, AXIS", 1), ("Stage 2, AXIS", 20),
        ("Stage 2, aTLAS", 1), ("Stage 2, aTLAS", 5), ("Stage 2, aTLAS", 20)]
    assert all(r["seconds"] > 0 and r["peak_memory_bytes"] > 0 and r["device"] == "cpu" for r in rows)
    assert rows[0]["svd"] == {"exact": 8}  # the first fold: exact; the 20th mostly the entering-set path
    assert set(rows[2]["svd"]) <= {"randomized", "randomized->exact"} and rows[2]["svd"].get("randomized", 0) >= 6
    atlas = [r["trainable"] for r in rows if r["what"] == "Stage 2, aTLAS"]
    assert atlas == sorted(atlas) and atlas[-1] > atlas[0]  # aTLAS's coefficients grow with the sources
    table = (tmp_path / "table.md").read_text()
    assert table.count("| Stage 2, ") == 5 and "| fold | 20 |" in table
