"""The kill -9 campaign of ``tests/test_faults.py`` at length: the daemon killed ``--kills`` times at random
points (during start-up, during a fold, while idle) while it folds a stream of tiny-CLIP checkpoints
and runs selftest jobs; after each kill every source must be in the ledger exactly once or still in
the watched folder and every job's record true; at the end the basis must equal a kill-free fold of
the same files bit for bit. Prints one table row per campaign.

``--inside-folds``: every kill lands inside a fold, once ``status`` shows the fold at a matrix drawn
at random (``kill_inside_a_fold``); ``--width``/``--layers`` widen the tiny CLIP's vision tower so that
a fold takes seconds (width 512, 6 layers: 24 matrices up to 2048 x 512, 80 MB checkpoints).

    nice -n 19 python benchmarks/faults.py --kills 50
    nice -n 19 python benchmarks/faults.py --kills 20 --inside-folds --width 512 --layers 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout; the campaign and its checks live with the tests
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # and its daemons

from test_faults import kill_campaign  # noqa: E402

from axis_stream import config  # noqa: E402
from axis_stream.store import models  # noqa: E402


def tiny_base(root: Path, width: int = 0, layers: int = 0) -> tuple[config.BaseConfig, dict[str, torch.Tensor]]:
    """The tests' tiny CLIP (``models.TINY_CLIP``, seed 0), its vision tower ``width`` wide and ``layers``
    deep where given, its weights saved as safetensors."""
    vision = {**models.TINY_CLIP["vision_cfg"], **({"width": width} if width else {}),
              **({"layers": layers} if layers else {})}
    cfg_path = root / "axis-tiny.json"
    cfg_path.write_text(json.dumps({**models.TINY_CLIP, "vision_cfg": vision}))
    torch.manual_seed(0)
    model = models.create_base(config.BaseConfig(model="axis-tiny", pretrained="", model_config=cfg_path))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "axis-tiny-base.safetensors")
    return config.BaseConfig(model="axis-tiny", pretrained=str(root / "axis-tiny-base.safetensors"),
                             model_config=cfg_path), state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inside-folds", action="store_true", help="every kill inside a fold, at a random matrix")
    parser.add_argument("--width", type=int, default=0, help="the vision tower's width (default the tiny CLIP's 64)")
    parser.add_argument("--layers", type=int, default=0, help="the vision tower's blocks (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_cfg, base = tiny_base(root, args.width, args.layers)
        (root / "run").mkdir()
        figures = kill_campaign(root / "run", base_cfg, base, args.kills, args.seed, inside_folds=args.inside_folds,
                                log=lambda line: print(line, file=sys.stderr, flush=True))
    where = ", ".join(f"{k} {v}" for k, v in sorted(figures["where"].items(), key=lambda kv: _order(kv[0])))
    jobs = ", ".join(f"{k} {v}" for k, v in sorted(figures["jobs"].items()))
    print("| kills | where | folds interrupted | sources folded (each once) | jobs (final states) | last fold | "
          "basis vs kill-free | time |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {figures['kills']} | {where} | {figures['interrupted']} | {figures['sources']} | {jobs} | "
          f"{figures['fold_s']:.1f} s | bit for bit equal | {figures['seconds']:.0f} s |")
    return 0


def _order(point: str) -> tuple[int, str]:
    """"matrix 3/24" in matrix order, the named points as they are."""
    return (int(point.split()[1].split("/")[0]), point) if point.startswith("matrix ") else (0, point)


if __name__ == "__main__":
    raise SystemExit(main())
