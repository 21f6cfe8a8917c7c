"""Where Stage 2 runs: the one place that chooses the device, its mixed precision and its memory statistic.

Everything that differs on CUDA is decided here, once, and handed on as a ``Runtime``: the recipe,
the evaluation harness, the baselines' memory measurement and the benchmarks never ask
``device.type == "cuda"`` themselves. That keeps the CUDA path reachable on a machine without a GPU:
a CPU test builds ``Runtime(cpu, Amp(cpu, torch.bfloat16), fake_allocator)`` and runs the very code a
GPU job runs (autocast, loss scaling with float16, the allocator's barrier and peak statistic).
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from axis_stream.adapt.model import AdaptError


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdaptError(f"adapt.device is {name!r} but CUDA is not available")
    return device


@dataclass(frozen=True)
class Allocator:
    """A device allocator's barrier and peak statistic: what step timing and peak memory need of a GPU."""

    kind: str                          # names the statistic in reports, e.g. "cuda_max_allocated"
    synchronize: Callable[[], None]    # wait for queued kernels, before reading a clock
    reset_peak: Callable[[], None]
    peak_bytes: Callable[[], int]


def allocator_for(device: torch.device) -> Allocator | None:
    """The CUDA caching allocator's statistics for a CUDA device; ``None`` elsewhere (no allocator statistic)."""
    if device.type != "cuda":
        return None
    return Allocator("cuda_max_allocated", partial(torch.cuda.synchronize, device),
                     partial(torch.cuda.reset_peak_memory_stats, device),
                     lambda: int(torch.cuda.max_memory_allocated(device)))


class Amp:
    """Mixed precision: autocast to ``dtype`` on ``device`` (``None``: off), with loss scaling for float16."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.device = device
        self.dtype = dtype
        self.enabled = dtype is not None
        self.dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.enabled else nullcontext()


def amp_for(device: torch.device, enabled: bool) -> Amp:
    """The ``adapt.amp`` switch: on CUDA, bfloat16 where supported, else float16; off on CPU."""
    dtype = None
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Amp(device, dtype)


@dataclass(frozen=True)
class Runtime:
    """A device with its mixed precision and, where it has one, its allocator."""

    device: torch.device
    amp: Amp
    allocator: Allocator | None

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        """Wait for the device's queued work, so that a clock read after it measures the work."""
        if self.allocator is not None:
            self.allocator.synchronize()

    def reset_peak(self) -> None:
        if self.allocator is not None:
            self.allocator.reset_peak()

    def peak_memory(self) -> dict[str, Any]:
        """The allocator's peak since ``reset_peak``, else this process's peak RSS, and which one it is."""
        if self.allocator is not None:
            return {"peak_memory_bytes": self.allocator.peak_bytes(), "peak_memory_kind": self.allocator.kind}
        return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_memory_kind": "process_max_rss"}


def runtime_for(name: str, amp: bool) -> Runtime:
    """The one place Stage 2 chooses where it runs: ``adapt.device`` and the ``adapt.amp`` switch."""
    device = pick_device(name)
    return Runtime(device, amp_for(device, amp), allocator_for(device))
