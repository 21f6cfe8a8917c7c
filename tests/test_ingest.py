"""Reading checkpoints: formats, key normalisation, and a typed one-line error for each bad input."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from axis_stream import errors
from axis_stream.store import ingest, readers
from axis_stream.testing import finetuned_like

MATRIX = "visual.transformer.resblocks.0.attn.in_proj_weight"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: OpenMP start-up and spin-waits cost more than they give (20x on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def deltas_of(path, base, **kw) -> dict[str, torch.Tensor]:
    with ingest.read_checkpoint(path, base, **kw) as ckpt:
        out = {n: ckpt.delta(n) for n in ckpt.names}
        ckpt.finish()
    return {n: d for n, d in out.items() if d is not None}


def expected_deltas(sd, base) -> dict[str, torch.Tensor]:
    return {n: (sd[n].double() - base[n].double()) for n in base if not torch.equal(sd[n], base[n])}


def assert_deltas(got, want):
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.allclose(got[n].double(), want[n], atol=1e-6), n


@pytest.mark.parametrize("layout", ["safetensors", "pt", "pth-nested", "bin-module-prefix", "legacy-pt"])
def test_formats_give_the_same_task_vector(tiny_base, tmp_path, layout):
    _, base = tiny_base
    sd = finetuned_like(base, 1)
    if layout == "safetensors":
        path = tmp_path / "a.safetensors"
        save_file(sd, path)
    elif layout == "pt":
        path = tmp_path / "a.pt"
        torch.save(sd, path)
    elif layout == "pth-nested":
        path = tmp_path / "a.pth"
        torch.save({"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    elif layout == "bin-module-prefix":
        path = tmp_path / "a.bin"
        torch.save({f"module.model.{k}": v for k, v in sd.items()}, path)
    else:
        path = tmp_path / "a.pt"
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    with ingest.read_checkpoint(path, base) as ckpt:
        assert ckpt.sha256 == readers.file_sha256(path) and ckpt.size == path.stat().st_size
        if layout == "bin-module-prefix":
            assert ckpt.mapping.stripped == ("model.", "module.")
    assert_deltas(deltas_of(path, base), expected_deltas(sd, base))


def test_a_half_precision_copy_of_an_unchanged_tensor_is_unchanged(tiny_base, tmp_path):
    _, base = tiny_base
    sd = {k: v.half() for k, v in finetuned_like(base, 5).items()}
    path = tmp_path / "half.safetensors"
    save_file(sd, path)
    # the text tower only lost precision: no delta there
    want = {n: sd[n].double() - base[n].double() for n in base if n.startswith("visual.")}
    assert_deltas(deltas_of(path, base), want)


def test_image_encoder_only_checkpoint_maps_onto_the_visual_tower(tiny_base, tmp_path):
    _, base = tiny_base
    sd = finetuned_like(base, 2)
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    path = tmp_path / "visual.safetensors"
    save_file(visual, path)
    with ingest.read_checkpoint(path, base) as ckpt:
        m = ckpt.mapping
        assert m.tower == "visual." and len(m.names) == len(visual) and not m.unmatched
        assert all(n.startswith("visual.") for n in m.names)
        assert "transformer.resblocks.0.attn.in_proj_weight" in m.absent  # the text tower: unchanged
        assert "image-encoder-only" in str(m) and "taken as unchanged" in str(m)
    assert_deltas(deltas_of(path, base), expected_deltas(sd, base))


def test_names_not_in_the_base_are_reported_and_ignored(tiny_base, tmp_path):
    _, base = tiny_base
    sd = finetuned_like(base, 3)
    sd["classification_head.weight"] = torch.randn(10, 32)
    path = tmp_path / "h.safetensors"
    save_file(sd, path)
    with ingest.read_checkpoint(path, base) as ckpt:
        assert ckpt.mapping.unmatched == ("classification_head.weight",)
        assert "classification_head.weight" not in ckpt.names


def test_safetensors_are_read_without_a_memory_map(tiny_base, tmp_path):
    """Peak memory of a fold is about one tensor: no page of the file may stay mapped."""
    _, base = tiny_base
    path = tmp_path / "nomap.safetensors"
    save_file(finetuned_like(base, 4), path)
    f = readers.SafetensorsFile(path)
    try:
        tensors = [f.read(k) for k in f.keys()]
        assert str(path) not in Path("/proc/self/maps").read_text()
    finally:
        f.close()
    assert len(tensors) == len(base)


# --- bad input: each gets its typed error, with the file named first ---

def _write_bad(kind: str, base, tmp_path: Path, make_good) -> tuple[Path, dict]:
    """A bad checkpoint of ``kind`` and the read_checkpoint keyword arguments that expose it."""
    sd = finetuned_like(base, 7)
    good = make_good(sd)
    data = good.read_bytes()
    path, kw = tmp_path / f"bad-{kind}.safetensors", {}
    if kind == "truncated-data":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-header":
        path.write_bytes(data[:40])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random-bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "random-bytes-pt":   # seeded: 1 in 16,384 random files starts like a pickle (PROTO 2..5)
        path = path.with_suffix(".pt")
        path.write_bytes(random.Random(7).randbytes(4096))
    elif kind == "truncated-pt":
        path = path.with_suffix(".pt")
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[:-2000])
    elif kind == "unsupported-suffix":
        path = path.with_suffix(".ckpt.txt")
        path.write_bytes(data)
    elif kind == "wrong-shape":
        sd[MATRIX] = torch.randn(10, 10)
        save_file(sd, path)
    elif kind == "missing-key":
        del sd[MATRIX]
        save_file(sd, path)
        kw["required"] = [MATRIX]
    elif kind == "no-matching-key":
        save_file({"foo.weight": torch.randn(3, 3)}, path)
    elif kind == "int-dtype":
        sd["visual.ln_post.weight"] = sd["visual.ln_post.weight"].to(torch.int32)
        save_file(sd, path)
    elif kind in ("nan", "inf"):
        sd[MATRIX][3, 5] = float("nan") if kind == "nan" else float("inf")
        save_file(sd, path)
    elif kind == "zero-delta":
        save_file(dict(base), path)
    elif kind == "different-base":
        g = torch.Generator().manual_seed(99)
        save_file({k: torch.randn(v.shape, generator=g) * v.float().std() if v.dim() >= 2 else v
                   for k, v in base.items()}, path)
    elif kind == "metadata-other-base":
        save_file(sd, path, metadata={"base_sha256": "0" * 64})
        kw["base_sha256"] = "f" * 64
    elif kind == "whole-model-pickle":
        path = path.with_suffix(".pt")
        lin = torch.nn.Linear(4, 4)
        torch.save(lin, path)
    else:
        raise AssertionError(kind)
    return path, kw


BAD = {
    "truncated-data": errors.TruncatedFile, "truncated-header": errors.TruncatedFile,
    "empty": errors.TruncatedFile, "truncated-pt": errors.TruncatedFile,
    "random-bytes": errors.NotACheckpoint, "random-bytes-pt": errors.NotACheckpoint,
    "unsupported-suffix": errors.NotACheckpoint,
    "wrong-shape": errors.ShapeMismatch, "missing-key": errors.MissingKeys,
    "no-matching-key": errors.MissingKeys, "int-dtype": errors.BadDtype,
    "nan": errors.NonFinite, "inf": errors.NonFinite, "zero-delta": errors.ZeroDelta,
    "different-base": errors.DifferentBase, "metadata-other-base": errors.DifferentBase,
    "whole-model-pickle": errors.UntrustedPickle,
}


@pytest.fixture
def bad_checkpoint(tiny_base, tmp_path):
    """``bad_checkpoint(kind) -> (path, read_checkpoint kwargs)``."""
    _, base = tiny_base

    def make_good(sd):
        p = tmp_path / "good.safetensors"
        save_file(sd, p)
        return p

    return lambda kind: _write_bad(kind, base, tmp_path, make_good)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_input_raises_its_typed_error(tiny_base, bad_checkpoint, kind):
    _, base = tiny_base
    path, kw = bad_checkpoint(kind)
    with pytest.raises(BAD[kind]) as info:
        ingest.validate_checkpoint(path, base, **kw)
    err = info.value
    assert err.path == path and str(err).startswith(f"{path.name}: ")
    assert "\n" not in str(err) and len(str(err)) < 300
    assert err.reason == BAD[kind].reason


def test_a_whole_model_pickle_loads_only_when_trusted(tiny_base, tmp_path):
    _, base = tiny_base
    sd = finetuned_like(base, 8)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    for name, t in sd.items():  # a module whose .model state dict is the checkpoint
        *parents, leaf = name.split(".")
        mod = model.model
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, t)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(errors.UntrustedPickle):
        ingest.read_checkpoint(path, base)
    assert_deltas(deltas_of(path, base, trust_pickles=True), expected_deltas(sd, base))


def test_validate_state_dict_names_the_given_path(tiny_base):
    _, base = tiny_base
    sd = finetuned_like(base, 9)
    sd[MATRIX] = sd[MATRIX].clone()
    sd[MATRIX][0, 0] = float("nan")
    with pytest.raises(errors.NonFinite, match=re.escape(f"finetuned.pt: {MATRIX} contains NaN")):
        ingest.validate_state_dict("CarsVal/finetuned.pt", sd, base)


def test_bytes_that_only_start_with_the_pickle_opcode_are_not_a_checkpoint(tiny_base, tmp_path):
    """0x80 (PROTO) without a protocol 2-5 byte after it is not a torch pickle: one random file in 256
    starts so, and must not be refused as an untrusted whole-model pickle."""
    _, base = tiny_base
    path = tmp_path / "noise.pt"
    path.write_bytes(b"\x80\xf1" + random.Random(3).randbytes(4094))
    with pytest.raises(errors.NotACheckpoint):
        ingest.validate_checkpoint(path, base)
