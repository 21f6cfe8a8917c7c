"""Where `axis-stream export` spends its time, each step in a fresh interpreter (as a user runs it).

Usage: axis-stream quickstart --workdir W; nice python benchmarks/export_time.py W [--repeats 3]
Prints a table of median wall seconds: interpreter start, the torch and open_clip imports, the merged
export with the base built by open_clip (as before) and read from its safetensors file (now), and the
job export.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MERGED = """
import sys
from pathlib import Path
from axis_stream import config
from axis_stream.store import export, models
if {built}:
    export._base_weights = lambda cfg: models.load_base(cfg)[0]
export.export_merged(config.load({cfg!r}), Path({out!r}))
"""


def seconds(args: list[str]) -> float:
    """Wall seconds of one fresh process."""
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path, help="a quickstart workspace (axis-stream quickstart --workdir W)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = str(args.workspace / "axis-stream.toml")
    job = sorted(p.name for p in (args.workspace / "state" / "jobs").iterdir() if p.is_dir())[-1]
    py = sys.executable
    out_dir = Path(tempfile.mkdtemp(prefix="export-time-"))
    cli = shutil.which("axis-stream") or "axis-stream"
    counter = iter(range(10_000))

    def out() -> str:
        return str(out_dir / f"x{next(counter)}.safetensors")

    steps = {
        "python -c pass": lambda: [py, "-c", "pass"],
        "import torch": lambda: [py, "-c", "import torch"],
        "import torch, open_clip": lambda: [py, "-c", "import torch, open_clip"],
        "export_merged, base built by open_clip (before)": lambda: [py, "-c", MERGED.format(built=True, cfg=cfg,
                                                                                            out=out())],
        "export_merged, base read from its file (now)": lambda: [py, "-c", MERGED.format(built=False, cfg=cfg,
                                                                                         out=out())],
        "axis-stream export --merged (now)": lambda: [cli, "export", "--merged", "--config", cfg, "--out", out()],
        "axis-stream export --job (now)": lambda: [cli, "export", "--job", job, "--config", cfg, "--out", out()],
    }
    rows = {name: [] for name in steps}
    for _ in range(args.repeats):   # interleaved, so a busy moment of the machine hits every step alike
        for name, make in steps.items():
            rows[name].append(seconds(make()))
    shutil.rmtree(out_dir)
    print(f"| step (fresh process, median of {args.repeats}) | wall s |")
    print("|---|---|")
    for name, times in rows.items():
        print(f"| {name} | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
