"""Peak memory of one training step, measured the same way for every method.

On CUDA it is the allocator's own peak statistic (``adapt.device.Allocator``). Elsewhere there is
no allocator statistic, so it is the bytes of the tensors the model holds plus the peak of the
tensors created during the step, counted storage by storage with a dispatch mode (forward and
backward alike).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from axis_stream.adapt.device import Allocator


def resident_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class _LiveTensors(TorchDispatchMode):
    """Tracks the bytes of storages created under it that are still alive, and their peak.

    Storages of ``resident`` tensors (the model's own) are not counted again when an op returns a view of them.
    """

    def __init__(self, resident: list[torch.Tensor]) -> None:
        super().__init__()
        self.resident = {StorageWeakRef(t.untyped_storage()).cdata for t in resident}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata in self.resident:
                    continue
                seen = self.live.get(ref.cdata)
                if seen is not None and not seen[0].expired():
                    continue
                if seen is not None:  # a freed storage's address, reused before it was swept
                    self.current -= seen[1]
                nbytes = t.untyped_storage().nbytes()
                self.live[ref.cdata] = (ref, nbytes)
                self.current += nbytes
        if self.current > self.peak:  # ``current`` still counts freed storages: sweep them, then compare
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                self.current -= self.live.pop(key)[1]
            self.peak = max(self.peak, self.current)
        return out


def step_peak_bytes(module: nn.Module, step: Callable[[], None], allocator: Allocator | None = None) -> int:
    """Peak memory while ``step()`` runs (typically one forward and backward of ``module``).

    With an ``allocator`` (``device.allocator_for(device)``: CUDA's) it is the allocator's peak;
    without one, the module's resident tensors plus the peak of the tensors the step creates.
    """
    if allocator is not None:
        allocator.synchronize()
        allocator.reset_peak()
        step()
        allocator.synchronize()
        return allocator.peak_bytes()
    held = resident_bytes(module)
    with _LiveTensors(list(module.parameters()) + list(module.buffers())) as tracker:
        step()
    return held + tracker.peak
