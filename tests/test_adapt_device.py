"""The CUDA path of Stage 2 without a GPU: the one device choice, AMP on CPU, and a pluggable allocator."""

from __future__ import annotations

import pytest
import torch
from test_adapt_data import write_colour_folders
from test_adapt_model import snapshot_from_sources

from axis_stream import config
from axis_stream.adapt import device
from axis_stream.adapt.device import Allocator, Amp, Runtime, runtime_for
from axis_stream.adapt.model import AdaptError
from axis_stream.adapt.recipe import adapt, job_settings
from axis_stream.experiments.baselines.memory import step_peak_bytes
from axis_stream.store import models


class FakeAllocator:
    """Stands in for CUDA's allocator: records the calls, reports a fixed peak."""

    def __init__(self, peak: int = 123_456):
        self.calls: list[str] = []
        self.peak = peak

    def allocator(self) -> Allocator:
        return Allocator("fake_allocator", lambda: self.calls.append("synchronize"),
                         lambda: self.calls.append("reset"), lambda: self.calls.append("peak") or self.peak)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA "present" for the device choice; its allocator calls land in a list."""
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d: calls.append(("synchronize", d)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("peak", d)) or 789)
    return calls


@pytest.mark.parametrize("bf16, dtype, scaled", [(True, torch.bfloat16, False), (False, torch.float16, True)])
def test_the_one_device_choice_takes_the_cuda_path_when_cuda_is_there(fake_cuda, monkeypatch, bf16, dtype, scaled):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    rt = runtime_for("auto", amp=True)
    assert rt.device == torch.device("cuda") and rt.pin_memory
    assert rt.amp.dtype == dtype and rt.amp.dtype_name == str(dtype)[6:] and rt.amp.scaler.is_enabled() == scaled
    rt.reset_peak()
    rt.synchronize()
    assert rt.peak_memory() == {"peak_memory_bytes": 789, "peak_memory_kind": "cuda_max_allocated"}
    assert fake_cuda == [("reset", rt.device), ("synchronize", rt.device), ("peak", rt.device)]
    assert runtime_for("cuda:0", amp=False).amp.enabled is False  # the switch off: full precision on CUDA too


def test_cpu_has_no_amp_and_no_allocator_and_cuda_must_exist(monkeypatch):
    rt = runtime_for("cpu", amp=True)
    assert rt.device == torch.device("cpu") and not rt.amp.enabled and rt.amp.dtype_name is None
    assert rt.allocator is None and not rt.pin_memory
    rt.synchronize()
    assert rt.peak_memory()["peak_memory_kind"] == "process_max_rss" and rt.peak_memory()["peak_memory_bytes"] > 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.pick_device("auto") == torch.device("cpu")
    with pytest.raises(AdaptError, match="'cuda' but CUDA is not available"):
        runtime_for("cuda", amp=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stage2_runs_the_gpu_code_path_on_cpu(tiny_base, tmp_path, dtype):
    """AMP on (autocast on CPU; float16 with the loss scaler) and an allocator: what a CUDA job runs."""
    colours = write_colour_folders(tmp_path / "colours", n_train=8, n_test=4)
    fake = FakeAllocator()
    rt = Runtime(torch.device("cpu"), Amp(torch.device("cpu"), dtype), fake.allocator())
    job = job_settings({"target": f"imagefolder:{colours}", "device": "cpu", "num_workers": 0, "batch_size": 16,
                        "n_fraction": 0.4, "epochs": 1}, config.Config())
    base = models.create_base(tiny_base[0])
    (tmp_path / "job").mkdir()
    seen: set[torch.dtype] = set()
    for module in base.visual.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    report = adapt(base, tiny_base[0], snapshot_from_sources(tiny_base[1]), job, tmp_path / "job",
                   lambda e: None, runtime=rt)
    assert dtype in seen  # the matrices ran in half precision under autocast
    steps = len(report["history"]) * -(-report["sizes"]["train"] // 16)
    assert fake.calls == ["reset"] + ["synchronize"] * steps + ["peak"]
    assert report["peak_memory_bytes"] == fake.peak and report["peak_memory_kind"] == "fake_allocator"
    assert report["amp_dtype"] == str(dtype)[6:]
    scaler = torch.load(tmp_path / "job" / "state.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (dtype == torch.float16)  # loss scaling only for float16, and it is resumable
    assert 0 <= report["test_accuracy"] <= 1


def test_step_peak_memory_reads_the_allocator_when_there_is_one(tiny_base):
    model = models.create_base(tiny_base[0])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ran = []
    fake = FakeAllocator(peak=42)
    assert step_peak_bytes(model, lambda: ran.append(model.encode_image(images)), fake.allocator()) == 42
    assert fake.calls == ["synchronize", "reset", "synchronize", "peak"] and len(ran) == 1
    tracked = step_peak_bytes(model, lambda: model.encode_image(images).sum().backward())  # no allocator: counted
    assert tracked > sum(p.nbytes for p in model.parameters())
