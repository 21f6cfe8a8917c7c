"""Models whose weights are a function of a few trainable values, run through ``functional_call``.

aTLAS, LoRA and the zero-shot reference materialise their weights once per call and run the frozen
base module with them, exactly like Stage 2's ``SVDAdapted``, and expose the same surface
(``call``, ``weights``, ``trainable_count``, ``lambdas``, ``load_lambdas``), so Stage 2's head,
training loop and evaluation serve them all unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from axis_stream.adapt.model import AdaptError, FunctionalModel


class Materialized(FunctionalModel):
    """A ``FunctionalModel`` whose trainables are the subclass's own parameters."""

    def trained(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by name (the base is frozen)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trained().values())

    def lambdas(self) -> dict[str, Tensor]:
        """Detached copies of the trained values (Stage 2 saves and restores its best values with these)."""
        return {n: p.detach().clone() for n, p in self.trained().items()}

    def load_lambdas(self, values: Mapping[str, Tensor], source: str = "saved values") -> None:
        trained = self.trained()
        if set(values) != set(trained) or any(values[n].shape != p.shape for n, p in trained.items()):
            raise AdaptError(f"{source}: the saved values do not match this model's trainable parameters")
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(values[name])
