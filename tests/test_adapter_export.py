"""``export --adapter``: a merged basis or an adapted job as a PEFT LoRA adapter that
``PeftModel.from_pretrained`` loads onto the base with the full export's logits, and the model card
of every export; tiny Hugging Face models built in the test, a real Stage 2 job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from test_adapt_cli import run_printed
from test_hf import hf_config, save_finetune, tiny_clip_tokenizer, tiny_model

from axis_stream import config, errors
from axis_stream.cli import main
from axis_stream.store import adapter, readers
from axis_stream.store.basis import Basis

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()


def card_meta(folder: Path) -> dict:
    """The YAML block of a folder's model card."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def folded(family: str, tmp_path: Path, seeds=(40, 41), text: dict | None = None,
           overrides: dict | None = None) -> tuple[Path, Basis]:
    """A saved tiny base of ``family`` (its config changed by ``overrides``) and a basis with two
    fine-tunes folded; returns the config path too."""
    folder = tmp_path / "base"
    model = tiny_model(family, text=text, **(overrides or {}))
    model.save_pretrained(folder)
    base = dict(readers.read_hf_base(folder))
    cfg = hf_config(folder, tmp_path)
    b = Basis.create(cfg.paths.basis_dir, readers.read_hf_base(folder), cfg.basis)
    for seed in seeds:
        b.fold_checkpoint(save_finetune(tiny_model(family, text=text, **(overrides or {})), base, seed,
                                        tmp_path / f"ft-{seed}"))
    return tmp_path / "axis-stream.toml", b


def export(*args: str) -> str:
    result = CliRunner().invoke(main, ["export", *args])
    assert result.exit_code == 0, result.output
    return result.output


def assert_same_weights(merged: torch.nn.Module, full: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    got, want = merged.state_dict(), full.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        if name not in skip:
            torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("tied", [False, True])         # tie_word_embeddings: the LM head is the embedding
def test_a_decoder_llms_merged_basis_as_an_adapter(tmp_path, tied):
    cfg_path, basis = folded("llama", tmp_path, overrides={"tie_word_embeddings": tied})
    out, full = tmp_path / "adapter", tmp_path / "merged"
    printed = export("--merged", "--adapter", "--config", str(cfg_path), "--out", str(out))
    assert f"a LoRA adapter of basis version {basis.version}" in printed and "not in the adapter" not in printed
    printed_full = export("--merged", "--config", str(cfg_path), "--out", str(full))
    settings = json.loads((out / "adapter_config.json").read_text())
    cfg = config.load(cfg_path)
    k = {name.removesuffix(".weight"): info["k"] for name, info in basis.manifest["matrices"].items()}
    assert settings["peft_type"] == "LORA" and settings["task_type"] == "CAUSAL_LM"
    assert sorted(settings["target_modules"]) == sorted(k)      # the basis's matrices, no other
    assert settings["r"] == settings["lora_alpha"] and all(settings["rank_pattern"][p] == settings["alpha_pattern"][p]
                                                           for p in settings["rank_pattern"])
    assert sorted(settings["modules_to_save"]) == [*(["lm_head"] if not tied else []), "model.embed_tokens",
                                                   "model.layers.0.input_layernorm",
                                                   "model.layers.0.post_attention_layernorm",
                                                   "model.layers.1.input_layernorm",
                                                   "model.layers.1.post_attention_layernorm", "model.norm"]
    assert settings["ensure_weight_tying"] is tied

    base = transformers.LlamaForCausalLM.from_pretrained(cfg.base.model).eval()
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    for name, layer in loaded.base_model.model.named_modules():           # rank K of each matrix, scale 1
        if name in k:
            assert layer.r["default"] == k[name] and layer.scaling["default"] == 1.0
    reference = transformers.LlamaForCausalLM.from_pretrained(full).eval()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        plain = transformers.LlamaForCausalLM.from_pretrained(cfg.base.model).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (plain - want).abs().max() > 1e-3                            # the adapter changes the model
    assert_same_weights(loaded.merge_and_unload(), reference)
    # the card; the same version again gives the same bytes
    meta = card_meta(out)
    assert meta["library_name"] == "peft" and meta["base_model"] == cfg.base.model and "lora" in meta["tags"]
    axis = meta["axis_stream"]
    assert axis["basis_version"] == basis.version and axis["merge_method"] == "axis"
    assert axis["calibration"] == "spectral"
    assert [s["sha256"] for s in axis["sources"]] == [r.sha256 for r in basis.ledger()]
    assert card_meta(full)["library_name"] == "transformers" and card_meta(full)["axis_stream"]["export"] == "full"
    again = tmp_path / "again"
    export("--merged", "--adapter", "--config", str(cfg_path), "--out", str(again))
    for f in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert (again / f).read_bytes() == (out / f).read_bytes(), f
    run_printed(printed + printed_full, tmp_path)                        # the printed load lines load them


def test_a_bert_encoders_merged_basis_as_an_adapter(tmp_path):
    cfg_path, basis = folded("bert", tmp_path)
    out, full = tmp_path / "adapter", tmp_path / "merged"
    printed = export("--merged", "--adapter", "--config", str(cfg_path), "--out", str(out))
    export("--merged", "--config", str(cfg_path), "--out", str(full))
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["lora_bias"] is True and settings["task_type"] is None
    assert {"embeddings.word_embeddings", "embeddings.LayerNorm", "pooler.dense"} <= set(settings["modules_to_save"])
    base = transformers.BertModel.from_pretrained(config.load(cfg_path).base.model).eval()
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    reference = transformers.BertModel.from_pretrained(full).eval()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=1e-5)
    assert_same_weights(loaded.merge_and_unload(), reference)
    assert card_meta(out)["axis_stream"]["basis_version"] == basis.version
    run_printed(printed, tmp_path)


