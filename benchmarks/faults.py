"""The kill -9 campaign of ``tests/test_faults.py`` at length: the daemon killed ``--kills`` times at random
points (during start-up, during a fold, while idle) while it folds a stream of tiny-CLIP checkpoints
and runs selftest jobs; after each kill every source must be in the ledger exactly once or still in
the watched folder and every job's record true; at the end the basis must equal a kill-free fold of
the same files bit for bit. Prints one table row per campaign.

    nice -n 19 python benchmarks/faults.py --kills 50
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


def tiny_base(root: Path) -> tuple[config.BaseConfig, dict[str, torch.Tensor]]:
    """The tests' tiny CLIP (``models.TINY_CLIP``, seed 0), its weights saved as safetensors."""
    cfg_path = root / "axis-tiny.json"
    cfg_path.write_text(json.dumps(models.TINY_CLIP))
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_cfg, base = tiny_base(root)
        (root / "run").mkdir()
        figures = kill_campaign(root / "run", base_cfg, base, args.kills, args.seed,
                                log=lambda line: print(line, file=sys.stderr, flush=True))
    where = ", ".join(f"{k} {v}" for k, v in figures["where"].items())
    jobs = ", ".join(f"{k} {v}" for k, v in sorted(figures["jobs"].items()))
    print("| kills | where | sources folded (each once) | jobs (final states) | basis vs kill-free | time |")
    print("|---|---|---|---|---|---|")
    print(f"| {figures['kills']} | {where} | {figures['sources']} | {jobs} | bit for bit equal | "
          f"{figures['seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
