"""The benchmark scripts answer --help with their usage and run nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["suite_text.py", "suite_vision.py", "calibration.py", "calibrated_sweep.py"])
def test_help_prints_the_usage_and_runs_nothing(script, tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and "--tables-only" in done.stdout
    assert not any(tmp_path.iterdir())
