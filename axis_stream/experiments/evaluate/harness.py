"""Executing one planned run: the task vectors, its basis, Stage 2 or a reference method, its rows."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from axis_stream.adapt.data import make_splits, resolve_target, transforms_for
from axis_stream.adapt.device import allocator_for, amp_for, pick_device
from axis_stream.adapt.head import logits, zero_shot_head
from axis_stream.adapt.recipe import HEAD_FILE, JobSettings, adapt, evaluate
from axis_stream.config import AdaptConfig, ConfigError
from axis_stream.core import layout, merges, stage1
from axis_stream.errors import AxisError
from axis_stream.experiments.baselines import references
from axis_stream.experiments.baselines.memory import step_peak_bytes
from axis_stream.experiments.evaluate import merged
from axis_stream.experiments.evaluate.experiment import Echo, Experiment, Robustness, SourceSpec
from axis_stream.experiments.evaluate.plan import Run
from axis_stream.experiments.methods import Snapshot
from axis_stream.store import ingest, models


@dataclass
class Outcome:
    """What one run measured, and the trained model and head (kept for the test-time studies)."""

    model: nn.Module
    head: Tensor
    trainable: int
    val_accuracy: float
    test_accuracy: float
    step_seconds: float | None


def treated(run: Run, task_vectors: Sequence[dict[str, Tensor]], rb: Robustness,
            matrices: Collection[str]) -> list[dict[str, Tensor]]:
    """The run's task vectors (one per source, in order) after its robustness treatment: magnitude
    pruning of every tensor, and Gaussian noise on the matrices of the one corrupted source."""
    out = []
    for i, tv in enumerate(task_vectors):
        if run.prune_ratio > 0:
            tv = {n: merges.magnitude_prune(d, run.prune_ratio) for n, d in tv.items()}
        if run.corrupt and i == min(rb.corrupt_index, len(task_vectors) - 1):
            tv = {n: merges.corrupt(d, merges.tensor_seed(0, n), rb.corrupt_scale) if n in matrices else d
                  for n, d in tv.items()}
        out.append(tv)
    return out


class Harness:
    """The state shared by the runs of one evaluation: the base's names, the loaded task vectors, caches."""

    def __init__(self, exp: Experiment, echo: Echo):
        self.exp = exp
        self.echo = echo
        self.device = pick_device(exp.adapt.device)
        base_sd = models.create_base(exp.base).state_dict()
        self.base_sd = {k: v.detach() for k, v in base_sd.items()}
        self.matrices = layout.matrix_names(self.base_sd, exp.stage1.matrix_patterns, exp.stage1.conv_as_matrix)
        if not self.matrices:
            raise ConfigError(f"stage1.matrix_patterns: no parameter of {exp.base.model} matches "
                              f"{exp.stage1.matrix_patterns}")
        self.shapes = [tuple(layout.as_matrix(self.base_sd[n]).shape) for n in self.matrices]
        self._task_vectors: dict[str, dict[str, Tensor]] = {}
        self._basis: tuple[tuple, Snapshot] | None = None
        self._train_sizes: dict[str, int] = {}

    def task_vector(self, source: SourceSpec) -> dict[str, Tensor]:
        """``theta_i - theta_pre`` of one source, read and validated once (lazily, tensor by tensor)."""
        if source.name not in self._task_vectors:
            with ingest.read_checkpoint(source.path, self.base_sd, required=self.matrices) as ckpt:
                tv = {n: d for n in ckpt.names if (d := ckpt.delta(n)) is not None}
                ckpt.finish()
            self._task_vectors[source.name] = tv
        return self._task_vectors[source.name]

    def prepared(self, run: Run) -> list[dict[str, Tensor]]:
        """The run's source task vectors after the robustness treatment (corruption, pruning)."""
        return treated(run, [self.task_vector(s) for s in run.sources], self.exp.robustness, self.matrices)

    def basis(self, run: Run) -> Snapshot:
        """The run's merged basis, built once for all the budgets and data fractions that share it."""
        key = run.basis_key()
        if self._basis is None or self._basis[0] != key:
            factors, means = merges.build_basis(run.method.name, self.prepared(run), self.matrices,
                                                k_fraction=run.k_fraction, seed=run.seed, params=run.method.params)
            self._basis = (key, Snapshot(0, factors, means))
        return self._basis[1]

    def budget_count(self, n_fraction: float) -> int:
        """AXIS's Stage 2 trainable count at N: the top ``k_for(shape, N)`` values of every matrix."""
        return sum(stage1.k_for(shape, n_fraction) for shape in self.shapes)

    # --- one run ---

    def max_train(self, run: Run, hp: AdaptConfig, base: nn.Module) -> int | None:
        """The train-split cap for the run's data fraction (of the split the experiment otherwise uses)."""
        if run.train_fraction >= 1:
            return self.exp.max_train_samples
        name = run.target.name
        if name not in self._train_sizes:
            self._train_sizes[name] = len(self.splits(run, hp, self.exp.max_train_samples, base).train)
        return max(1, int(run.train_fraction * self._train_sizes[name]))

    def target(self, run: Run):
        t = run.target
        return resolve_target(t.dataset, self.exp.data_root, t.classnames or None, t.templates or None)

    def splits(self, run: Run, hp: AdaptConfig, max_train: int | None, base: nn.Module):
        return make_splits(self.target(run), *transforms_for(base), val_fraction=hp.val_fraction,
                           val_max=hp.val_max, max_train=max_train, max_eval=self.exp.max_eval_samples)

    def execute(self, run: Run, out_dir: Path) -> list[dict[str, Any]]:
        """Train and evaluate one run; returns its rows (one per test-time patch-dropout level)."""
        started = time.monotonic()
        hp = run.settings(self.exp.adapt)
        base = models.create_base(self.exp.base).to(self.device)
        max_train = self.max_train(run, hp, base)
        if not run.method.trains:
            outcome = self._reference(run, hp, max_train, base)
        else:
            outcome = self._stage2(run, hp, max_train, base, out_dir)
        splits = self.splits(run, hp, max_train, outcome.model.base)
        peak = self._peak_memory(outcome, splits.train, hp.batch_size)
        rows = []
        for row in run.rows(self.exp.robustness.patch_dropout):
            if row["patch_dropout"] == 0:
                test = outcome.test_accuracy
            else:
                with references.patch_dropout(outcome.model.base, row["patch_dropout"], seed=0):
                    test = evaluate(outcome.model, outcome.head, splits.test, hp, self.device, amp_for(self.device, hp.amp))
            rows.append(dict(row, trainable_params=outcome.trainable, val_accuracy=outcome.val_accuracy,
                             test_accuracy=test, peak_memory_mb=peak / 2**20, step_seconds=outcome.step_seconds,
                             seconds=time.monotonic() - started))
        return rows

    def _stage2(self, run: Run, hp: AdaptConfig, max_train: int | None, base: nn.Module, out_dir: Path) -> Outcome:
        """Stage 2's recipe, unchanged, on the run's model: a merged basis, aTLAS, or LoRA."""
        from safetensors.torch import load_file

        built: list[nn.Module] = []
        snapshot = self.basis(run) if run.method.is_merge else Snapshot(0, {}, {})

        def build(base: nn.Module, hp: AdaptConfig) -> nn.Module:
            built.append(run.method.entry.build(self, run, hp, base))
            return built[-1]

        t = run.target
        job = JobSettings(t.dataset, hp, self.exp.data_root, t.classnames or None, t.templates or None,
                          max_train_samples=max_train, max_eval_samples=self.exp.max_eval_samples)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = adapt(base, self.exp.base, snapshot, job, out_dir, self._progress(run), build=build)
        head = load_file(str(out_dir / HEAD_FILE))["head"].to(self.device)
        return Outcome(built[0], head, report["trainable_params"], report["val_accuracy"], report["test_accuracy"],
                       report.get("step_seconds"))

    def _reference(self, run: Run, hp: AdaptConfig, max_train: int | None, base: nn.Module) -> Outcome:
        """Zero-shot and a merged model without Stage 2 (evaluation only), and the linear probe (the
        head trained on frozen features). The head is always the base's zero-shot head."""
        import open_clip

        target = self.target(run)
        head = zero_shot_head(base, open_clip.get_tokenizer(self.exp.base.model), target.classnames,
                              target.templates, device=self.device)
        if run.method.merged_only:
            delta = merged.merged_delta(run.method.name, self.prepared(run), set(self.matrices),
                                        params=run.method.params, k_fraction=run.k_fraction, seed=run.seed)
            base.load_state_dict(merged.with_base(self.base_sd, delta))
        model = references.Frozen(base)
        splits = self.splits(run, hp, max_train, base)
        if not run.method.fits:
            amp = amp_for(self.device, hp.amp)
            val = evaluate(model, head, splits.val, hp, self.device, amp)
            test = evaluate(model, head, splits.test, hp, self.device, amp)
            return Outcome(model, head, 0, val, test, None)
        feats = {name: references.features(model, getattr(splits, name), hp.batch_size, self.device, hp.num_workers)
                 for name in ("train", "val", "test")}
        tic = time.perf_counter()
        head, val = references.linear_probe(feats["train"], feats["val"], head, epochs=hp.epochs, lr=hp.lr,
                                            weight_decay=hp.weight_decay, batch_size=hp.batch_size,
                                            grad_clip=hp.grad_clip, seed=hp.seed)
        steps = hp.epochs * math.ceil(len(feats["train"][1]) / hp.batch_size)
        test = references.accuracy(*feats["test"], head)
        return Outcome(model, head, head.numel(), val, test, (time.perf_counter() - tic) / max(steps, 1))

    def _peak_memory(self, outcome: Outcome, train: Any, batch_size: int) -> int:
        """Peak memory of one training step of the run's model on one batch (``baselines.memory``)."""
        images, labels = next(iter(torch.utils.data.DataLoader(train, batch_size=batch_size)))
        images, labels = images.to(self.device), labels.to(self.device)
        model = outcome.model
        model.train()

        def step() -> None:
            loss = F.cross_entropy(logits(model.call("encode_image", images), outcome.head), labels)
            if loss.requires_grad:
                loss.backward()

        peak = step_peak_bytes(model, step, allocator_for(self.device))
        model.zero_grad(set_to_none=True)
        return peak

    def _progress(self, run: Run) -> Callable[[dict[str, Any]], None]:
        def progress(event: dict[str, Any]) -> None:
            if event.get("phase") == "validate":
                self.echo(f"    epoch {event['epoch']}/{event['epochs']}: val {event['val_accuracy']:.2%}")
        return progress


RUN_ERRORS = (AxisError, ValueError, RuntimeError)
"""What a failing run raises (bad data, a method that cannot apply): reported and left out, retried by a restart."""
