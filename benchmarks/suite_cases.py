"""Every case of the fault and fuzz suites with its outcome: runs their tests (CI sizes) under pytest and
prints one table per suite from its JUnit report, so that PERFORMANCE.md lists what the code holds.

The fault suite is ``tests/test_faults.py`` (a running daemon: kill -9, full and read-only disks,
the folder deleted, files replaced or written mid-fold, links), ``tests/test_foldworker.py`` (what
each thing a folder can hold or a disk can do makes of one file), ``tests/test_notify.py`` (systemd
notify and the watchdog during long hashes) and the other-head case of ``tests/test_hf.py``; the fuzz suite is
``tests/test_fuzz.py`` (its generated inputs per test: ``AXIS_FUZZ_EXAMPLES``, 100 unless set).

    nice -n 19 python benchmarks/suite_cases.py [--suite faults|fuzz]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"faults": ["tests/test_faults.py", "tests/test_foldworker.py", "tests/test_notify.py",
                     "tests/test_hf.py::test_another_head_is_refused_unless_allowed_then_warned_and_recorded"],
          "fuzz": ["tests/test_fuzz.py"]}


def run_suite(files: list[str], report: Path) -> list[tuple[str, str, str, float]]:
    """(file, case, outcome, seconds) per test case of ``files``; outcome: passed, failed, or skipped: why."""
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag == "skipped":
                outcome = "skipped: " + (child.get("message") or "").removeprefix("Skipped: ")
            elif child.tag in ("failure", "error"):
                outcome = f"**{child.tag}**: " + (child.get("message") or "").splitlines()[0][:120]
        name = case.get("name", "").removeprefix("test_")
        cases.append((case.get("classname", "").split(".")[-1], name, outcome, float(case.get("time", 0))))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), action="append", help="one suite (default: both)")
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for suite in args.suite or sorted(SUITES):
            cases = run_suite(SUITES[suite], Path(tmp) / f"{suite}.xml")
            passed = sum(c[2] == "passed" for c in cases)
            print(f"\n#### {suite}: {len(cases)} cases, {passed} passed\n")
            print("| file | case | outcome | s |")
            print("|---|---|---|---|")
            for file, name, outcome, seconds in cases:
                print(f"| {file} | {name.replace('_', ' ')} | {outcome} | {seconds:.1f} |")
            failed |= any(c[2].startswith("**") for c in cases)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
