"""The Stage 2 recipe, top to bottom: build the model, build the head, build the data, train, evaluate, save.

Defaults are the paper's (aTLAS protocol, SPEC section 5) and come from ``config.adapt``; a job's
parameters override them. Every file goes into the job's folder, written crash-safely:
``lambda.safetensors`` (the best Lambda), ``head.safetensors`` (the frozen zero-shot head),
``report.json``, and ``state.pt``, the per-epoch resumable state: a job started again in the same
folder with the same settings continues after its last finished epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, get_type_hints

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from axis_stream.adapt.data import make_splits, resolve_target, transforms_for
from axis_stream.adapt.device import Amp, Runtime, runtime_for
from axis_stream.adapt.files import HEAD_FILE, LAMBDA_FILE, REPORT_FILE, STATE_FILE
from axis_stream.adapt.head import logits, zero_shot_head
from axis_stream.adapt.model import AdaptError, SVDAdapted, check_fraction, check_start_scale
from axis_stream.config import AdaptConfig, BaseConfig, Config
from axis_stream.core.stage1 import Factors
from axis_stream.store import models
from axis_stream.store.atomic import atomic_write, atomic_write_json

Progress = Callable[[dict[str, Any]], None]



class Snapshot(Protocol):
    """What Stage 2 needs of a basis version (``basis.BasisSnapshot`` has it)."""

    version: int
    factors: Mapping[str, Factors]
    means: Mapping[str, Tensor]


@dataclass(frozen=True)
class JobSettings:
    """One Stage 2 run: ``config.adapt`` overridden by the job's parameters."""

    target: str
    hp: AdaptConfig
    data_root: Path | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


_EXTRA = {"target", "data_root", "classnames", "templates", "max_train_samples", "max_eval_samples"}


def job_settings(params: Mapping[str, Any], cfg: Config) -> JobSettings:
    """Validate a job's parameters against ``cfg.adapt``; errors name the parameter."""
    hints = get_type_hints(AdaptConfig)
    unknown = sorted(set(params) - set(hints) - _EXTRA)
    if unknown:
        raise AdaptError(f"unknown adapt parameter(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(set(hints) | _EXTRA))}")
    if not params.get("target"):
        raise AdaptError("adapt needs a target (a dataset name or imagefolder:PATH)")
    for key in ("target", "data_root"):
        if not isinstance(params.get(key) or "", str):
            raise AdaptError(f"adapt parameter {key}: expected a string, got {params[key]!r:.80}")
    overrides = {k: _coerce(hints[k], v, k) for k, v in params.items() if k in hints and v is not None}
    if "n_fraction" in overrides:
        check_fraction(overrides["n_fraction"])
    if "start_scale" in overrides:
        check_start_scale(overrides["start_scale"])
    hp = dataclasses.replace(cfg.adapt, **overrides)
    hp.validate()
    limits = {k: _coerce(int, params[k], k) for k in ("max_train_samples", "max_eval_samples") if params.get(k)}
    if any(v < 1 for v in limits.values()):
        raise AdaptError(f"max_train_samples / max_eval_samples must be >= 1, got {limits}")
    for key in ("classnames", "templates"):
        value = params.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise AdaptError(f"adapt parameter {key}: expected a list of strings, got {value!r:.80}")
    root = params.get("data_root") or cfg.paths.data_root
    return JobSettings(str(params["target"]), hp, Path(root) if root else None,
                       params.get("classnames"), params.get("templates"), **limits)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        if kind in (int, float) and not isinstance(value, bool):
            out = kind(value)
            if kind is int and out != float(value):
                raise ValueError
            return out
        if kind in (bool, str) and isinstance(value, kind):
            return value
    except (TypeError, ValueError, OverflowError):       # OverflowError: int(inf), float(10**400)
        pass
    raise AdaptError(f"adapt parameter {key}: expected {kind.__name__}, got {value!r:.80}")


# --- the recipe ---

