"""A flood of small checkpoints and 20 concurrent control clients against one ``axis-stream serve``
(``load_run`` of ``tests/test_load.py``): the checkpoints (visual tower only, tiny CLIP) are renamed
into the watched folder in one burst while 5 clients each poll ``status``, ``jobs.list`` and a
refused ``jobs.show``, send malformed lines (not JSON, binary, nested 50,000 deep, over 1 MiB), or
send requests and never read the replies. Checks that every file is folded once in arrival order,
that every reply is an answer or a one-line refusal, and prints the figures.

    nice -n 19 python benchmarks/load.py --checkpoints 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from faults import tiny_base  # also puts tests/ on sys.path
from test_load import load_run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_cfg, base = tiny_base(root)
        (root / "run").mkdir()
        f = load_run(root / "run", base_cfg, base, args.checkpoints, args.clients)
    print("| checkpoints | burst folded in | per minute | daemon RSS ready -> peak | daemon threads | stop |")
    print("|---|---|---|---|---|---|")
    print(f"| {f['checkpoints']} | {f['fold_s']:.1f} s | {60 * f['checkpoints'] / f['fold_s']:.0f} | "
          f"{f['rss_ready_kib'] / 1024:.0f} -> {f['hwm_kib'] / 1024:.0f} MiB | {f['daemon_threads']} | "
          f"{f['stop_s']:.1f} s |")
    print()
    print("| client kind | clients | outcomes | slowest reply |")
    print("|---|---|---|---|")
    for kind, s in f["clients"].items():
        outcomes = ", ".join(f"{k} {int(v)}" for k, v in s.items() if k not in ("clients", "max_s"))
        slowest = f"{s['max_s']:.2f} s" if s.get("max_s") else "-"
        print(f"| {kind} | {s['clients']} | {outcomes} | {slowest} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
