"""Malformed input to every reader ends in a typed one-line error, never another exception or a hang.

Generated with hypothesis: safetensors headers wrong at every level (JSON types, negative,
fractional and overflowing shapes and offsets, overlapping or gapped data ranges, duplicate keys,
deep nesting, huge headers), torch files truncated or with corrupted members, Hugging Face model folders (config, index and
shards wrong), TOML configs with
wrong keys, types and values, and control-socket request lines. ``AXIS_FUZZ_EXAMPLES`` scales the
examples per test (CI: the default); ``AXIS_FUZZ_TALLY=FILE`` writes the outcomes counted per reader
as JSON (``benchmarks/fuzz.py`` runs both and prints the table).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import get_type_hints

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from axis_stream import config, errors
from axis_stream.service import api
from axis_stream.service.jobs.control import handlers
from axis_stream.service.jobs.runner import JobRunner
from axis_stream.store import ingest, readers

EXAMPLES = int(os.environ.get("AXIS_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TALLY: dict[str, Counter] = {}

BASE = {"visual.w": torch.linspace(-1, 1, 12).reshape(4, 3), "visual.b": torch.linspace(0, 1, 3),
        "text.w": torch.linspace(1, 2, 4).reshape(2, 2)}
GOOD = {name: t + 0.01 for name, t in BASE.items()}


@pytest.fixture(scope="module", autouse=True)
def tally():
    """Write the outcome counts when ``AXIS_FUZZ_TALLY`` names a file."""
    yield
    out = os.environ.get("AXIS_FUZZ_TALLY")
    if out:
        previous = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        previous.update({reader: dict(c) for reader, c in TALLY.items()})
        Path(out).write_text(json.dumps(previous, indent=2, sort_keys=True))


def count(reader: str, outcome: str) -> None:
    TALLY.setdefault(reader, Counter())[outcome] += 1


def typed_checkpoint_outcome(path: Path, trust_pickles: bool = False) -> str:
    """Validate ``path`` against ``BASE``: accepted, or a CheckpointError naming the file in one line
    (not an internal error); anything else propagates and fails the example."""
    try:
        ingest.validate_checkpoint(path, BASE, trust_pickles=trust_pickles)
    except errors.CheckpointError as exc:
        assert str(exc).startswith(f"{path.name}: ") and "\n" not in str(exc), str(exc)
        return type(exc).__name__
    return "accepted"


# -- safetensors headers --------------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=6))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
BAD_INTS = st.sampled_from([-1, -(2**31), 2**31, 2**63 - 1, 2**63, 2**64, 2**200, 0]) | st.integers()
DTYPES = st.sampled_from(sorted(readers.SAFETENSORS_DTYPES) + ["F128", "f32", "", "U64"])


def _entry_field(valid):
    """A header field: its valid value, or a wrong type / wrong value of it."""
    return st.one_of(st.just(valid), st.just(valid), JSON,
                     st.lists(BAD_INTS, max_size=3),
                     st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=3))


@st.composite
def safetensors_files(draw) -> bytes:
    """A safetensors file with one thing (or several) wrong in its header or layout."""
    names = draw(st.lists(st.sampled_from(list(GOOD)) | st.text(max_size=8), min_size=1, max_size=4, unique=True))
    tensors = {n: GOOD.get(n, torch.zeros(2)) for n in names}
    entries, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * 4
        entries[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    data = b"".join(t.numpy().tobytes() for t in tensors.values())
    header: object = entries
    how = draw(st.sampled_from(["field", "layout", "entry", "header", "metadata", "duplicate", "nesting", "bytes"]))
    if how == "field":
        for e in entries.values():
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            e[key] = draw(_entry_field(e[key]) if key != "dtype" else DTYPES | JSON)
            if draw(st.booleans()):
                e.pop(draw(st.sampled_from(sorted(e))), None)
    elif how == "layout":           # well-typed offsets that overlap, leave gaps, run backwards or past the end
        spans = [e["data_offsets"] for e in entries.values()]
        shift = draw(st.integers(-16, 16))
        i = draw(st.integers(0, len(spans) - 1))
        spans[i][0] += shift
        if draw(st.booleans()):
            spans[i][1] += shift
        if draw(st.booleans()) and len(spans) > 1:
            spans[0][:], spans[-1][:] = list(spans[-1]), list(spans[0])
        data = data[:draw(st.integers(0, len(data)))] + draw(st.binary(max_size=8))
    elif how == "entry":
        entries[draw(st.sampled_from(sorted(entries)))] = draw(JSON)
    elif how == "header":
        header = draw(JSON.filter(lambda v: not isinstance(v, dict)) | st.just({}))
    elif how == "metadata":
        entries["__metadata__"] = draw(JSON)
    text = json.dumps(header).encode()
    if how == "duplicate":      # the same tensor name twice: JSON parsers keep one, silently
        name = json.dumps(next(iter(entries)))
        text = text[:-1] + f", {name}: {json.dumps(next(iter(entries.values())))}}}".encode()
    elif how == "nesting":
        depth = draw(st.sampled_from([100, 5000, 200_000]))
        text = b"[" * depth + b"]" * depth if draw(st.booleans()) else b'{"a":' * depth + b"1" + b"}" * depth
    elif how == "bytes":
        text = bytearray(text)
        for _ in range(draw(st.integers(1, 4))):
            text[draw(st.integers(0, len(text) - 1))] = draw(st.integers(0, 255))
        text = bytes(text)
    length = len(text) if draw(st.integers(0, 9)) else draw(BAD_INTS.map(lambda n: n % 2**64))
    return struct.pack("<Q", length) + text + data


@FUZZ
@given(blob=safetensors_files())
def test_malformed_safetensors_are_typed_errors(blob, tmp_path):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    count("safetensors", typed_checkpoint_outcome(path))


# -- Hugging Face model folders ------------------------------------------------------------------

@st.composite
def model_folders(draw) -> dict[str, bytes]:
    """A sharded model folder (config.json, index, shards) with something wrong in its files."""
    names = sorted(GOOD)
    split = draw(st.integers(1, len(names) - 1))
    shards = {"model-00001-of-00002.safetensors": {n: GOOD[n] for n in names[:split]},
              "model-00002-of-00002.safetensors": {n: GOOD[n] for n in names[split:]}}
    files = {name: save(tensors) for name, tensors in shards.items()}
    weight_map: object = {n: shard for shard, tensors in shards.items() for n in tensors}
    index: object = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    config: object = {"model_type": "clip"}
    how = draw(st.sampled_from(["config", "index", "weight_map", "shard_name", "missing_shard", "shard_bytes",
                                "nesting", "absent_key"]))
    if how == "config":
        config = draw(JSON)
    elif how == "index":
        index = draw(JSON)
    elif how == "weight_map":
        index["weight_map"] = draw(JSON)
    elif how == "shard_name":       # a shard outside the folder, a subfolder, an absent name
        weight_map[names[0]] = draw(st.sampled_from(["../escape.safetensors", "sub/x.safetensors", "/etc/passwd",
                                                     "", ".", "nothere.safetensors"]) | JSON)
    elif how == "missing_shard":
        files.pop(draw(st.sampled_from(sorted(files))))
    elif how == "shard_bytes":
        name = draw(st.sampled_from(sorted(files)))
        files[name] = files[name][:draw(st.integers(0, len(files[name])))] + draw(st.binary(max_size=8))
    elif how == "absent_key":       # the index names a tensor no shard holds
        weight_map["visual.nothere"] = draw(st.sampled_from(sorted(files)))
    out = {"config.json": json.dumps(config).encode(), "model.safetensors.index.json": json.dumps(index).encode(),
           **files}
    if how == "nesting":
        depth = draw(st.sampled_from([5000, 200_000]))
        out[draw(st.sampled_from(["config.json", "model.safetensors.index.json"]))] = b"[" * depth + b"]" * depth
    return out


@FUZZ
@given(folder=model_folders())
def test_malformed_model_folders_are_typed_errors(folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "model"
    path.mkdir()
    for name, data in folder.items():
        (path / name).write_bytes(data)
    count("model folder", typed_checkpoint_outcome(path))


def test_a_well_formed_file_is_accepted_and_forbidden_layouts_are_named(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(save(GOOD))
    assert typed_checkpoint_outcome(path) == "accepted"
    n = len(GOOD["visual.w"].numpy().tobytes())
    header = {"visual.w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, n]},
              "visual.b": {"dtype": "F32", "shape": [3], "data_offsets": [n - 12, n]}}       # overlaps
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(n))
    with pytest.raises(errors.NotACheckpoint, match="overlap"):
        readers.SafetensorsFile(path)
    header["visual.b"]["data_offsets"] = [n + 4, n + 16]                                   # a gap
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(n + 16))
    with pytest.raises(errors.NotACheckpoint, match="gap"):
        readers.SafetensorsFile(path)
    text = b'{"visual.b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}, ' \
           b'"visual.b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}'
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(12))
    with pytest.raises(errors.NotACheckpoint, match="'visual.b' appears twice"):
        readers.SafetensorsFile(path)
    text = b'{"visual.b": {"dtype": "F32", "shape": [-1, -3], "data_offsets": [0, 12]}}'
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(12))
    with pytest.raises(errors.NotACheckpoint, match="shape"):
        readers.SafetensorsFile(path)


def test_a_huge_header_is_read_in_bounded_time_and_memory(tmp_path):
    """A 20 MB header of 200,000 tiny tensors: parsed and rejected (no base names), not a blow-up."""
    entries = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(200_000)}
    text = json.dumps(entries).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(200_000))
    assert typed_checkpoint_outcome(path) == "MissingKeys"


# -- torch files ----------------------------------------------------------------------------------

def _torch_bytes(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


TORCH_GOOD = _torch_bytes(GOOD)
TORCH_LEGACY = _torch_bytes(GOOD, legacy=True)


def _rezip(blob: bytes, member_index: int, change) -> bytes:
    """The zip ``blob`` with member ``member_index``'s bytes replaced by ``change(bytes)`` (CRCs recomputed:
    a consistent archive whose content is wrong, which the zip layer cannot catch)."""
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for i, info in enumerate(src.infolist()):
            data = src.read(info)
            dst.writestr(info.filename, change(data) if i == member_index else data)
    return out.getvalue()


@st.composite
def torch_files(draw) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "member", "legacy"]))
    blob = TORCH_LEGACY if how == "legacy" else TORCH_GOOD
    if how == "truncate":
        return blob[:draw(st.integers(1, len(blob) - 1))]
    if how == "member":
        n = len(zipfile.ZipFile(io.BytesIO(blob)).infolist())
        index = draw(st.integers(0, n - 1))
        cut, junk = draw(st.integers(0, 64)), draw(st.binary(max_size=16))
        mode = draw(st.sampled_from(["truncate", "junk", "empty", "flip"]))
        if mode == "flip":
            pos, value = draw(st.integers(0, 10**6)), draw(st.integers(0, 255))
            return _rezip(blob, index, lambda d: d[:pos % max(len(d), 1)] + bytes([value]) + d[pos % max(len(d), 1) + 1:])
        return _rezip(blob, index, {"truncate": lambda d: d[:max(len(d) - cut, 0)], "junk": lambda d: d + junk,
                                    "empty": lambda d: b""}[mode])
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


MULTI_DISK = TORCH_GOOD[:TORCH_GOOD.rfind(b"PK\x06\x07") + 4] + b"\x01" + TORCH_GOOD[TORCH_GOOD.rfind(b"PK\x06\x07") + 5:]


@FUZZ
@given(blob=torch_files(), trust=st.booleans())
@example(blob=MULTI_DISK, trust=False)          # zipfile raises BadZipFile from is_zipfile
def test_truncated_and_corrupted_torch_files_are_typed_errors(blob, trust, tmp_path):
    path = tmp_path / "fuzz.pt"
    path.write_bytes(blob)
    count("torch", typed_checkpoint_outcome(path, trust_pickles=trust))


MEMO_BOMB = r"""
import resource, struct, sys
from pathlib import Path
from axis_stream import errors
from axis_stream.store import unpickle
# one pickle opcode, LONG_BINPUT 2**28: the C unpickler grows its memo array to 2**29 slots (4 GiB)
path = Path(sys.argv[1])
path.write_bytes(b"\x80\x02N" + b"r" + struct.pack("<I", 2**28) + b".")
limit = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize() + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))     # 1 GiB more than now: a blow-up is a MemoryError
try:
    unpickle.load_pickle(path)
