"""``axis-stream quickstart``: the whole product on an embedded default, in about a minute on a CPU.

Top to bottom: a workspace; a tiny open_clip CLIP and its weights file; small image tasks generated
here (stripes of a colour, direction and width, one class per combination); real fine-tunes of the
visual tower on three of them (the source checkpoints); the daemon, started in this process on a
config for the workspace; the checkpoints dropped into its watched folder and folded one by one; a
Stage 2 adaptation job queued through the control socket on a fourth task; and a report: the basis,
each source's fold, the job's result, and an excerpt of the Prometheus metrics.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from axis_stream import config
from axis_stream.adapt.data import transforms_for
from axis_stream.adapt.head import logits, zero_shot_head
from axis_stream.errors import AxisError
from axis_stream.service import api
from axis_stream.service.daemon import Daemon, setup_logging
from axis_stream.store import models
from axis_stream.testing import wait_until

IMAGE_SIZE = models.TINY_CLIP["vision_cfg"]["image_size"]
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.9, 0.85, 0.1)}
WIDTHS = {"wide": 2, "fine": 6}                  # stripe cycles across the image
DIRECTIONS = ("horizontal", "vertical")          # both survive Stage 2's horizontal-flip augmentation


@dataclass(frozen=True)
class Task:
    """A 4-way classification of striped images; a class is (width, colour, direction)."""

    name: str
    classes: tuple[tuple[str, str, str], ...]

    @property
    def classnames(self) -> list[str]:
        return [f"{w} {c} {d} stripes" for w, c, d in self.classes]


SOURCES = (
    Task("source-colours", (("wide", "red", "horizontal"), ("wide", "green", "horizontal"),
                            ("wide", "blue", "horizontal"), ("wide", "yellow", "horizontal"))),
    Task("source-directions", (("fine", "red", "horizontal"), ("fine", "red", "vertical"),
                               ("fine", "blue", "horizontal"), ("fine", "blue", "vertical"))),
    Task("source-widths", (("wide", "green", "vertical"), ("fine", "green", "vertical"),
                           ("wide", "yellow", "vertical"), ("fine", "yellow", "vertical"))),
)
TARGET = Task("target-mixed", (("wide", "blue", "vertical"), ("fine", "yellow", "horizontal"),
                               ("fine", "green", "horizontal"), ("wide", "red", "vertical")))


class QuickstartError(AxisError):
    """A step of the quickstart did not finish in time or failed."""


def draw(task: Task, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each class (uint8 ``[N, H, W, 3]``) and their labels: random phase and noise."""
    rng = np.random.default_rng(seed)
    grid = np.arange(IMAGE_SIZE) / IMAGE_SIZE
    images, labels = [], []
    for label, (width, colour, direction) in enumerate(task.classes):
        for _ in range(per_class):
            coord = grid[:, None] if direction == "horizontal" else grid[None, :]
            wave = np.sin(2 * np.pi * (WIDTHS[width] * coord + rng.uniform()))
            img = 0.5 + 0.4 * wave[..., None] * np.array(COLOURS[colour]) + rng.normal(0, 0.08, (IMAGE_SIZE,) * 2 + (3,))
            images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels)


def write_image_folder(task: Task, root: Path, per_class: dict[str, int], seed: int) -> Path:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: the layout of an imagefolder target."""
    for i, (split, n) in enumerate(per_class.items()):
        images, labels = draw(task, n, seed + i)
        for k, (img, label) in enumerate(zip(images, labels)):
            folder = root / split / task.classnames[label].replace(" ", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{k:04d}.png")
    return root


def build_base(ws: Path) -> tuple[config.BaseConfig, torch.nn.Module]:
    """The tiny CLIP (registered from a JSON config) with seeded random weights saved to a local file."""
    cfg_path = ws / "axis-tiny.json"
    cfg_path.write_text(json.dumps(models.TINY_CLIP, indent=1))
    torch.manual_seed(0)
    model = models.create_base(config.BaseConfig(model="axis-tiny", pretrained="", model_config=cfg_path))
    weights = ws / "axis-tiny-base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return config.BaseConfig(model="axis-tiny", pretrained=str(weights), model_config=cfg_path), model


def as_batch(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """Images through open_clip's evaluation transform for ``model``, stacked."""
    _, eval_tf = transforms_for(model)
    return torch.stack([eval_tf(Image.fromarray(img)) for img in images])


