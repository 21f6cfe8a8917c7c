"""The evaluation harness: plan, results file, resumability, and a tiny experiment end to end on CPU."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from axis_stream.cli import main
from axis_stream.errors import AxisError, ConfigError
from axis_stream.experiments.baselines import references
from axis_stream.experiments.evaluate.experiment import load_experiment
from axis_stream.experiments.evaluate.plan import plan
from axis_stream.experiments.evaluate.results import RESULTS, Results, _key
from axis_stream.experiments.evaluate.runner import LOCK, run_experiment
from axis_stream.store import atomic
from axis_stream.testing import finetuned_like

COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def image_folder(root: Path, seed: int, train: int = 10, test: int = 4) -> Path:
    """Three classes of noisy solid-colour 32x32 images, as imagefolder train/ and test/."""
    gen = torch.Generator().manual_seed(seed)
    for split, count in (("train", train), ("test", test)):
        for cls, rgb in COLORS.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                px = (torch.tensor(rgb).view(3, 1, 1) + 60 * torch.randn(3, 32, 32, generator=gen)).clamp(0, 255)
                Image.fromarray(px.byte().permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "experiment-tiny.toml"


def write_experiment(tmp_path: Path, tiny_base, methods=None, extra: str = "", replace: dict | None = None,
                     files: bool = True) -> Path:
    """config/experiment-tiny.toml in ``tmp_path`` with the files it names built there.

    ``methods`` replaces its [[methods]] tables, ``extra`` is appended, ``replace`` edits lines.
    """
    cfg, base_sd = tiny_base
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    shutil.copy(cfg.model_config, tiny / "axis-tiny.json")
    shutil.copy(cfg.pretrained, tiny / "axis-tiny-base.safetensors")
    if files:
        (tiny / "sources").mkdir()
        for seed, name in enumerate(("cars", "dtd", "mnist"), 1):
            save_file(finetuned_like(base_sd, seed), tiny / "sources" / f"{name}.safetensors")
        image_folder(tiny / "data" / "cars", 1)
        image_folder(tiny / "data" / "dtd", 2)
    text = EXAMPLE.read_text()
    if methods is not None:
        text = text[: text.index("[[methods]]")] + "".join(f'[[methods]]\nname = "{m}"\n' for m in methods)
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "experiment.toml"
    path.write_text(text + extra)
    return path


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_targets_three_sources_two_methods_end_to_end_and_resume(tmp_path, tiny_base, one_thread):
    path = write_experiment(tmp_path, tiny_base)
    exp = load_experiment(path)
    lines = []
    run_experiment(exp, lines.append)
    out = tmp_path / "tiny" / "evaluation"
    rows = read_rows(out / "results.csv")
    # leave-one-out: each target's pool is the two other sources, added at levels 1 and 2
    assert len(rows) == 2 * 2 * 2
    assert {(r["method"], r["target"], r["sources"]) for r in rows} == {
        (m, t, s) for m in ("axis", "atlas") for t in ("cars", "dtd") for s in ("1", "2")}
    by = {(r["method"], r["target"], r["sources"]): r for r in rows}
    assert by[("axis", "cars", "2")]["source_names"] == "dtd+mnist"
    assert by[("atlas", "dtd", "1")]["source_names"] == "cars"
    for r in rows:
        assert 0 <= float(r["test_accuracy"]) <= 1 and int(r["trainable_params"]) > 0
    # budgets are matched: AXIS trains k_for(shape, 0.2) values per matrix; aTLAS's count is its formula
    axis_count = int(by[("axis", "cars", "1")]["trainable_params"])
    assert axis_count == 2 * 4 * 12  # two blocks x four matrices with min(m, n) = 64 -> 12 values each
    assert float(by[("atlas", "cars", "2")]["peak_memory_mb"]) > float(by[("atlas", "cars", "1")]["peak_memory_mb"])
    for name in ("accuracy_vs_sources.png", "accuracy_vs_params.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("mean test accuracy") for line in lines)

    # a restart redoes nothing; a lost row (and a half-written line) is redone, and only that one
    before = (out / "results.csv").read_text()
    result = CliRunner().invoke(main, ["evaluate", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "8 runs planned, 8 already in" in result.output
    assert (out / "results.csv").read_text() == before
    kept = before.splitlines(keepends=True)[:-1]
    (out / "results.csv").write_text("".join(kept) + "axis,cars,2,0.")
    lines = []
    run_experiment(load_experiment(path), lines.append)
    assert lines[0].startswith("8 runs planned, 7 already in")
    rows_again = read_rows(out / "results.csv")
    assert len(rows_again) == 8
    assert sorted(_key(r) for r in rows_again) == sorted(_key(r) for r in rows)


def test_references_and_robustness_options(tmp_path, tiny_base, one_thread):
    path = write_experiment(tmp_path, tiny_base, methods=("zeroshot", "linear-probe", "ta"), replace={
        "levels = []": "levels = [2]", "patch_dropout = [0.0]": "patch_dropout = [0.0, 0.5]",
        "corrupt = [false]": "corrupt = [false, true]", "train_fractions = [1.0]": "train_fractions = [1.0, 0.5]"})
    exp = load_experiment(path)
    exp.targets = exp.targets[:1]
    rows = run_experiment(exp, lambda line: None)
    zs = [r for r in rows if r["method"] == "zeroshot"]
    assert len(zs) == 2 and {r["patch_dropout"] for r in zs} == {"0", "0.5"}  # one evaluation, two dropout levels
    assert all(r["trainable_params"] == "0" and r["sources"] == "0" for r in zs)
    lp = [r for r in rows if r["method"] == "linear-probe"]
    assert len(lp) == 2 * 2 and all(r["trainable_params"] == str(3 * 32) for r in lp)
    ta = [r for r in rows if r["method"] == "ta"]
    assert len(ta) == 2 * 2 * 2  # corrupt x train fraction x patch dropout
    assert {(r["corrupt"], r["train_fraction"]) for r in ta} == {("no", "1"), ("yes", "1"), ("no", "0.5"), ("yes", "0.5")}
    plots = tmp_path / "tiny" / "evaluation" / "plots"
    for name in ("accuracy_vs_patch_dropout.png", "accuracy_vs_corrupt.png", "accuracy_vs_train_fraction.png"):
        assert (plots / name).exists()


def test_plan_leave_one_out_levels_and_sweeps(tmp_path, tiny_base):
    path = write_experiment(tmp_path, tiny_base, methods=("axis-global", "zeroshot", "lora"), files=False, replace={
        "prune_ratios = [0.0]": "prune_ratios = [0.0, 0.9]", "budgets = [0.2]": "budgets = [0.1, 0.4]",
        "seeds = [0]": "seeds = [0, 1]", "k_fractions = [0.1]": "k_fractions = [0.1, 0.3]"})
    runs = plan(load_experiment(path))
    merges_ = [r for r in runs if r.method.name == "axis-global"]
    # 2 targets x 2 levels x 2 K x 2 prune x 2 seeds x 2 budgets
    assert len(merges_) == 2 * 2 * 2 * 2 * 2 * 2
    assert all(r.target.name not in {s.name for s in r.sources} for r in runs)
    zs = [r for r in runs if r.method.name == "zeroshot"]
    assert len(zs) == 2 and all(not r.sources and r.budget == 0 for r in zs)
    lora = [r for r in runs if r.method.name == "lora"]
    assert len(lora) == 2 * 2 * 2 and all(r.k_fraction is None and r.prune_ratio == 0 for r in lora)
    # runs that share a merged basis are adjacent, so it is built once for all budgets
    keys = [r.basis_key() for r in merges_]
    assert sum(1 for a, b in zip(keys, keys[1:]) if a != b) + 1 == len(set(keys))


@pytest.mark.parametrize("snippet,message", [
    ('[[methods]]\nname = "nope"\n', "is not one of"),
    ('[[methods]]\nname = "ties"\nlamda = 1.0\n', "no parameter"),
    ('[[methods]]\nname = "atlas"\nrank = 2\n', "no parameter"),
    ('[[methods]]\nname = "axis"\nlabel = "a"\n[[methods]]\nname = "ta"\nlabel = "a"\n', "no two may share"),
    ('[[methods]]\nname = "lora"\nepochs = "x"\n', "expected int"),
    ('[[methods]]\nname = "axis"\nstart_scale = -0.3\n', r"methods\[0\]: adapt.start_scale: must be a finite number"),
    ('[[methods]]\nname = "atlas"\nstart_scale = 0.3\n', r"methods\[0\].start_scale: applies only to a Stage 1"),
])
def test_bad_experiment_files_name_the_file_and_the_key(tmp_path, tiny_base, snippet, message):
    path = write_experiment(tmp_path, tiny_base, methods=(), extra=snippet, files=False)
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(path)
    assert str(path) in str(info.value)


def test_a_methods_start_scale_parses_and_is_where_lambda_starts(tmp_path, tiny_base, one_thread):
    extra = ('[[methods]]\nname = "axis"\nlabel = "axis-from-base"\nstart_scale = 0\nlr = 1e-9\n'
             '[[methods]]\nname = "axis"\nlr = 1e-9\n')  # lr 1e-9: the saved best Lambda is where it started
    path = write_experiment(tmp_path, tiny_base, methods=(), extra=extra, replace={"levels = []": "levels = [1]"})
    exp = load_experiment(path)
    assert [m.hp for m in exp.methods] == [{"start_scale": 0.0, "lr": 1e-9}, {"lr": 1e-9}]
    exp.targets = exp.targets[:1]
    rows = run_experiment(exp, lambda line: None)
    assert sorted(r["method"] for r in rows) == ["axis", "axis-from-base"]
    biggest, starts = {}, {}
    for folder in (tmp_path / "tiny" / "evaluation" / "runs").iterdir():
        report = json.loads((folder / "report.json").read_text())
        lam = load_file(folder / "lambda.safetensors")
        biggest[report["hyperparameters"]["start_scale"]] = max(v.abs().max().item() for v in lam.values())
        starts[report["hyperparameters"]["start_scale"]] = report["start"]
    assert biggest.keys() == {0.0, "auto"} and biggest[0.0] < 1e-6  # the default is auto: scored starts
    assert starts[0.0] == {"chosen": "fixed", "scale": 0.0, "candidates": []}
    assert [c["name"] for c in starts["auto"]["candidates"]] == ["merged", "half", "zero"]  # no calibration here
    assert (biggest["auto"] > 1e-3) == (starts["auto"]["chosen"] != "zero")


def test_a_merge_without_stage2_is_base_plus_its_merged_delta(tmp_path, tiny_base, one_thread):
    """``stage2 = false``: one evaluation per level, nothing trained, the accuracy of a hand-built
    base + lam * sum of the task vectors with the target's zero-shot head."""
    import open_clip

    from axis_stream.adapt.device import amp_for
    from axis_stream.adapt.head import zero_shot_head
    from axis_stream.adapt.recipe import evaluate
    from axis_stream.experiments.evaluate.harness import Harness
    from axis_stream.store import models

    extra = '[[methods]]\nname = "ta"\nlabel = "ta-merged"\nstage2 = false\nlam = 0.7\n'
    path = write_experiment(tmp_path, tiny_base, methods=(), extra=extra)
    exp = load_experiment(path)
    exp.targets = exp.targets[:1]
    rows = run_experiment(exp, lambda line: None)
    assert [(r["method"], r["sources"], r["budget"], r["trainable_params"]) for r in rows] == [
        ("ta-merged", "1", "0", "0"), ("ta-merged", "2", "0", "0")]
    harness = Harness(exp, lambda line: None)
    for run, row in zip(plan(exp), rows):
        hp = run.settings(exp.adapt)
        base = models.create_base(exp.base)
        target = harness.target(run)
        head = zero_shot_head(base, open_clip.get_tokenizer(exp.base.model), target.classnames, target.templates)
        tvs = [harness.task_vector(s) for s in run.sources]
        base.load_state_dict({k: v + 0.7 * sum(tv[k] for tv in tvs) if k in tvs[0] else v
                              for k, v in harness.base_sd.items()})
        test = harness.splits(run, hp, None, base).test
        want = evaluate(references.Frozen(base), head, test, hp, torch.device("cpu"), amp_for(torch.device("cpu"), hp.amp))
        assert float(row["test_accuracy"]) == pytest.approx(want, abs=1e-5)


