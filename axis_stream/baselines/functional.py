"""Models whose weights are a function of a few trainable values, run through ``functional_call``.

aTLAS and LoRA both materialise their adapted weights once per call and run the frozen base
module with them, like Stage 2's ``SVDAdapted``, so one head, loop and evaluation serve them all.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call


class _Method(nn.Module):
    """Calls one method of the wrapped module, so ``functional_call`` can run e.g. ``encode_image``."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


class Materialized(nn.Module):
    """A frozen ``base`` run with the weights ``weights()`` returns (subclasses define it and their trainables)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False)
        self._methods: dict[str, _Method] = {}

    def weights(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``base.<method>(*args, **kwargs)`` with the weights materialised once for this call."""
        if method not in self._methods:
            self._methods[method] = _Method(self.base, method)
        weights = {f"module.{name}": w for name, w in self.weights().items()}
        return functional_call(self._methods[method], weights, args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("forward", *args, **kwargs)