except errors.CheckpointError as exc:
    print(type(exc).__name__, exc)
"""


def test_a_damaged_memo_index_in_a_trusted_pickle_does_not_allocate_gigabytes(tmp_path):
    out = subprocess.run([sys.executable, "-c", MEMO_BOMB, str(tmp_path / "bomb.pt")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("NotACheckpoint bomb.pt: unreadable torch file") and "MemoryError" not in out.stdout


# -- TOML configs -----------------------------------------------------------------------------------

def _toml_value(value) -> str:
    """``value`` as a TOML value (nan and inf included, which TOML allows)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


TOML_SCALARS = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=12) | st.sampled_from(["", "auto", "inotify", "count", "exact", "archive",
                                                        "127.0.0.1:9464", "host:\u00b2", "host:99999", "DEBUG"]))
TOML_VALUES = st.recursive(TOML_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=2), max_leaves=6)
SECTIONS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in get_type_hints(config.Config).items()}


@st.composite
def toml_configs(draw) -> bytes:
    lines = []
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=5), max_size=3, unique=True)):
        lines.append(f"[{json.dumps(section)}]")
        keys = SECTIONS.get(section, []) + ["nope"]
        for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
            lines.append(f"{json.dumps(key)} = {_toml_value(draw(TOML_VALUES))}")
    text = "\n".join(lines).encode()
    if draw(st.integers(0, 4)) == 0:            # and a few raw byte changes (invalid TOML, invalid UTF-8)
        data = bytearray(text or b"x")
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        text = bytes(data)
    return text