def test_results_file_refuses_other_columns(tmp_path):
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(AxisError, match="columns"):
        Results(tmp_path / "results.csv")


def test_seeded_patch_dropout_keeps_the_class_token_and_is_reproducible():
    x = torch.arange(2 * 11 * 3, dtype=torch.float32).reshape(2, 11, 3)
    a = references.SeededPatchDropout(0.5, seed=3)(x)
    b = references.SeededPatchDropout(0.5, seed=3)(x)
    assert a.shape == (2, 1 + 5, 3) and torch.equal(a, b)
    assert torch.equal(a[:, 0], x[:, 0])
    assert torch.equal(references.SeededPatchDropout(0.0, seed=3)(x), x)


def test_lora_starts_at_the_base_and_counts_rank_times_m_plus_n(tiny_base):
    from axis_stream.store import models

    cfg, base_sd = tiny_base
    names = ["visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.1.mlp.c_fc.weight"]
    model = references.LoRA(models.create_base(cfg), names, rank=3)
    assert model.trainable_count() == 3 * ((192 + 64) + (256 + 64))
    assert all(torch.equal(w, base_sd[n]) for n, w in model.weights().items())
    assert references.lora_rank_for_budget(1000, [(192, 64), (256, 64)]) == 2
    assert references.lora_rank_for_budget(10, [(192, 64)]) == 1


def test_a_second_evaluation_on_the_same_output_dir_is_refused(tmp_path, tiny_base):
    """Two processes appending to one results.csv would write rows twice: the second is refused at once."""
    exp = load_experiment(write_experiment(tmp_path, tiny_base, files=False))
    exp.output_dir.mkdir(parents=True)
    (exp.output_dir / RESULTS).write_text("kept\n")
    with (atomic.file_lock(exp.output_dir / LOCK),  # as another evaluation would hold it
          pytest.raises(AxisError, match="another axis-stream evaluate is running on this output_dir")):
        run_experiment(exp, lambda line: None)
    assert (exp.output_dir / RESULTS).read_text() == "kept\n"
