"""Stage 2 cost against the number of sources on ViT-B-32: AXIS, aTLAS and full fine-tuning.

One training step (forward, backward, clipping, AdamW) on random images, for a basis folded from
S = 1, 5, 10, 20 sources (AXIS at N = 10 %), for aTLAS over the same S task vectors (fp16, as the
original keeps them; P matched to AXIS's trainable count), and for full fine-tuning of the image
tower. Step time is the fastest of ``--steps`` timed steps after a warm-up, as wall time and, on CPU,
as this process's CPU time (OpenMP threads sleep while they wait, so other work on a shared machine
barely moves it); peak memory is ``baselines.memory.step_peak_bytes`` of the first step (the
allocator's peak on CUDA; on CPU the model's resident tensors plus the peak of the tensors the step
creates, optimizer state included).
The sources are synthetic task vectors generated tensor by tensor from a seed: matrices of rank 16
(exactly low-rank, so the CPU folds stay fast; Stage 2's cost depends on K and N, not on the
spectrum), Gaussian noise elsewhere.

    python benchmarks/stage2_cost.py                      # CPU: batch 4, 3 timed steps (about 10 minutes)
    python benchmarks/stage2_cost.py --device cuda --batch 64 --steps 10
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: CPU time = work done

import argparse
import copy
import gc
import json
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from axis_stream import config
from axis_stream.adapt.device import Runtime, runtime_for
from axis_stream.adapt.head import logits
from axis_stream.adapt.model import SVDAdapted
from axis_stream.core import layout, stage1
from axis_stream.experiments.baselines import atlas
from axis_stream.experiments.baselines.memory import step_peak_bytes
from axis_stream.store import models

N_FRACTION = 0.10
CLASSES = 10


class SyntheticSource(Mapping):
    """Source ``index``'s task vector over the image tower, made on access (nothing stays resident)."""

    def __init__(self, base: Mapping[str, Tensor], index: int, dtype: torch.dtype = torch.float32,
                 scale: float = 0.02, rank: int = 16):
        self.shapes = {n: t.shape for n, t in base.items() if n.startswith("visual.") and t.is_floating_point()}
        self.index, self.dtype, self.scale, self.rank = index, dtype, scale, rank

    def __getitem__(self, name: str) -> Tensor:
        shape = self.shapes[name]
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.index}:{name}".encode()))
        if len(shape) == 2:
            m, n = shape
            delta = torch.randn(m, self.rank, generator=g) @ torch.randn(self.rank, n, generator=g) / self.rank
        else:
            delta = torch.randn(shape, generator=g)
        return (self.scale * delta).to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def fold_bases(base: Mapping[str, Tensor], counts: list[int], rt: Runtime
               ) -> tuple[dict[int, tuple[dict, dict]], list[dict]]:
    """The streaming AXIS basis after each count of sources, folded on ``rt.device``: ``{S: (factors, means)}``,
    and one row per fold (its seconds, the device's peak memory during it, the SVD paths of its matrices)."""
    names = layout.matrix_names(base, config.VIT_BLOCK_MATRICES)
    factors: dict[str, stage1.Factors] = {}
    means: dict[str, Tensor] = {}
    out, rows = {}, []
    for i in range(max(counts)):
        source = SyntheticSource(base, i)
        deltas = {name: source[name].to(rt.device) for name in source}  # made and moved outside the clock
        rt.synchronize()
        rt.reset_peak()
        tic, paths = time.perf_counter(), Counter()
        for name, delta in deltas.items():
            if name in names:
                k = stage1.k_for(delta.shape, N_FRACTION)
                factors[name] = stage1.fold(factors.get(name), delta, k, svd="randomized")
                paths[factors[name].stats.svd_method] += 1
            else:
                means[name] = stage1.update_mean(means.get(name), i, delta)
        rt.synchronize()
        rows.append({"sources": i + 1, "seconds": time.perf_counter() - tic, **rt.peak_memory(), "svd": dict(paths)})
        del deltas
        if i + 1 in counts:
            out[i + 1] = (dict(factors), dict(means))
            print(f"  folded {i + 1} sources ({sum(r['seconds'] for r in rows):.0f} s)", flush=True)
    return out, rows


