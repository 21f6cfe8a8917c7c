"""The malformed-input fuzz suite (``tests/test_fuzz.py``) at a larger size, with the outcomes counted per reader.

Runs the suite's hypothesis tests with ``--examples`` generated inputs per test (CI runs 100) and
prints, per reader, how many inputs ended in which typed error (or were accepted as well-formed).
Any input that ends in another exception, an ``internal error`` reply or a deadline overrun fails
the suite and this script.

    nice -n 19 python benchmarks/fuzz.py --examples 2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="Generated inputs per fuzz test.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tally = Path(tmp) / "tally.json"
        env = {**os.environ, "AXIS_FUZZ_EXAMPLES": str(args.examples), "AXIS_FUZZ_TALLY": str(tally),
               "PYTHONPATH": str(ROOT)}
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                              str(ROOT / "tests" / "test_fuzz.py")], env=env, cwd=ROOT, capture_output=True, text=True)
        seconds = time.monotonic() - t0
        counts = json.loads(tally.read_text()) if tally.exists() else {}
    print(f"| reader | inputs | outcomes | ({args.examples} examples per test, {seconds:.0f} s, "
          f"pytest exit {run.returncode}) |")
    print("|---|---|---|---|")
    for reader, outcomes in sorted(counts.items()):
        spread = ", ".join(f"{name} {n}" for name, n in sorted(outcomes.items(), key=lambda kv: -kv[1]))
        print(f"| {reader} | {sum(outcomes.values())} | {spread} | |")
    print(f"| all | {sum(sum(o.values()) for o in counts.values())} | | |")
    if run.returncode:
        print(run.stdout[-3000:], file=sys.stderr)
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
