"""The one Stage 2 loop: setup (the start, epoch 0) -> train (epoch, validate, save state) -> finish (test).

The daemon's recipe (``recipe.adapt``: images through a ``DataLoader``) and the suites
(``experiments.suites.harness``: tensors or strings of a suite task) train through this loop; what
differs between them is a small data adapter (:class:`Data`): which batches an epoch yields for a
given order, how evaluation batches are made, and how the model is called to get logits. The order
of an epoch is the loop's: ``torch.randperm(n)`` seeded by ``(seed, epoch)`` (:func:`epoch_order`),
so a resumed epoch is the same epoch and both callers see the same batches on the same data.

AdamW, cosine over all steps, gradient clipping, AMP through ``device.Runtime``; the best epoch on
validation (epoch 0 is the start) is kept and tested. With ``start_scale = "auto"`` and a model
that can move its start (``SVDAdapted.set_start``), setup scores ``adapt.start``'s candidates on
validation first. A ``state_path`` makes the loop resumable after every finished epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from axis_stream.adapt import start
from axis_stream.adapt.device import Amp, Runtime
from axis_stream.adapt.model import AUTO, AdaptError
from axis_stream.config import AdaptConfig
from axis_stream.store.atomic import atomic_write

Progress = Callable[[dict[str, Any]], None]
Batch = tuple[Any, Tensor]

log = logging.getLogger(__name__)


class Data(Protocol):
    """A target's data as the loop uses it (the data adapter)."""

    train_size: int
    val_size: int

    def train_batches(self, order: Tensor, seed: int) -> Iterable[Batch]:
        """The training batches of one epoch, examples in ``order``; ``seed`` seeds anything else random."""

    def eval_batches(self, split: str) -> Iterable[Batch]:
        """The batches of ``"val"`` or ``"test"``."""

    def logits(self, model: nn.Module, inputs: Any, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """Class scores of ``model`` on one batch of inputs (``weights``: one materialisation shared by calls)."""


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The order of the training examples in ``epoch``: fixed by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


@torch.no_grad()
def top1(batches: Iterable[Batch], scores: Callable[[Any], Tensor]) -> float:
    """Top-1 accuracy of ``scores(inputs)`` over ``batches`` of (inputs, labels); 0 when there are none."""
    correct = seen = 0
    for inputs, labels in batches:
        pred = scores(inputs).argmax(dim=-1).cpu()
        correct += int((pred == labels.cpu()).sum())
        seen += len(labels)
    return correct / max(seen, 1)


def accuracy(model: nn.Module, data: Data, split: str, amp: Amp | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``data``'s ``split``; the matrices are materialised once."""
    model.eval()
    with torch.no_grad():
        weights = model.weights()

    def scores(inputs: Any) -> Tensor:
        with amp.autocast() if amp is not None else nullcontext():
            return data.logits(model, inputs, weights)

    return top1(data.eval_batches(split), scores)


class Loop:
    """Stage 2 of ``model`` (its trainable parameters) on ``data`` with the settings ``hp``, on ``rt``.

    ``state_path`` (with ``fingerprint``: what must be equal for a saved state to be continued)
    makes it resumable; without one nothing is written.
    """

    def __init__(self, model: nn.Module, data: Data, hp: AdaptConfig, rt: Runtime, progress: Progress, *,
                 state_path: Path | None = None, fingerprint: str = ""):
        self.model, self.data, self.hp, self.rt, self.progress = model, data, hp, rt, progress
        self.state_path, self.fingerprint = state_path, fingerprint
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps_per_epoch = math.ceil(data.train_size / hp.batch_size)
        self.optimizer = torch.optim.AdamW(self.params, lr=hp.lr, weight_decay=hp.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                    T_max=self.steps_per_epoch * hp.epochs)
        self.state: dict[str, Any] = {}

    def accuracy(self, split: str) -> float:
        return accuracy(self.model, self.data, split, self.rt.amp)

    # --- setup: the start, or the saved state ---

    def setup(self) -> dict[str, Any]:
        """Epoch 0: choose the start (``"auto"``) and measure it on validation and test; or continue a saved state."""
        saved = self._load_state()
        if saved is not None:
            self.model.load_lambdas(saved.pop("lam"), source=str(self.state_path))
            self.optimizer.load_state_dict(saved.pop("optimizer"))
            self.scheduler.load_state_dict(saved.pop("scheduler"))
            scaler = saved.pop("scaler")
            if scaler:
                self.rt.amp.scaler.load_state_dict(scaler)
            self.state = saved
            return self.state
        choice, initial_val = self.choose_start()
        initial_test = self.accuracy("test")
        self.progress({"phase": "validate", "epoch": 0, "epochs": self.hp.epochs, "val_accuracy": initial_val})
        self.state = {"fingerprint": self.fingerprint, "epoch": 0, "best_epoch": 0, "best_val": initial_val,
                      "initial_val": initial_val, "initial_test": initial_test, "start": choice,
                      "best_lambda": self.model.lambdas(), "history": [], "step_seconds": []}
        return self.state

    def choose_start(self) -> tuple[dict[str, Any] | None, float]:
        """Where Lambda starts, and its validation accuracy: ``adapt.start``'s best candidate for
        ``"auto"``, the model's own start otherwise (``None`` for a model without a spectrum start)."""
        scale = self.hp.start_scale
        if not hasattr(self.model, "set_start"):
            return None, self.accuracy("val")
        if scale != AUTO:
            return start.fixed(scale), self.accuracy("val")
        scored = []
        for cand in start.candidates(self.model.names, self.model.calibration):
            self.model.set_start(cand.scales)
            scored.append((cand, self.accuracy("val")))
        chosen = start.choose([acc for _, acc in scored], self.data.val_size)
        self.model.set_start(scored[chosen][0].scales)
        choice = start.record(scored, chosen, self.data.val_size)
        log.info("Stage 2 starts from %s (mean scale %.3g): %s", choice["chosen"], choice["scale"],
                 ", ".join(f"{r['name']} {r['val_accuracy']:.2%}" for r in choice["candidates"]))
        self.progress({"phase": "start", **choice})
        return choice, scored[chosen][1]

    # --- train ---

    def train(self) -> dict[str, Any]:
        """The remaining epochs, each validated, the best Lambda kept, the state saved after each."""
        state, hp = self.state, self.hp
        for epoch in range(state["epoch"] + 1, hp.epochs + 1):
            loss, seconds = self.epoch(epoch)
            val = self.accuracy("val")
            if val > state["best_val"]:
                state.update(best_val=val, best_epoch=epoch, best_lambda=self.model.lambdas())
            state["history"].append({"epoch": epoch, "train_loss": loss, "val_accuracy": val})
            state["step_seconds"] += seconds
            state["epoch"] = epoch
            self._save_state()
            self.progress({"phase": "validate", "epoch": epoch, "epochs": hp.epochs, "val_accuracy": val,
                           "best_val_accuracy": state["best_val"]})
        return state

    def epoch(self, epoch: int) -> tuple[float, list[float]]:
        """One pass over the training data in :func:`epoch_order`; returns mean loss and compute seconds per step."""
        hp, rt, amp, model = self.hp, self.rt, self.rt.amp, self.model
        seed = epoch_seed(hp.seed, epoch)
        order = epoch_order(self.data.train_size, hp.seed, epoch)
        torch.manual_seed(seed)  # augmentation and dropout draws, so a resumed epoch is the same epoch
        total, count, seconds = 0.0, 0, []
        model.train()
        for step, (inputs, labels) in enumerate(self.data.train_batches(order, seed), 1):
            labels = labels.to(rt.device, non_blocking=True)
            tic = time.perf_counter()
            with amp.autocast():
                loss = F.cross_entropy(self.data.logits(model, inputs), labels)
            self.optimizer.zero_grad(set_to_none=True)
            amp.scaler.scale(loss).backward()
            amp.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, hp.grad_clip)
            amp.scaler.step(self.optimizer)
            amp.scaler.update()
            self.scheduler.step()
            rt.synchronize()
            seconds.append(time.perf_counter() - tic)
            total += float(loss.detach()) * len(labels)
            count += len(labels)
            self.progress({"phase": "train", "epoch": epoch, "epochs": hp.epochs, "step": step,
                           "of": self.steps_per_epoch, "loss": float(loss.detach())})
        return total / max(count, 1), seconds

    # --- finish ---

    def finish(self) -> float:
        """The best Lambda back in the model, and its test accuracy."""
        self.model.load_lambdas(self.state["best_lambda"])
        test = self.accuracy("test")
        self.progress({"phase": "test", "test_accuracy": test})
        return test

    def run(self) -> float:
        """setup, train, finish; returns the test accuracy (the rest is in ``state``)."""
        self.setup()
        self.train()
        return self.finish()

    # --- the resumable state ---

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        saved = dict(self.state, lam=self.model.lambdas(), optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), scaler=self.rt.amp.scaler.state_dict())
        atomic_write(self.state_path, lambda p: torch.save(saved, p))

    def _load_state(self) -> dict[str, Any] | None:
        path = self.state_path
        if path is None or not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a state we wrote ourselves is atomic; anything else is not ours to guess at
            raise AdaptError(f"{path}: cannot read the saved Stage 2 state ({exc}); remove it to start over") from None
        if state.get("fingerprint") != self.fingerprint:
            raise AdaptError(f"{path}: saved by a Stage 2 run with other settings, basis or data; "
                             f"use another job folder or remove it to start over")
        state.setdefault("start", None)  # saved before the start was recorded
        return state
