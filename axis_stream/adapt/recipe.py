"""The Stage 2 recipe, top to bottom: build the model, build the head, build the data, train, evaluate, save.

Defaults are the paper's (aTLAS protocol, SPEC section 5) and come from ``config.adapt``; a job's
parameters override them. Every file goes into the job's folder, written crash-safely:
``lambda.safetensors`` (the best Lambda), ``head.safetensors`` (the frozen zero-shot head),
``report.json``, and ``state.pt``, the per-epoch resumable state: a job started again in the same
folder with the same settings continues after its last finished epoch. Training is ``loop.Loop``
(shared with the suites' harness) over :class:`ImageData`; ``start_scale = "auto"`` scores the
candidate starts of ``adapt.start`` on validation first and the report's ``start`` records the choice.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, get_type_hints

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from axis_stream.adapt.data import Splits, make_splits, resolve_target, transforms_for
from axis_stream.adapt.device import Amp, Runtime, runtime_for
from axis_stream.adapt.files import HEAD_FILE, LAMBDA_FILE, REPORT_FILE, STATE_FILE
from axis_stream.adapt.head import logits, zero_shot_head
from axis_stream.adapt.loop import Loop, Progress, accuracy
from axis_stream.adapt.model import AUTO, AdaptError, SVDAdapted, check_fraction, check_start_scale
from axis_stream.config import AdaptConfig, BaseConfig, Config
from axis_stream.core.stage1 import Factors
from axis_stream.store import models
from axis_stream.store.atomic import atomic_write, atomic_write_json


class Snapshot(Protocol):
    """What Stage 2 needs of a basis version (``basis.BasisSnapshot`` has it)."""

    version: int
    factors: Mapping[str, Factors]
    means: Mapping[str, Tensor]
    calibration: Mapping[str, float]   # the basis's factor per matrix (a missing name is 1.0): the calibrated start


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


_EXTRA = {f.name for f in dataclasses.fields(JobSettings)} - {"hp"}
"""A job's parameters beyond the Stage 2 settings (``AdaptConfig``, whose every field is one too)."""
REPORTED_APART = ("n_fraction", "seed", "device", "num_workers")
"""Settings the report holds elsewhere (the device actually used) or that do not change the result."""


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
    if key == "start_scale":  # a number, or "auto"
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        if not isinstance(value, bool):
            try:
                return float(value)
            except (TypeError, ValueError, OverflowError):
                pass
        raise AdaptError(f"adapt parameter {key}: expected float or \"auto\", got {value!r:.80}")
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
                             start_scale=hp.start_scale, calibration=snapshot.calibration))

    # 3. the data
    train_tf, eval_tf = transforms_for(base)
    splits = make_splits(target, train_tf, eval_tf, val_fraction=hp.val_fraction, val_max=hp.val_max,
                         max_train=job.max_train_samples, max_eval=job.max_eval_samples)
    data = ImageData(splits, head, hp.batch_size, hp.num_workers, rt)

    # 4. the loop (``loop.Loop``): the start (scored on validation for "auto"), then AdamW, cosine over
    # all steps, clipping, AMP on CUDA, the best Lambda on validation, the state saved after every epoch
    fingerprint = _fingerprint(job, snapshot.version, base_sha256, len(splits.train))
    stage2 = Loop(model, data, hp, rt, progress, state_path=out_dir / STATE_FILE, fingerprint=fingerprint)
    stage2.setup()
    state = stage2.train()

    # 5. evaluate the best Lambda on the test split
    test = stage2.finish()

    # 6. save: the best Lambda, the head, the report
    meta = {"basis_version": str(snapshot.version), "n_fraction": repr(hp.n_fraction), "seed": str(hp.seed),
            "target": target.key}
    atomic_write(out_dir / LAMBDA_FILE, lambda p: save_file(state["best_lambda"], str(p), metadata=meta))
    atomic_write(out_dir / HEAD_FILE, lambda p: save_file({"head": head.cpu().contiguous()}, str(p), metadata=meta))
    report = {
        "target": target.key, "target_name": target.name, "num_classes": len(target.classnames),
        "basis_version": snapshot.version, "n_fraction": hp.n_fraction, "seed": hp.seed,
        "base": {"model": base_cfg.model, "pretrained": base_cfg.pretrained, "sha256": base_sha256},
        "hyperparameters": {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)
                            if f.name not in REPORTED_APART},
        "device": str(device), "amp_dtype": amp.dtype_name,
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "trainable_params": model.trainable_count(),
        "start": state["start"],
        "initial_val_accuracy": state["initial_val"], "initial_test_accuracy": state["initial_test"],
        "val_accuracy": state["best_val"],
        "best_epoch": state["best_epoch"], "test_accuracy": test, "history": state["history"],
        "step_seconds": statistics.median(state["step_seconds"]) if state["step_seconds"] else None,
        **rt.peak_memory(), "seconds": time.monotonic() - started,
        "files": {"lambda": LAMBDA_FILE, "head": HEAD_FILE},
    }
    atomic_write_json(out_dir / REPORT_FILE, report)
    return report


class ImageData:
    """``loop.Data`` for the recipe: a target's image splits through ``DataLoader``s, CLIP's image tower
    and the frozen zero-shot head (``head.logits``)."""

    def __init__(self, splits: Splits, head: Tensor, batch_size: int, num_workers: int, rt: Runtime):
        self.splits, self.head, self.batch_size, self.num_workers, self.rt = splits, head, batch_size, num_workers, rt
        self.train_size, self.val_size = len(splits.train), len(splits.val)

    def train_batches(self, order: Tensor, seed: int) -> Iterable[tuple[Tensor, Tensor]]:
        return DataLoader(self.splits.train, batch_size=self.batch_size, sampler=order.tolist(),
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(seed),
                          pin_memory=self.rt.pin_memory, persistent_workers=False)

    def eval_batches(self, split: str) -> Iterable[tuple[Tensor, Tensor]]:
        return DataLoader(getattr(self.splits, split), batch_size=self.batch_size, num_workers=self.num_workers)

    def logits(self, model: nn.Module, images: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        images = images.to(self.rt.device, non_blocking=True)
        return logits(model.call("encode_image", images, weights=weights), self.head)


def evaluate(model: nn.Module, head: Tensor, data: Dataset, hp: AdaptConfig, device: torch.device,
             amp: Amp) -> float:
    """Top-1 accuracy of ``model`` with ``head`` on the image dataset ``data`` (``loop.accuracy``)."""
    rt = Runtime(device, amp, None)
    return accuracy(model, ImageData(Splits(data, data, data), head, hp.batch_size, hp.num_workers, rt), "test", amp)


# --- the resumable state ---

def _fingerprint(job: JobSettings, basis_version: int, base_sha256: str, train_size: int) -> str:
    """What must be equal for a saved state to be continued (not the device or the worker count)."""
    hp = {k: v for k, v in dataclasses.asdict(job.hp).items() if k not in ("device", "num_workers")}
    return json.dumps({"target": job.target, "hp": hp, "classnames": job.classnames, "templates": job.templates,
                       "max_train": job.max_train_samples, "max_eval": job.max_eval_samples,
                       "basis_version": basis_version, "base": base_sha256, "train_size": train_size},
                      sort_keys=True, default=str)