def test_a_clip_jobs_adapter_gives_the_jobs_logits(tmp_path):
    from test_adapt_data import write_colour_folders

    from axis_stream.adapt.head import logits

    tokenizer = tiny_clip_tokenizer(tmp_path / "vocab")
    text = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    cfg_path, basis = folded("clip", tmp_path, text=text)
    tokenizer.save_pretrained(tmp_path / "base")
    cfg_path.write_text(cfg_path.read_text() + "[adapt]\nnum_workers = 0\ndevice = \"cpu\"\n")
    colours = write_colour_folders(tmp_path / "colours", n_train=8, n_test=4)
    result = CliRunner().invoke(main, ["adapt", "--local", "--config", str(cfg_path), "--target",
                                       f"imagefolder:{colours}", "--epochs", "1", "--batch-size", "8",
                                       "--n-fraction", "0.05"])     # N = 2 < K = 3: the frozen rest goes too
    assert result.exit_code == 0, result.output
    job_id = result.output.split(" --job ")[1].split()[0]
    out, full = tmp_path / "job-adapter", tmp_path / "job-full"
    printed = export("--job", job_id, "--adapter", "--config", str(cfg_path), "--out", str(out))
    printed_full = export("--job", job_id, "--config", str(cfg_path), "--out", str(full))
    assert "not in the adapter (no PEFT form; the full export has them): logit_scale" in printed
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["lora_bias"] is True                  # the averaged biases of the projections ride on lora_B
    assert "vision_model.embeddings" in settings["modules_to_save"]      # class embedding, patches, positions

    cfg = config.load(cfg_path)
    base = transformers.CLIPModel.from_pretrained(cfg.base.model).eval()
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    reference = transformers.CLIPModel.from_pretrained(full).eval()
    head = load_file(cfg.paths.jobs_dir / job_id / "head.safetensors")["head"]
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor(tokenizer(["red", "a blue square"], padding="max_length", max_length=16)["input_ids"])
    with torch.no_grad():
        want = logits(reference.get_image_features(pixel_values=images).pooler_output, head)
        got = logits(loaded.get_image_features(pixel_values=images).pooler_output, head)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)        # the job's predictions
        both = loaded(input_ids=ids, pixel_values=images)
        ref = reference(input_ids=ids, pixel_values=images)
        torch.testing.assert_close(both.logits_per_image / loaded.logit_scale.exp(),
                                   ref.logits_per_image / reference.logit_scale.exp(), rtol=0, atol=1e-5)
    assert_same_weights(loaded.merge_and_unload(), reference, skip=("logit_scale",))
    meta = card_meta(out)["axis_stream"]
    assert meta["job"]["id"] == job_id and meta["job"]["target"] == f"imagefolder:{colours}"
    report = json.loads((cfg.paths.jobs_dir / job_id / "report.json").read_text())
    assert meta["job"]["test_accuracy"] == report["test_accuracy"]
    assert meta["job"]["validation_accuracy"] == report["val_accuracy"]
    assert meta["adapter"]["dropped"] == ["logit_scale"] and card_meta(full)["axis_stream"]["job"]["id"] == job_id
    run_printed(printed + printed_full, tmp_path)