class FullFineTune(nn.Module):
    """The plain model with its image tower trainable: the cost reference."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.base.visual.requires_grad_(True)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.base, method)(*args, **kwargs)


def measure(model: nn.Module, rt: Runtime, batch: int, steps: int) -> dict[str, float]:
    """Peak memory of the first training step, then the fastest of ``steps`` more after a warm-up."""
    device = rt.device
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    labels = torch.randint(CLASSES, (batch,), generator=g).to(device)
    head = F.normalize(torch.randn(CLASSES, 512, generator=g), dim=-1).to(device) * 100
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-1, weight_decay=0.1)

    def step() -> None:
        with rt.amp.autocast():
            loss = F.cross_entropy(logits(model.call("encode_image", images), head), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    peak = step_peak_bytes(model, step, rt.allocator)
    step()  # warm-up
    wall, cpu = [], []
    for _ in range(steps):
        rt.synchronize()
        tic, cpu_tic = time.perf_counter(), time.process_time()
        step()
        rt.synchronize()
        wall.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - cpu_tic)
    return {"step_seconds": min(wall), "cpu_seconds": min(cpu) if device.type == "cpu" else None,
            "peak_memory_mib": peak / 2**20,
            "trainable_params": sum(p.numel() for p in params)}


def run(counts: list[int], batch: int, steps: int, rt: Runtime) -> list[dict]:
    torch.manual_seed(0)
    base_model = models.create_base(config.BaseConfig(model="ViT-B-32", pretrained=""))
    base_sd = {k: v.detach() for k, v in base_model.state_dict().items()}
    rows: list[dict] = []

    def record(method: str, sources: int | None, build: Callable[[], nn.Module], **extra) -> None:
        model = build().to(rt.device)
        row = {"method": method, "sources": sources, **extra, **measure(model, rt, batch, steps),
               "load_average": os.getloadavg()[0]}
        rows.append(row)
        print(f"  {method:>14} S={sources if sources is not None else '-':>2}: {row['step_seconds']:.3f} s/step "
              f"({row['cpu_seconds'] or 0:.3f} CPU s), "
              f"{row['peak_memory_mib']:,.0f} MiB, {row['trainable_params']:,} trainable "
              f"(load average {row['load_average']:.1f})", flush=True)
        del model
        gc.collect()

    print("full fine-tuning of the image tower", flush=True)
    record("full-finetune", None, lambda: FullFineTune(copy.deepcopy(base_model)))
    print("AXIS: folding the sources", flush=True)
    bases, folds = fold_bases(base_sd, counts, rt)
    for s, (factors, means) in bases.items():
        record("axis", s,
               lambda factors=factors, means=means: SVDAdapted(copy.deepcopy(base_model), factors, means, N_FRACTION),
               fold_seconds=sum(r["seconds"] for r in folds[:s]))
    budget = rows[-1]["trainable_params"]
    print(f"aTLAS at AXIS's budget of {budget:,} coefficients", flush=True)
    for s in counts:
        sources = [SyntheticSource(base_sd, i, dtype=torch.float16) for i in range(s)]
        n_2d, n_other = (len(x) for x in atlas.scaled_tensors(base_model, sources))
        p = atlas.p_for_budget(budget, s, n_2d, n_other)
        record("atlas", s,
               lambda sources=sources, p=p: atlas.ATLAS(copy.deepcopy(base_model), sources, p, dtype=torch.float16),
               partitions=p)
    return rows


def table(rows: list[dict], device: str, batch: int) -> str:
    lines = [f"ViT-B-32, {device}, batch {batch}, one step = forward + backward + clip + AdamW", "",
             "| method | sources | trainable | step time (s) | CPU time (s) | peak memory (MiB) | load average |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu = "-" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.3f}"
        lines.append(f"| {r['method']} | {r['sources'] if r['sources'] is not None else '-'} | "
                     f"{r['trainable_params']:,} | {r['step_seconds']:.3f} | {cpu} | {r['peak_memory_mib']:,.0f} | "
                     f"{r['load_average']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--json", type=Path, help="Also write the rows here as JSON.")
    args = parser.parse_args()
    rt = runtime_for(args.device, amp=True)
    started = time.perf_counter()
    rows = run(sorted(args.sources), args.batch, args.steps, rt)
    print()
    print(table(rows, str(rt.device), args.batch))
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