def adapt(base: nn.Module, base_cfg: BaseConfig, snapshot: Snapshot, job: JobSettings, out_dir: Path,
          progress: Progress, *, build: Callable[[nn.Module, AdaptConfig], nn.Module] | None = None,
          runtime: Runtime | None = None) -> dict[str, Any]:
    """Stage 2 on ``job.target`` from ``base`` (consumed) and one basis version; returns the report.

    ``build(base, hp)`` replaces the Stage 2 model with another one exposing the same surface (the
    evaluation harness trains aTLAS and LoRA with this exact recipe); its trainable parameters train.
    ``runtime`` (default: ``device.runtime_for(hp.device, hp.amp)``) is where it runs.
    """
    started = time.monotonic()
    hp = job.hp
    if not (hasattr(base, "encode_image") and hasattr(base, "encode_text")):
        raise AdaptError(f"base {base_cfg.model}: Stage 2 needs a CLIP (open_clip, or transformers' CLIPModel), "
                         f"not a {type(base).__name__}; fold it and use `axis-stream export --merged`")
    rt = runtime or runtime_for(hp.device, hp.amp)
    device, amp = rt.device, rt.amp
    rt.reset_peak()
    torch.manual_seed(hp.seed)
    base_sha256 = models.weights_sha256(base.state_dict())

    # 1. the target and its frozen zero-shot head, from the base model's text tower
    target = resolve_target(job.target, job.data_root, job.classnames, job.templates)
    base = base.to(device)
    head = zero_shot_head(base, models.tokenizer_for(base_cfg), target.classnames, target.templates, device=device)

    # 2. the Stage 2 model: only the top-N singular values of every basis matrix train, from start_scale * s
    model = (build(base, hp) if build is not None
             else SVDAdapted(base, snapshot.factors, snapshot.means, hp.n_fraction, seed=hp.seed,
                             start_scale=hp.start_scale))
    lambdas = [p for p in model.parameters() if p.requires_grad]

    # 3. the data
    train_tf, eval_tf = transforms_for(base)
    splits = make_splits(target, train_tf, eval_tf, val_fraction=hp.val_fraction, val_max=hp.val_max,
                         max_train=job.max_train_samples, max_eval=job.max_eval_samples)
    steps_per_epoch = math.ceil(len(splits.train) / hp.batch_size)

    # 4. train: AdamW, cosine over all steps, clipping, AMP on CUDA; keep the best Lambda on validation
    optimizer = torch.optim.AdamW(lambdas, lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch * hp.epochs)
    fingerprint = _fingerprint(job, snapshot.version, base_sha256, len(splits.train))
    state = _load_state(out_dir / STATE_FILE, fingerprint)
    if state is None:  # epoch 0 is the start (the merged model at start_scale 1): what Stage 2 must beat
        initial_val = evaluate(model, head, splits.val, hp, device, amp)
        initial_test = evaluate(model, head, splits.test, hp, device, amp)
        progress({"phase": "validate", "epoch": 0, "epochs": hp.epochs, "val_accuracy": initial_val})
        state = {"fingerprint": fingerprint, "epoch": 0, "best_epoch": 0, "best_val": initial_val,
                 "initial_val": initial_val, "initial_test": initial_test, "best_lambda": model.lambdas(),
                 "history": [], "step_seconds": []}
    else:
        model.load_lambdas(state.pop("lam"), source=str(out_dir / STATE_FILE))
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        scaler = state.pop("scaler")
        if scaler:
            amp.scaler.load_state_dict(scaler)
    for epoch in range(state["epoch"] + 1, hp.epochs + 1):
        loss, seconds = train_epoch(model, head, splits.train, optimizer, scheduler, rt, hp, epoch, progress)
        val = evaluate(model, head, splits.val, hp, device, amp)
        if val > state["best_val"]:
            state.update(best_val=val, best_epoch=epoch, best_lambda=model.lambdas())
        state["history"].append({"epoch": epoch, "train_loss": loss, "val_accuracy": val})
        state["step_seconds"] += seconds
        state["epoch"] = epoch
        _save_state(out_dir / STATE_FILE, state, model, optimizer, scheduler, amp)
        progress({"phase": "validate", "epoch": epoch, "epochs": hp.epochs, "val_accuracy": val,
                  "best_val_accuracy": state["best_val"]})

    # 5. evaluate the best Lambda on the test split
    model.load_lambdas(state["best_lambda"])
    test = evaluate(model, head, splits.test, hp, device, amp)
    progress({"phase": "test", "test_accuracy": test})

    # 6. save: the best Lambda, the head, the report
    meta = {"basis_version": str(snapshot.version), "n_fraction": repr(hp.n_fraction), "seed": str(hp.seed),
            "target": target.key}
    atomic_write(out_dir / LAMBDA_FILE, lambda p: save_file(state["best_lambda"], str(p), metadata=meta))
    atomic_write(out_dir / HEAD_FILE, lambda p: save_file({"head": head.cpu().contiguous()}, str(p), metadata=meta))
    report = {
        "target": target.key, "target_name": target.name, "num_classes": len(target.classnames),
        "basis_version": snapshot.version, "n_fraction": hp.n_fraction, "seed": hp.seed,
        "base": {"model": base_cfg.model, "pretrained": base_cfg.pretrained, "sha256": base_sha256},
        "hyperparameters": {k: getattr(hp, k) for k in ("start_scale", "epochs", "lr", "weight_decay", "batch_size",
                                                         "grad_clip", "val_fraction", "val_max", "amp")},
        "device": str(device), "amp_dtype": amp.dtype_name,
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "trainable_params": model.trainable_count(),
        "initial_val_accuracy": state["initial_val"], "initial_test_accuracy": state["initial_test"],
        "val_accuracy": state["best_val"],
        "best_epoch": state["best_epoch"], "test_accuracy": test, "history": state["history"],
        "step_seconds": statistics.median(state["step_seconds"]) if state["step_seconds"] else None,
        **rt.peak_memory(), "seconds": time.monotonic() - started,
        "files": {"lambda": LAMBDA_FILE, "head": HEAD_FILE},
    }
    atomic_write_json(out_dir / REPORT_FILE, report)
    return report


