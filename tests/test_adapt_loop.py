"""One Stage 2 loop: the daemon's recipe and the suites' harness train through ``adapt.loop.Loop`` and agree."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_adapt_data import write_colour_folders
from test_adapt_model import snapshot_from_sources

from axis_stream import config
from axis_stream.adapt import recipe
from axis_stream.adapt.data import make_splits, resolve_target, transforms_for
from axis_stream.adapt.head import logits
from axis_stream.adapt.loop import epoch_order
from axis_stream.adapt.model import SVDAdapted
from axis_stream.experiments.suites import Task
from axis_stream.experiments.suites.harness import TaskData, train_stage2
from axis_stream.store import models


@pytest.mark.parametrize("start_scale", ["auto", 0.3])
def test_the_daemon_recipe_and_the_suite_harness_give_the_same_numbers(tiny_base, tmp_path, monkeypatch,
                                                                        start_scale):
    """The same tiny target, data, head and basis through ``recipe.adapt`` (images through DataLoaders,
    resumable state, files) and through the suites' ``train_stage2`` (tensor rows, ``TaskData``): the
    same start, the same validation and test accuracies at epoch 0 and after, the same Lambda bit for bit.
    The recipe's training augmentation is replaced by its evaluation transform, so both see the same tensors."""
    cfg, base_sd = tiny_base
    snapshot = snapshot_from_sources(base_sd)
    snapshot.calibration = {name: 0.5 for name in list(snapshot.factors)[::2]}
    colours = write_colour_folders(tmp_path / "colours", n_train=20, n_test=10)
    eval_tf = transforms_for(models.create_base(cfg))[1]
    monkeypatch.setattr(recipe, "transforms_for", lambda base: (eval_tf, eval_tf))
    params = {"target": f"imagefolder:{colours}", "device": "cpu", "num_workers": 0, "batch_size": 16,
              "n_fraction": 0.4, "epochs": 3, "lr": 0.05, "start_scale": start_scale}
    job = recipe.job_settings(params, config.Config())
    (tmp_path / "job").mkdir()
    events = []
    report = recipe.adapt(models.create_base(cfg), cfg, snapshot, job, tmp_path / "job", events.append)

    hp = job.hp
    splits = make_splits(resolve_target(job.target, None), eval_tf, eval_tf, val_fraction=hp.val_fraction,
                         val_max=hp.val_max)
    tasks = []
    for ds in (splits.train, splits.val, splits.test):
        items = [ds[i] for i in range(len(ds))]
        tasks.append(Task("colours", [], [], torch.stack([x for x, _ in items]),
                          torch.tensor([y for _, y in items]), [], torch.empty(0)))
    head = load_file(tmp_path / "job" / "head.safetensors")["head"]
    torch.manual_seed(hp.seed)
    model = SVDAdapted(models.create_base(cfg), snapshot.factors, snapshot.means, hp.n_fraction, seed=hp.seed,
                       start_scale=hp.start_scale, calibration=snapshot.calibration)
    data = TaskData(*tasks, head, hp.batch_size, eval_batch_size=hp.batch_size, call="encode_image", scores=logits)
    lines = []
    suite = train_stage2(model, head, *tasks, hp, lines.append, data=data)

    assert report["start"] == suite.start and report["start"]["chosen"] in ("merged", "calibrated", "half", "zero",
                                                                           "fixed")
    if start_scale == "auto":
        assert [c["name"] for c in report["start"]["candidates"]] == ["merged", "calibrated", "half", "zero"]
        assert [e["phase"] for e in events[:2]] == ["start", "validate"]
    assert (report["initial_val_accuracy"], report["initial_test_accuracy"]) == (suite.initial_val, suite.initial_test)
    assert (report["val_accuracy"], report["test_accuracy"], report["best_epoch"]) == (suite.val, suite.test,
                                                                                      suite.best_epoch)
    saved = load_file(tmp_path / "job" / "lambda.safetensors")
    assert saved.keys() == model.lambdas().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.lambdas().items())
    assert len(lines) == hp.epochs + (start_scale == "auto")


def test_an_epoch_order_is_fixed_by_seed_and_epoch():
    assert torch.equal(epoch_order(50, 0, 1), epoch_order(50, 0, 1))
    assert not torch.equal(epoch_order(50, 0, 1), epoch_order(50, 0, 2))
    assert not torch.equal(epoch_order(50, 0, 1), epoch_order(50, 1, 1))
    assert sorted(epoch_order(50, 3, 4).tolist()) == list(range(50))