@FUZZ
@given(text=toml_configs())
def test_malformed_configs_are_config_errors(text, tmp_path):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text)
    try:
        cfg = config.load(path, env={})
    except errors.ConfigError as exc:
        assert "\n" not in str(exc), str(exc)
        count("toml", "ConfigError")
        return
    # accepted: every number it holds is finite (a nan interval would hang or crash a thread later)
    for section in vars(cfg).values():
        for value in vars(section).values():
            assert not isinstance(value, float) or math.isfinite(value), (section, value)
    count("toml", "accepted")


def test_deep_nesting_and_bad_bytes_in_a_config_are_config_errors(tmp_path):
    path = tmp_path / "deep.toml"
    for text in (b"a = " + b"[" * 100_000 + b"]" * 100_000, b"[paths]\nstate_dir = \"\xff\xfe\"\n",
                 b"[watch]\npoll_interval_s = nan\n", b"[metrics]\naddress = \"h:\xc2\xb2\"\n"):
        path.write_bytes(text)
        with pytest.raises(errors.ConfigError, match=r"^[^\n]+$"):
            config.load(path, env={})


# -- control-socket requests ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """The job runner's real control ops (not started: a valid adapt is queued, nothing runs) plus the
    daemon's argument-free ones."""
    cfg = config.Config()
    cfg.paths.state_dir = tmp_path_factory.mktemp("state")
    runner = JobRunner(cfg.validate(), cfg.paths.basis_dir)
    job_id = runner.submit("selftest", {})          # "@job" in a request is this job's id
    ops = {**handlers(runner), "status": lambda args: {"ok": 1}, "basis.history": lambda args: {"ledger": []}}
    yield api.ControlServer(cfg.paths.socket, ops), job_id
    runner.shutdown()