def head_for(model: torch.nn.Module, task: Task) -> torch.Tensor:
    """The frozen CLIP zero-shot head of ``task`` from the model's text tower (as Stage 2 builds it)."""
    tokenizer = models.tokenizer_for(config.BaseConfig(model="axis-tiny"))
    return zero_shot_head(model, tokenizer, task.classnames, ["a photo of {}."])


def accuracy(model: torch.nn.Module, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((logits(model.encode_image(x), head).argmax(-1) == y).float().mean())


def finetune(base: torch.nn.Module, task: Task, steps: int, seed: int) -> tuple[dict[str, torch.Tensor], float, float]:
    """Full fine-tuning of the visual tower against the frozen zero-shot head; (state dict, acc before, after)."""
    model = copy.deepcopy(base)
    head = head_for(model, task)
    images, labels = draw(task, 48, seed)
    x, y = as_batch(model, images), torch.as_tensor(labels)
    n_test = len(y) // 4
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    before = accuracy(model.eval(), head, x[test], y[test])
    params = list(model.visual.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (32,), generator=g)]
        loss = F.cross_entropy(logits(model.encode_image(x[batch]), head), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy(model.eval(), head, x[test], y[test])
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}, before, after


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(ws: Path, base: config.BaseConfig, epochs: int) -> Path:
    """A config for the workspace: short intervals, metrics on a free local port, a quick Stage 2 on CPU."""
    path = ws / "axis-stream.toml"
    path.write_text(f"""# written by `axis-stream quickstart`; see config/axis-stream.toml for every setting
[paths]
state_dir = "state"
watch_dir = "incoming"
log_file = "axis-stream.log"
[base]
model = "{base.model}"
pretrained = "{base.pretrained}"
model_config = "{base.model_config}"
[watch]
stable_interval_s = 0.5
poll_interval_s = 0.2
[adapt]
epochs = {epochs}
batch_size = 32
num_workers = 0
lr = 0.05
[metrics]
address = "127.0.0.1:{free_port()}"
[log]
level = "INFO"
""")
    return path


def _wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll ``check()`` until it returns something truthy; QuickstartError after ``timeout`` s."""
    return wait_until(check, timeout, what, interval=0.1, error=lambda message: QuickstartError(f"quickstart: {message}"))


METRICS_SHOWN = ("axis_stream_folds_total", "axis_stream_basis_version", "axis_stream_sources_folded",
                 "axis_stream_basis_size_bytes", "axis_stream_last_fold_energy_kept_ratio",
                 "axis_stream_fold_duration_seconds_count", "axis_stream_fold_duration_seconds_sum",
                 "axis_stream_watch_queue_depth", "axis_stream_jobs", "axis_stream_job_duration_seconds_count",
                 "axis_stream_last_accuracy_ratio", "axis_stream_adapt_start_scale", "axis_stream_build_info")


def metrics_excerpt(address: str) -> list[str]:
    """The metrics a first look at the daemon wants, from its /metrics endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [line for line in text.splitlines()
            if line.split("{")[0].split(" ")[0] in METRICS_SHOWN and not line.endswith(" 0.0")]


