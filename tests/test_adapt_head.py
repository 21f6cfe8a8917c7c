"""The zero-shot head (SPEC section 5) and the class names and templates shipped for the paper's datasets."""

from __future__ import annotations

import open_clip
import pytest
import torch

from axis_stream.adapt.head import check_texts, logits, packaged_texts, zero_shot_head
from axis_stream.adapt.model import AdaptError
from axis_stream.store import models

PAPER_DATASETS = {  # key: number of classes
    "cars": 196, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "resisc45": 45, "sun397": 397, "svhn": 10,
    "cifar10": 10, "cifar100": 100, "stl10": 10, "food101": 101, "flowers102": 102, "fer2013": 7, "pcam": 2,
    "oxfordiiitpet": 37, "renderedsst2": 2, "emnist": 10, "fashionmnist": 10, "kmnist": 10, "fgvcaircraft": 100,
    "country211": 211,
}


def test_the_22_datasets_ship_with_class_names_and_templates():
    texts = packaged_texts()
    assert {k: len(v["classnames"]) for k, v in texts.items()} == PAPER_DATASETS
    for key, entry in texts.items():
        check_texts(entry["classnames"], entry["templates"], key)
    assert texts["mnist"]["templates"] == ['a photo of the number: "{}".']
    assert texts["eurosat"]["classnames"][0] == "annual crop land"
    assert texts["fer2013"]["classnames"][-1] == "neutral"  # torchvision's label order


def test_head_is_the_normalised_template_average_scaled_by_logit_scale(tiny_base):
    model = models.create_base(tiny_base[0])
    tokenizer = open_clip.get_tokenizer("axis-tiny")
    classnames, templates = ["red square", "green circle", "blue star"], ["a photo of a {}.", "a drawing of the {}."]
    head = zero_shot_head(model, tokenizer, classnames, templates, batch_size=4)
    with torch.no_grad():
        rows = []
        for c in classnames:
            f = model.encode_text(tokenizer([t.replace("{}", c) for t in templates])).double()
            f = (f / f.norm(dim=-1, keepdim=True)).mean(dim=0)
            rows.append(f / f.norm())
        ref = torch.stack(rows) * model.logit_scale.double().exp()
    assert head.shape == (3, models.TINY_CLIP["embed_dim"]) and not head.requires_grad
    torch.testing.assert_close(head.double(), ref, rtol=0, atol=1e-5)
    features = torch.randn(5, head.shape[1], dtype=torch.float64)
    expected = (features / features.norm(dim=-1, keepdim=True)) @ ref.T
    torch.testing.assert_close(logits(features, head).double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("classnames, templates, message", [
    (["cat"], ["a {}"], "at least two"),
    (["cat", "cat"], ["a {}"], "'cat' appears more than once"),
    (["cat", "dog"], ["a photo"], "where the class name goes"),
    (["cat", ""], ["a {}"], "non-empty"),
])
def test_bad_class_lists_are_clear_errors(classnames, templates, message):
    with pytest.raises(AdaptError, match=message):
        check_texts(classnames, templates, "my list")
