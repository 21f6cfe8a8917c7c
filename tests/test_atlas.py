"""aTLAS on the tiny CLIP: exact base at zero, the weight formula, the trainable count, and its memory."""

import pytest
import torch

from axis_stream.experiments.baselines import atlas
from axis_stream.experiments.baselines.memory import step_peak_bytes
from axis_stream.store import models
from axis_stream.testing import finetuned_like


def task_vectors(base_sd, count):
    return [{k: v - base_sd[k] for k, v in finetuned_like(base_sd, seed).items() if v.is_floating_point()}
            for seed in range(1, count + 1)]


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def visual_counts(model):
    params = [p for n, p in model.named_parameters() if n.startswith("visual.")]
    return sum(p.dim() == 2 for p in params), sum(p.dim() != 2 for p in params)


def test_zero_coefficients_are_exactly_the_base_model(tiny_base, images):
    cfg, base_sd = tiny_base
    reference = models.create_base(cfg).eval()
    model = atlas.ATLAS(models.create_base(cfg).eval(), task_vectors(base_sd, 3), partitions=4)
    with torch.no_grad():
        assert torch.equal(model.call("encode_image", images), reference.encode_image(images))
        weights = model.weights()
    assert all(torch.equal(w, base_sd[name]) for name, w in weights.items())


@pytest.mark.parametrize("sources,partitions", [(1, 1), (2, 3), (3, 8)])
def test_trainable_count_matches_the_formula(tiny_base, sources, partitions):
    cfg, base_sd = tiny_base
    model = atlas.ATLAS(models.create_base(cfg), task_vectors(base_sd, sources), partitions)
    n_2d, n_other = visual_counts(model.base)
    expected = sources * (partitions * n_2d + n_other)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == model.trainable_count()
    assert atlas.trainable_count(sources, partitions, n_2d, n_other) == expected
    assert (len(model.names_2d), len(model.names_other)) == (n_2d, n_other)
    assert not any(p.requires_grad for p in model.base.parameters())


def test_p_for_budget_picks_the_closest_count():
    # ViT-B-32's visual tower: 50 two-D tensors, 102 others; AXIS's 10 / 40 % budgets with 21 sources
    assert atlas.p_for_budget(3648, 21, 50, 102) == 1
    assert atlas.p_for_budget(14736, 21, 50, 102) == 12
    for budget in range(1, 3000, 37):
        p = atlas.p_for_budget(budget, 3, 7, 5)
        best = min(range(1, 200), key=lambda q: (abs(atlas.trainable_count(3, q, 7, 5) - budget), q))
        assert p == best


def test_weights_match_the_partition_formula(tiny_base):
    cfg, base_sd = tiny_base
    tvs = task_vectors(base_sd, 2)
    model = atlas.ATLAS(models.create_base(cfg), tvs, partitions=3, seed=5)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.coef_2d.copy_(torch.randn(model.coef_2d.shape, generator=gen))
        model.coef_other.copy_(torch.randn(model.coef_other.shape, generator=gen))
        weights = model.weights()
    coef_2d, coef_other = model.coef_2d.detach(), model.coef_other.detach()
    for j, name in enumerate(model.names_2d):
        index = atlas.partition_index(base_sd[name].shape, 3, seed=5)
        ref = base_sd[name].double().clone()
        for i, tv in enumerate(tvs):
            for p in range(3):
                ref += float(coef_2d[i, j, p]) * (index == p).double() * tv[name].double()
        assert torch.allclose(weights[name].double(), ref, atol=1e-6)
    for j, name in enumerate(model.names_other):
        ref = base_sd[name].double() + sum(float(coef_other[i, j]) * tv[name].double()
                                           for i, tv in enumerate(tvs))
        assert torch.allclose(weights[name].double(), ref, atol=1e-6)


def test_masks_are_shared_by_shape_and_seeded(tiny_base):
    cfg, base_sd = tiny_base
    model = atlas.ATLAS(models.create_base(cfg), task_vectors(base_sd, 1), partitions=5, seed=3)
    shapes = {tuple(base_sd[n].shape) for n in model.names_2d}
    masks = [b for n, b in model.named_buffers() if n.startswith("mask_")]
    assert len(masks) == len(shapes) < len(model.names_2d)
    assert torch.equal(atlas.partition_index((64, 64), 5, 3), atlas.partition_index((64, 64), 5, 3))
    assert set(atlas.partition_index((64, 64), 5, 3).unique().tolist()) == set(range(5))


def test_gradients_reach_every_coefficient(tiny_base, images):
    cfg, base_sd = tiny_base
    model = atlas.ATLAS(models.create_base(cfg), task_vectors(base_sd, 2), partitions=2)
    model.call("encode_image", images).pow(2).sum().backward()
    assert model.coef_2d.grad is not None and bool((model.coef_2d.grad != 0).all())
    assert model.coef_other.grad is not None and bool((model.coef_other.grad != 0).any())


def test_peak_memory_grows_with_the_number_of_sources(tiny_base, images):
    cfg, base_sd = tiny_base
    peaks = []
    for sources in (1, 3):
        model = atlas.ATLAS(models.create_base(cfg), task_vectors(base_sd, sources), partitions=2)
        peaks.append(step_peak_bytes(model, lambda model=model: model.call("encode_image", images).sum().backward()))
    visual_bytes = sum(t.nbytes for n, t in base_sd.items() if n.startswith("visual."))
    assert peaks[1] - peaks[0] >= 2 * visual_bytes * 0.9  # two more resident source vectors, at least
