"""basis.fold_device: the matrix folds on a device, the basis itself on the CPU (store/folding.py).

On a machine without CUDA these check the setting, the refusal at start and the moves (the same code
a CUDA fold runs, with ``.to`` a no-op); the CUDA comparison runs where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from axis_stream import config, errors
from axis_stream.core import stage1
from axis_stream.service.foldworker import REJECT_REASONS, FoldWorker
from axis_stream.service.metrics import Metrics
from axis_stream.store import folding
from axis_stream.store.basis import Basis

IDENTITY = {"name": "axis-tiny", "pretrained": "test"}


def test_the_setting_takes_cpu_cuda_and_cuda_n_only():
    for good in ("cpu", "cuda", "cuda:1"):
        config.BasisConfig(fold_device=good).validate()
    for bad in ("gpu", "cpu:0", "cuda:x", "CUDA", "", "cuda:"):
        with pytest.raises(errors.ConfigError, match="basis.fold_device"):
            config.BasisConfig(fold_device=bad).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_a_cuda_fold_device_without_cuda_is_refused_before_anything_is_folded(tiny_base, make_checkpoint,
                                                                             tmp_path):
    _, base = tiny_base
    cfg = config.BasisConfig(svd="exact", fold_device="cuda")
    basis = Basis.create(tmp_path / "basis", base, config.BasisConfig(svd="exact"), IDENTITY)
    basis.fold_checkpoint(make_checkpoint(1))
    again = Basis.open(tmp_path / "basis", base, settings=cfg)
    with pytest.raises(errors.ConfigError, match=r"basis.fold_device is 'cuda' but CUDA is not available"):
        again.fold_checkpoint(make_checkpoint(2))
    assert Basis.open(tmp_path / "basis", base).version == 1        # nothing written
    assert again.materialize().keys() == Basis.open(tmp_path / "basis", base).materialize().keys()  # reads need no GPU
    daemon = config.Config()
    daemon.basis = cfg
    daemon.paths.state_dir = tmp_path / "state"
    with pytest.raises(errors.ConfigError, match="basis.fold_device"):
        FoldWorker(daemon, base, IDENTITY, Metrics(REJECT_REASONS))


def test_a_move_keeps_what_is_already_there_and_carries_the_stats():
    f = stage1.fold(None, torch.randn(12, 9, generator=torch.Generator().manual_seed(0)), 3)
    cpu = torch.device("cpu")
    assert folding._moved(f, cpu) is f and folding._moved(None, cpu) is None
    meta = folding._moved(f, torch.device("meta"))     # a device other than the CPU, without a GPU
    assert {meta.U.device.type, meta.s.device.type, meta.V.device.type} == {"meta"}
    assert meta.stats is f.stats and meta.shape == f.shape
    assert folding._moved(f.U, torch.device("meta")).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_basis_folded_on_cuda_equals_the_one_folded_on_the_cpu(tiny_base, make_checkpoint, tmp_path):
    _, base = tiny_base
    bases = {dev: Basis.create(tmp_path / dev, base, config.BasisConfig(fold_device=dev), IDENTITY)
             for dev in ("cpu", "cuda")}
    for seed in (1, 2, 3):
        path = make_checkpoint(seed)
        for basis in bases.values():
            basis.fold_checkpoint(path)
    cpu, cuda = (bases[d].materialize(with_base=False) for d in ("cpu", "cuda"))
    for name, want in cpu.items():
        got = cuda[name]
        assert got.device.type == "cpu"
        scale = float(torch.linalg.vector_norm(want.double())) or 1.0
        assert float(torch.linalg.vector_norm(got.double() - want.double())) / scale < 1e-4, name
