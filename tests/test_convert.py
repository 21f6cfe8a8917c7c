"""`axis-stream convert`: pickled src.modeling objects (made here with the tiny CLIP) to validated safetensors."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from test_ingest import one_thread  # noqa: F401 (autouse fixture)

from axis_stream import errors
from axis_stream.cli import main
from axis_stream.config import BasisConfig
from axis_stream.store import convert, ingest, readers, unpickle
from axis_stream.store.basis import Basis
from axis_stream.testing import finetuned_like

DATASETS = ("Cars", "DTD")


class ImageEncoder(torch.nn.Module):
    """task_vectors' src.modeling.ImageEncoder, as it pickles: .model (text transformer deleted) and transforms."""

    def __init__(self, base_cfg, state):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = open_clip.create_model_and_transforms(
            base_cfg.model, pretrained=None)
        self.model.load_state_dict(state)
        self.cache_dir = None
        delattr(self.model, "transformer")


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))


class Evil:
    def __reduce__(self):
        return os.system, (f"touch {EVIL_MARKER}",)


EVIL_MARKER = Path("/tmp/axis-stream-test-convert-evil-ran")


@pytest.fixture
def src_modeling(monkeypatch):
    """A test-local ``src.modeling`` importable only while the pickles are written."""
    package, module = types.ModuleType("src"), types.ModuleType("src.modeling")
    for cls in (ImageEncoder, ClassificationHead):
        monkeypatch.setattr(cls, "__module__", "src.modeling")
        setattr(module, cls.__name__, cls)
    package.modeling = module
    monkeypatch.setitem(sys.modules, "src", package)
    monkeypatch.setitem(sys.modules, "src.modeling", module)
    return module


@pytest.fixture
def release(tiny_base, tmp_path, src_modeling, monkeypatch):
    """SRC/axis-tiny/<Dataset>Val/{finetuned,zeroshot}.pt and head_<Dataset>Val.pt, then src.modeling gone."""
    base_cfg, base = tiny_base
    root = tmp_path / "checkpoints" / "axis-tiny"
    states = {}
    for i, name in enumerate(DATASETS):
        ddir = root / f"{name}Val"
        ddir.mkdir(parents=True)
        states[name] = finetuned_like(base, 100 + i)
        torch.save(ImageEncoder(base_cfg, states[name]), ddir / "finetuned.pt")
        torch.save(ImageEncoder(base_cfg, base), ddir / "zeroshot.pt")
        head = ClassificationHead(True, torch.randn(5 + i, 32))
        torch.save(head, root / f"head_{name}Val.pt")
        states[f"head_{name}"] = {"weight": head.weight.detach(), "bias": head.bias.detach()}
    monkeypatch.delitem(sys.modules, "src")
    monkeypatch.delitem(sys.modules, "src.modeling")
    return tmp_path / "checkpoints", states


def test_convert_tree_writes_validated_safetensors(tiny_base, release, tmp_path):
    _, base = tiny_base
    src, states = release
    out = tmp_path / "converted"
    results = convert.convert_tree(src, out, base, model="axis-tiny")
    assert all(r.ok for r in results), [r.line() for r in results]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{d}.safetensors" for d in DATASETS] + [f"head_{d}.safetensors" for d in DATASETS] + ["zeroshot.safetensors"])
    zeroshot = next(r for r in results if r.kind == "zeroshot")
    assert zeroshot.note == "identical to the configured base"
    for name in DATASETS:
        with safe_open(out / f"{name}.safetensors", "pt") as f:
            meta = f.metadata()
            assert meta["dataset"] == name and meta["source"] == f"axis-tiny/{name}Val/finetuned.pt"
            assert meta["source_sha256"] == readers.file_sha256(src / "axis-tiny" / f"{name}Val" / "finetuned.pt")
            keys = set(f.keys())
            # the open_clip state dict without the deleted text transformer
            assert keys == {k for k in base if not k.startswith("transformer.")}
            for k in keys:
                assert torch.equal(f.get_tensor(k), states[name][k]), k
        with safe_open(out / f"head_{name}.safetensors", "pt") as f:
            assert f.metadata()["dataset"] == name
            for k in ("weight", "bias"):
                assert torch.equal(f.get_tensor(k), states[f"head_{name}"][k])


def test_converted_checkpoints_fold_like_the_state_dicts_they_came_from(tiny_base, release, tmp_path):
    _, base = tiny_base
    src, states = release
    out = tmp_path / "converted"
    convert.convert_tree(src, out, base, model="axis-tiny")
    settings = BasisConfig(svd="exact")
    a = Basis.create(tmp_path / "a", base, settings, {"name": "axis-tiny", "pretrained": "test"})
    b = Basis.create(tmp_path / "b", base, settings, {"name": "axis-tiny", "pretrained": "test"})
    for name in DATASETS:
        a.fold_checkpoint(out / f"{name}.safetensors")
        direct = tmp_path / f"{name}-direct.pt"
        torch.save(states[name], direct)
        b.fold_checkpoint(direct)
    da, db = a.materialize(), b.materialize()
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    with pytest.raises(errors.DifferentBase, match="made for base"):  # converted for another base
        Basis.create(tmp_path / "c", {k: v * 2 for k, v in base.items()}, settings, {"name": "x"}) \
            .fold_checkpoint(out / "Cars.safetensors")


def test_the_unpickler_needs_no_src_package_but_refuses_other_code(tiny_base, release, tmp_path):
    _, base = tiny_base
    src, _ = release
    finetuned = src / "axis-tiny" / "CarsVal" / "finetuned.pt"
    assert "src" not in sys.modules
    assert isinstance(unpickle.load_pickle(finetuned), unpickle.ImageEncoder)
    with pytest.raises(errors.UntrustedPickle):  # the watched folder's default
        ingest.read_checkpoint(finetuned, base)
    with ingest.read_checkpoint(finetuned, base, trust_pickles=True) as ckpt:
        assert len(ckpt.names) == len([k for k in base if not k.startswith("transformer.")])
    EVIL_MARKER.unlink(missing_ok=True)
    evil = tmp_path / "evil.pt"
    torch.save({"state": Evil()}, evil)
    with pytest.raises(errors.UntrustedPickle, match="refusing posix.system"):
        unpickle.load_pickle(evil)
    assert not EVIL_MARKER.exists()


def test_a_bad_file_in_the_tree_is_reported_and_not_written(tiny_base, release, tmp_path):
    _, base = tiny_base
    src, _ = release
    bad = src / "axis-tiny" / "DTDVal" / "finetuned.pt"
    bad.write_bytes(bad.read_bytes()[:-500])
    out = tmp_path / "converted"
    results = convert.convert_tree(src, out, base, model="axis-tiny")
    failed = [r for r in results if not r.ok]
    assert len(failed) == 1 and failed[0].dataset == "DTD" and "truncated" in failed[0].note
    assert not (out / "DTD.safetensors").exists() and (out / "Cars.safetensors").exists()
    with pytest.raises(errors.AxisError, match="no ViT-B-32/ folder"):
        convert.convert_tree(tmp_path / "converted", out, base, model="ViT-B-32")


def test_cli_convert(tiny_base, release, tmp_path):
    base_cfg, _ = tiny_base
    src, _ = release
    cfg = tmp_path / "axis.toml"
    cfg.write_text(f'[base]\nmodel = "axis-tiny"\npretrained = "{base_cfg.pretrained}"\n'
                   f'model_config = "{base_cfg.model_config}"\n')
    res = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert res.output.count("\nok ") + res.output.startswith("ok ") == 5
    assert (tmp_path / "out" / "Cars.safetensors").exists()