ADAPT_ARGS = ["target", "epochs", "lr", "n_fraction", "start_scale", "batch_size", "seed", "device", "classnames",
              "templates", "max_train_samples", "max_eval_samples", "data_root", "weight_decay", "nope"]
ARG_VALUES = (JSON | BAD_INTS | st.sampled_from([1e400, -1e400, float("nan"), 10**400, "12", "1e3", "@job",
                                                 "imagefolder:/nope", ["a", 1]]))


@st.composite
def request_lines(draw) -> bytes:
    how = draw(st.sampled_from(["adapt", "jobs", "other", "shape", "bytes", "nesting"]))
    if how == "nesting":
        depth = draw(st.sampled_from([50, 5000, 100_000]))
        return b'{"op": "status", "args": ' + b"[" * depth + b"]" * depth + b"}"
    if how == "bytes":
        return draw(st.binary(max_size=64))
    if how == "shape":
        return json.dumps(draw(JSON | st.fixed_dictionaries({"op": JSON, "args": JSON}))).encode()
    if how == "adapt":
        op, args = "adapt", {"target": draw(st.just("cars") | ARG_VALUES)}
        args.update(draw(st.dictionaries(st.sampled_from(ADAPT_ARGS), ARG_VALUES, max_size=3)))
    elif how == "jobs":
        op = draw(st.sampled_from(["jobs.list", "jobs.show", "jobs.cancel", "jobs.logs"]))
        args = {"id": draw(st.just("@job") | ARG_VALUES)}
        args.update(draw(st.dictionaries(st.sampled_from(["limit", "offset", "tail", "id"]), ARG_VALUES, max_size=2)))
    else:
        op = draw(st.sampled_from(["status", "basis.history"]) | st.text(max_size=8))
        args = draw(st.dictionaries(st.text(max_size=4), ARG_VALUES, max_size=2))
    return json.dumps({"op": op, "args": args}).encode()


@FUZZ
@given(line=request_lines())
@example(line=b'{"op": "adapt", "args": {"target": "cars", "epochs": 1e400}}')         # holes fuzzing found
@example(line=b'{"op": "adapt", "args": {"target": "cars", "max_train_samples": 1e400}}')
@example(line=b'{"op": "adapt", "args": {"target": "cars", "data_root": 5}}')
@example(line=b'{"op": "adapt", "args": {"target": {"a": 1}}}')
@example(line=b'{"op": "status", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
def test_malformed_requests_get_a_refusal_never_an_internal_error(line, control):
    server, job_id = control
    reply = server.dispatch(line.replace(b'"@job"', json.dumps(job_id).encode()))
    assert set(reply) in ({"ok", "result"}, {"ok", "error"}), reply
    if not reply["ok"]:
        assert "\n" not in reply["error"] and not reply["error"].startswith("internal error"), reply["error"]
    json.dumps(reply)
    count("control", "answered" if reply["ok"] else "refused")