def test_the_plan_puts_each_change_where_peft_can_hold_it():
    m = torch.nn.Module()
    m.a = torch.nn.Linear(4, 4)
    m.b = torch.nn.Linear(4, 4, bias=False)
    m.block = torch.nn.Module()
    m.block.norm, m.block.inner = torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)
    m.scale = torch.nn.Parameter(torch.ones(()))

    def low_rank(r: int):
        return torch.randn(4, r), torch.randn(r), torch.randn(4, r)

    factors = {"a.weight": low_rank(2), "b.weight": low_rank(3)}
    deltas = {"block.norm.weight": torch.ones(4), "block.inner.bias": torch.ones(4), "scale": torch.ones(()),
              "block.norm.bias": torch.zeros(4)}                        # an all-zero delta is no change
    p = adapter.plan(m, factors, deltas)
    assert p.targets == {"a": 2, "b": 3} and not p.lora_bias
    assert p.saved == ["block.inner", "block.norm"] and p.dropped == ["scale"]   # the root's own parameter
    # a target's bias changed, but b has none for lora_bias: a is saved whole instead of targeted
    p = adapter.plan(m, factors, {**deltas, "a.bias": torch.ones(4)})
    assert p.targets == {"b": 3} and p.saved == ["a", "block.inner", "block.norm"]
    # every target has a bias: lora_B carries it
    p = adapter.plan(m, {"a.weight": low_rank(2)}, {"a.bias": torch.ones(4)})
    assert p.targets == {"a": 2} and p.lora_bias and not p.saved
    emb = torch.nn.Module()
    emb.embed = torch.nn.Embedding(4, 4)
    with pytest.raises(errors.BasisError, match="targets nn.Linear weights.*Embedding"):
        adapter.plan(emb, {"embed.weight": low_rank(1)}, {})
    with pytest.raises(errors.BasisError, match="nothing for a LoRA adapter"):
        adapter.plan(m, {"a.weight": (torch.zeros(4, 0), torch.zeros(0), torch.zeros(4, 0))}, {})


@pytest.mark.parametrize("n_fraction", [0.05, 0.5])     # N below and above the basis's rank K = 3
def test_a_jobs_delta_factors_are_its_whole_change_over_the_base(n_fraction):
    from axis_stream.adapt.model import SVDAdapted
    from axis_stream.core.stage1 import Factors

    base = tiny_model("llama")
    before = {n: p.detach().double().clone() for n, p in base.named_parameters()}
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, p in base.named_parameters():
        if name.endswith("proj.weight"):
            (m, n), r = p.shape, 3
            factors[name] = Factors(torch.linalg.qr(torch.randn(m, r, generator=g)).Q, torch.rand(r, generator=g) + 0.1,
                                    torch.linalg.qr(torch.randn(n, r, generator=g)).Q)
    model = SVDAdapted(base, factors, {}, n_fraction, seed=1)
    with torch.no_grad():
        for sp in model.spectra:                      # as if trained, signs included
            sp.lam.add_(torch.randn(sp.lam.shape, generator=g))
    merged = model.merged_state_dict()
    deltas = model.delta_factors(factors)
    assert set(deltas) == set(factors)
    for name, (U, sigma, V) in deltas.items():
        assert sigma.numel() == max(3, model.spectra[model.names.index(name)].lam.numel())
        torch.testing.assert_close((U.double() * sigma.double()) @ V.double().mT, merged[name].double() - before[name],
                                   rtol=0, atol=1e-6)