def run(workdir: str | Path | None = None, *, steps: int = 40, epochs: int = 3, seed: int = 0,
        timeout: float = 180.0) -> Iterator[str]:
    """Run the quickstart, yielding what happens as lines of text."""
    # A model this small gains nothing from several threads, and OpenMP threads spinning on a busy
    # 2-core machine cost far more than they give: one thread here and in the job's process.
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level      # the daemon logs to the workspace meanwhile
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"          # inherited by the job's process
    try:
        yield from _run(workdir, steps=steps, epochs=epochs, seed=seed, timeout=timeout)
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
        if omp is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def _run(workdir: str | Path | None, *, steps: int, epochs: int, seed: int, timeout: float) -> Iterator[str]:
    t0 = time.monotonic()
    ws = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="axis-stream-quickstart-"))
    ws.mkdir(parents=True, exist_ok=True)
    yield f"workspace: {ws}"

    # 1. the base model, and three real fine-tunes of it: the source checkpoints
    base_cfg, base = build_base(ws)
    yield f"base model: open_clip {base_cfg.model} {models.TINY_CLIP['vision_cfg']}, weights {Path(base_cfg.pretrained).name}"
    outbox = ws / "checkpoints"
    outbox.mkdir(exist_ok=True)
    sources = []
    for i, task in enumerate(SOURCES):
        state, before, after = finetune(base, task, steps, seed + i)
        path = outbox / f"{task.name}.safetensors"
        save_file(state, path)
        sources.append(path)
        yield (f"fine-tuned {task.name} ({', '.join(task.classnames[:2])}, ...): zero-shot accuracy "
               f"{before:.0%} -> {after:.0%} after {steps} steps")
    target = write_image_folder(TARGET, ws / "data" / TARGET.name, {"train": 40, "test": 24}, seed + 100)
    yield f"target task {TARGET.name}: {', '.join(TARGET.classnames)} (images in {target})"

    # 2. the daemon, in this process, on a config for the workspace
    cfg = config.load(write_config(ws, base_cfg, epochs), env={})
    setup_logging(cfg, stderr=False)
    daemon = Daemon(cfg, env={})
    daemon.start()
    writer = threading.Thread(target=daemon.run, name="fold-writer", daemon=True)
    writer.start()
    try:
        yield (f"daemon ready: watching {cfg.paths.watch_dir}, control socket {cfg.paths.socket}, "
               f"metrics http://{cfg.metrics.address}/metrics, log {cfg.paths.log_file}")

        # 3. drop the checkpoints (copy under a .partial name, then rename) and wait for the folds
        for path in sources:
            shutil.copyfile(path, cfg.paths.watch_dir / (path.name + ".partial"))
            os.replace(cfg.paths.watch_dir / (path.name + ".partial"), cfg.paths.watch_dir / path.name)
        yield f"dropped {len(sources)} checkpoints into {cfg.paths.watch_dir}"
        socket_path = cfg.paths.socket
        _wait("folding the checkpoints", lambda: api.request(socket_path, "status")["folds"]["folded"]
                   >= len(sources), timeout)
        history = api.request(socket_path, "basis.history")
        yield f"basis version {history['version']}: {len(history['ledger'])} sources folded, in arrival order:"
        for entry in history["ledger"]:
            yield (f"  v{entry['version']} {entry['file']}: {entry['new_kept_total']} components kept from it, "
                   f"{entry['energy_kept']:.0%} of its energy kept, ||tau||/||theta|| {entry['relative_norm']:.3f}, "
                   f"{entry['seconds']:.2f} s")

        # 4. an adaptation job through the control socket, as `axis-stream adapt --target ...` queues it
        job = api.request(socket_path, "adapt", target=f"imagefolder:{target}")
        yield f"queued adaptation job {job['id']} on basis v{history['version']}: target {TARGET.name}, {epochs} epochs"
        def finished() -> dict[str, Any] | None:
            record = api.request(socket_path, "jobs.show", id=job["id"])
            return record if record["state"] in ("succeeded", "failed", "cancelled") else None

        job = _wait(f"job {job['id']}", finished, timeout)
        if job["state"] != "succeeded":
            raise QuickstartError(f"quickstart: job {job['id']} {job['state']}: {job['error']} "
                                  f"(log: {job['log_path']})")
        r = job["result"]
        yield (f"job {job['id']} succeeded in {job['finished_at'] - job['started_at']:.1f} s: "
               f"{r['trainable_params']} trainable singular values; test accuracy "
               f"{r['initial_test_accuracy']:.0%} (merged basis) -> {r['test_accuracy']:.0%} (adapted), "
               f"validation {r['val_accuracy']:.0%}; files in {Path(job['log_path']).parent}")
        yield "metrics excerpt:"
        yield from (f"  {line}" for line in metrics_excerpt(cfg.metrics.address))
    finally:
        daemon.request_stop("quickstart done")
        writer.join(timeout=60)
        daemon.close()
    yield f"done in {time.monotonic() - t0:.0f} s; run the daemon yourself: axis-stream serve --config {ws / 'axis-stream.toml'}"
