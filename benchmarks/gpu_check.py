"""GPU readiness check: streaming folds and Stage 2 jobs with AMP on the device, AXIS against aTLAS.

On open_clip ViT-B-32 (``pretrained=None``: random weights, cost does not depend on them) it folds
20 synthetic sources (``stage2_cost.SyntheticSource``: rank-16 task matrices) into an AXIS basis on
the device, then runs the Stage 2 recipe itself (``adapt.recipe.adapt``, what an adapt job runs,
with the ``adapt.amp`` switch on: bfloat16 autocast on CUDA where supported) for AXIS on the bases
of 1 and 20 sources and for aTLAS over 1, 5 and 20 sources at AXIS's trainable count (the paper's
Figure 1 comparison), each on the same small synthetic image-folder target. A job's row is its
report: median training-step seconds and peak memory (on CUDA the allocator's peak over the job,
``cuda_max_allocated``; on CPU this process's peak RSS, which only grows). ``--tiny`` runs the same
code on the tiny CLIP: on CPU a check in well under a minute, the one CI runs. Writes ``table.md``
and ``rows.json`` into ``--out``.

    bash benchmarks/gpu_check.sh                                    # on a machine with a GPU
    bash benchmarks/gpu_check.sh --device cpu --tiny --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from stage2_cost import N_FRACTION, SyntheticSource, fold_bases
from torch import nn

from axis_stream import config
from axis_stream.adapt.device import runtime_for
from axis_stream.adapt.recipe import adapt, job_settings
from axis_stream.experiments.baselines import atlas
from axis_stream.service import quickstart
from axis_stream.store import models

AXIS_SOURCES = (1, 20)
ATLAS_SOURCES = (1, 5, 20)
MiB = 2**20


def base_model(tiny: bool, workdir: Path) -> tuple[config.BaseConfig, nn.Module]:
    """The tiny CLIP (as the quickstart builds it) or ViT-B-32 with seeded random weights."""
    if tiny:
        return quickstart.build_base(workdir)
    torch.manual_seed(0)
    cfg = config.BaseConfig(model="ViT-B-32", pretrained="")
    return cfg, models.create_base(cfg)


def stage2_job(name: str, sources: int, base_cfg: config.BaseConfig, base: nn.Module, snapshot: SimpleNamespace,
               build: Callable[[nn.Module, config.AdaptConfig], nn.Module] | None, params: dict, device: str,
               out: Path) -> dict:
    """One Stage 2 job through the recipe on a copy of ``base``, as an adapt job with ``device`` and
    ``amp = true`` runs it; its row for the table."""
    job = job_settings({**params, "device": device, "amp": True}, config.Config())
    folder = out / f"{name}-{sources}"
    folder.mkdir(parents=True)
    report = adapt(copy.deepcopy(base), base_cfg, snapshot, job, folder, lambda event: None, build=build)
    gc.collect()
    row = {"what": f"Stage 2, {name}", "sources": sources, "trainable": report["trainable_params"],
           "seconds": report["step_seconds"], "peak_memory_bytes": report["peak_memory_bytes"],
           "peak_memory_kind": report["peak_memory_kind"], "amp": report["amp_dtype"] or "off",
           "device": report["device"]}
    print(f"  {row}", flush=True)
    return row


def run(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """The folds, then the five Stage 2 jobs; one row each (the folds: the first, the second and the last)."""
    rt = runtime_for(args.device, amp=True)
    base_cfg, base = base_model(args.tiny, workdir)
    base_sd = {k: v.detach() for k, v in base.state_dict().items()}
    print(f"folding {max(AXIS_SOURCES + ATLAS_SOURCES)} sources on {rt.device}", flush=True)
    bases, folds = fold_bases(base_sd, list(AXIS_SOURCES), rt)
    rows = [{"what": "fold", "sources": f["sources"], "trainable": None, "seconds": f["seconds"],
             "peak_memory_bytes": f["peak_memory_bytes"], "peak_memory_kind": f["peak_memory_kind"], "amp": "-",
             "device": str(rt.device), "svd": f["svd"]} for f in (folds[0], folds[1], folds[-1])]
    per_class = math.ceil(args.batch * args.steps / 4 / 0.9)  # 4 classes; 10 % of train goes to validation
    target = quickstart.write_image_folder(quickstart.TARGET, workdir / "target",
                                           {"train": per_class, "test": max(1, args.batch // 4)}, seed=0)
    params = {"target": f"imagefolder:{target}", "epochs": 1,
              "batch_size": args.batch, "num_workers": 0, "n_fraction": N_FRACTION,
              "max_train_samples": args.batch * args.steps, "max_eval_samples": args.batch}
    jobs = workdir / "jobs"
    for s in AXIS_SOURCES:
        factors, means = bases[s]
        snapshot = SimpleNamespace(version=s, factors=factors, means=means, calibration={})
        rows.append(stage2_job("AXIS", s, base_cfg, base, snapshot, None, params, args.device, jobs))
    budget = rows[-1]["trainable"]
    for s in ATLAS_SOURCES:
        sources = [SyntheticSource(base_sd, i, dtype=torch.float16) for i in range(s)]

        def build(model: nn.Module, hp: config.AdaptConfig, sources=sources) -> nn.Module:
            n_2d, n_other = (len(x) for x in atlas.scaled_tensors(model, sources))
            p = atlas.p_for_budget(budget, len(sources), n_2d, n_other)
            return atlas.ATLAS(model, sources, p, dtype=torch.float16, seed=hp.seed)

        none = SimpleNamespace(version=0, factors={}, means={}, calibration={})
        rows.append(stage2_job("aTLAS", s, base_cfg, base, none, build, params, args.device, jobs))
    return rows


def table(rows: list[dict], model: str, batch: int) -> str:
    """The rows as a markdown table."""
    lines = [f"{model}, device {rows[0]['device']}, Stage 2 batch {batch}; fold seconds are one whole source's "
             f"fold, Stage 2 seconds the median training step (forward + backward + clip + AdamW)", "",
             "| what | sources | trainable | seconds | peak memory (MiB) | peak kind | AMP | SVD paths |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        trainable = "-" if r["trainable"] is None else f"{r['trainable']:,}"
        svd = ", ".join(f"{k} {v}" for k, v in r.get("svd", {}).items()) or "-"
        lines.append(f"| {r['what']} | {r['sources']} | {trainable} | {r['seconds']:.3f} | "
                     f"{r['peak_memory_bytes'] / MiB:,.0f} | {r['peak_memory_kind']} | {r['amp']} | {svd} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--tiny", action="store_true", help="the tiny CLIP instead of ViT-B-32 (a quick CPU check)")
    parser.add_argument("--batch", type=int, default=None, help="Stage 2 batch size (default 64; 8 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per job (default 10; 2 with --tiny)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu-check")
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.tiny else 64)
    args.steps = args.steps or (2 if args.tiny else 10)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args, Path(tmp))
    text = table(rows, "tiny CLIP" if args.tiny else "ViT-B-32", args.batch)
    print()
    print(text)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