def train_epoch(model: SVDAdapted, head: Tensor, data: Dataset, optimizer: torch.optim.Optimizer,
                scheduler: Any, rt: Runtime, hp: AdaptConfig, epoch: int, progress: Progress
                ) -> tuple[float, list[float]]:
    """One pass over ``data`` in an order fixed by (seed, epoch); returns mean loss and compute seconds per step."""
    torch.manual_seed(hp.seed * 100_003 + epoch)  # augmentation draws, so a resumed epoch is the same epoch
    loader = DataLoader(data, batch_size=hp.batch_size, shuffle=True, num_workers=hp.num_workers,
                        generator=torch.Generator().manual_seed(hp.seed * 100_003 + epoch),
                        pin_memory=rt.pin_memory, persistent_workers=False)
    params = [p for p in model.parameters() if p.requires_grad]
    amp = rt.amp
    total, count, seconds = 0.0, 0, []
    model.train()
    for step, (images, labels) in enumerate(loader, 1):
        images, labels = images.to(rt.device, non_blocking=True), labels.to(rt.device, non_blocking=True)
        tic = time.perf_counter()
        with amp.autocast():
            loss = F.cross_entropy(logits(model.call("encode_image", images), head), labels)
        optimizer.zero_grad(set_to_none=True)
        amp.scaler.scale(loss).backward()
        amp.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
        amp.scaler.step(optimizer)
        amp.scaler.update()
        scheduler.step()
        rt.synchronize()
        seconds.append(time.perf_counter() - tic)
        total += float(loss.detach()) * len(labels)
        count += len(labels)
        progress({"phase": "train", "epoch": epoch, "epochs": hp.epochs, "step": step, "of": len(loader),
                  "loss": float(loss.detach())})
    return total / max(count, 1), seconds


@torch.no_grad()
def evaluate(model: SVDAdapted, head: Tensor, data: Dataset, hp: AdaptConfig, device: torch.device,
             amp: Amp) -> float:
    """Top-1 accuracy of ``model`` with ``head`` on ``data``; the matrices are materialised once."""
    model.eval()
    weights = model.weights()
    loader = DataLoader(data, batch_size=hp.batch_size, num_workers=hp.num_workers)
    correct = seen = 0
    for images, labels in loader:
        with amp.autocast():
            pred = logits(model.call("encode_image", images.to(device), weights=weights), head).argmax(dim=-1)
        correct += int((pred.cpu() == labels).sum())
        seen += len(labels)
    return correct / max(seen, 1)


# --- the resumable state ---

def _fingerprint(job: JobSettings, basis_version: int, base_sha256: str, train_size: int) -> str:
    """What must be equal for a saved state to be continued (not the device or the worker count)."""
    hp = {k: v for k, v in dataclasses.asdict(job.hp).items() if k not in ("device", "num_workers")}
    return json.dumps({"target": job.target, "hp": hp, "classnames": job.classnames, "templates": job.templates,
                       "max_train": job.max_train_samples, "max_eval": job.max_eval_samples,
                       "basis_version": basis_version, "base": base_sha256, "train_size": train_size},
                      sort_keys=True, default=str)


def _save_state(path: Path, state: dict[str, Any], model: SVDAdapted, optimizer: torch.optim.Optimizer,
                scheduler: Any, amp: Amp) -> None:
    saved = dict(state, lam=model.lambdas(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 scaler=amp.scaler.state_dict())
    atomic_write(path, lambda p: torch.save(saved, p))


def _load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a state we wrote ourselves is atomic; anything else is not ours to guess at
        raise AdaptError(f"{path}: cannot read the saved Stage 2 state ({exc}); remove it to start over") from None
    if state.get("fingerprint") != fingerprint:
        raise AdaptError(f"{path}: saved by a Stage 2 run with other settings, basis or data; "
                         f"use another job folder or remove it to start over")
    return state
