"""models/: every registered architecture, through the normalising wrapper.

Parametrised over ``MODELS``: a newly registered model is tested without touching this file.
Inputs here are synthetic tensors because only shapes are checked.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from antidoor.errors import AntidoorError
from antidoor.models import MODELS, Classifier, build_model

SHAPES = [(3, 32, 32), (1, 28, 28), (3, 40, 40), (3, 24, 36)]


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS.names())
def test_forward_shape(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=shape[0], width=4).eval()
    x = torch.rand(3, *shape)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    assert feats.shape == (3, model.backbone.head.in_features)
    assert torch.allclose(model.backbone.head(feats), logits, atol=1e-5)


@pytest.mark.parametrize("name", MODELS.names())
def test_width_knob(name: str) -> None:
    narrow = build_model(name, num_classes=10, width=4)
    wide = build_model(name, num_classes=10, width=8)
    assert first_conv(narrow.backbone).out_channels == 4
    assert first_conv(wide.backbone).out_channels == 8
    assert wide.backbone.head.in_features == 2 * narrow.backbone.head.in_features
    assert sum(p.numel() for p in wide.parameters()) > 2 * sum(p.numel() for p in narrow.parameters())
    assert narrow.arch == {"name": name, "num_classes": 10, "in_channels": 3, "kwargs": {"width": 4}}


@pytest.mark.parametrize("name", MODELS.names())
def test_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, width=4).train()
    loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_classifier_normalises_with_its_buffers() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2), width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    manual = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.backbone(manual))
    assert {"mean", "std"} <= set(model.state_dict())
    assert isinstance(model, Classifier)


def test_default_normalisation_is_half() -> None:
    model = build_model("small_cnn", num_classes=3, in_channels=1, width=4)
    assert model.mean.flatten().tolist() == [0.5] and model.std.flatten().tolist() == [0.5]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "no_such_net", "num_classes": 10}, "unknown model 'no_such_net'; available: .*small_cnn"),
    ({"name": "small_cnn", "num_classes": 1}, "at least 2"),
    ({"name": "small_cnn", "num_classes": 10, "in_channels": 2}, "in_channels must be 1 or 3"),
    ({"name": "small_cnn", "num_classes": 10, "width": 0}, "model.width must be a positive integer"),
    ({"name": "small_cnn", "num_classes": 10, "depth": 3}, "bad arguments"),
    ({"name": "small_cnn", "num_classes": 10, "in_channels": 1, "mean": (0.5,) * 3, "std": (0.2,) * 3}, "normalisation"),
])
def test_build_model_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(AntidoorError, match=match):
        build_model(**kwargs)
