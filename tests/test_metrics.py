"""metrics.py: clean_acc, asr, robust_acc and der, as methods.md defines them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from antidoor.attacks import create_attack
from antidoor.data import ImageData
from antidoor.errors import AntidoorError
from antidoor.metrics import Evaluator, der, evaluate, predict
from antidoor.models import build_model


class AlwaysClass(nn.Module):
    """A classifier that answers one class whatever the image: makes the metrics' denominators visible."""

    def __init__(self, cls: int, num_classes: int = 10) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.bias[cls] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1)


def test_asr_excludes_target_class_images(bundled: ImageData) -> None:
    attack = create_attack({"name": "badnets", "target": 2}, (3, 32, 32), 10)
    ev = Evaluator(bundled.x_test, bundled.y_test, attack)
    assert len(ev.x_bd) == 900 and not (ev.y_bd == 2).any()
    assert ev.x_bd.dtype == torch.uint8
    # a model that always answers class 3: 100 of the 900 non-target images are cats
    m = ev(AlwaysClass(3))
    assert m["clean_acc"] == pytest.approx(0.1)
    assert m["asr"] == 0.0
    assert m["robust_acc"] == pytest.approx(100 / 900)  # 100 / 1000 if target images were counted
    # a model that always answers the target: asr 1, nothing robust
    m = ev(AlwaysClass(2))
    assert m == pytest.approx({"clean_acc": 0.1, "asr": 1.0, "robust_acc": 0.0})


def test_triggered_test_images_are_the_stored_trigger(bundled: ImageData) -> None:
    attack = create_attack({"name": "blended", "target": 0}, (3, 32, 32), 10)
    ev = Evaluator(bundled.x_test, bundled.y_test, attack, batch_size=100)
    keep = bundled.y_test != 0
    expected = (attack.apply(bundled.x_test[keep].float() / 255) * 255).round().to(torch.uint8)
    assert torch.equal(ev.x_bd, expected)


def test_metrics_of_a_trained_backdoored_model_match_a_manual_count(badnets_run: object) -> None:
    res = badnets_run.result
    data, attack, model = badnets_run.data, res.scenario.attack, res.model
    pred_clean = predict(model, data.x_test)
    keep = data.y_test != attack.target
    pred_bd = predict(model, attack.apply(data.x_test[keep].float() / 255))
    manual = {"clean_acc": (pred_clean == data.y_test).float().mean().item(),
              "asr": (pred_bd == attack.target).float().mean().item(),
              "robust_acc": (pred_bd == data.y_test[keep]).float().mean().item()}
    assert res.metrics == pytest.approx(manual, abs=1e-6)
    assert evaluate(model, data.x_test, data.y_test, attack) == pytest.approx(manual, abs=1e-6)


def test_no_attack_gives_clean_accuracy_only(bundled: ImageData) -> None:
    model = AlwaysClass(4)
    assert evaluate(model, bundled.x_test, bundled.y_test) == pytest.approx({"clean_acc": 0.1})
    none = create_attack({"name": "none", "pratio": 0}, (3, 32, 32), 10)
    assert set(evaluate(model, bundled.x_test, bundled.y_test, none)) == {"clean_acc"}


def test_predict_uint8_and_float_agree_and_restore_mode(bundled: ImageData) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, width=4).train()
    x = bundled.x_test[::50]
    a = predict(model, x, batch_size=7)
    b = predict(model, x.float() / 255, batch_size=64)
    assert torch.equal(a, b) and a.shape == (20,) and model.training
    assert predict(model, x[:0]).shape == (0,)


def test_evaluator_when_every_test_image_is_of_the_target_class(bundled: ImageData) -> None:
    only_target = bundled.y_test == 0
    attack = create_attack({"name": "badnets", "target": 0}, (3, 32, 32), 10)
    with pytest.raises(AntidoorError, match="asr"):
        Evaluator(bundled.x_test[only_target], bundled.y_test[only_target], attack)


# --- der ----------------------------------------------------------------------------------------


def reference_der(b: dict, a: dict) -> float:
    return (max(0.0, b["asr"] - a["asr"]) - max(0.0, b["clean_acc"] - a["clean_acc"]) + 1) / 2


@pytest.mark.parametrize(("before", "after", "expected"), [
    # asr falls by 0.8 while accuracy falls by 0.1: a sign error on the accuracy term would give 0.9
    ({"asr": 0.9, "clean_acc": 0.8}, {"asr": 0.1, "clean_acc": 0.7}, 0.85),
    # accuracy rises: no bonus
    ({"asr": 0.9, "clean_acc": 0.8}, {"asr": 0.1, "clean_acc": 0.85}, 0.9),
    # asr rises: no penalty beyond zero reduction
    ({"asr": 0.2, "clean_acc": 0.8}, {"asr": 0.5, "clean_acc": 0.6}, 0.4),
    # nothing changes
    ({"asr": 0.5, "clean_acc": 0.5}, {"asr": 0.5, "clean_acc": 0.5}, 0.5),
    # the extremes
    ({"asr": 1.0, "clean_acc": 0.9}, {"asr": 0.0, "clean_acc": 0.9}, 1.0),
    ({"asr": 0.0, "clean_acc": 1.0}, {"asr": 0.0, "clean_acc": 0.0}, 0.0),
])
def test_der_formula(before: dict, after: dict, expected: float) -> None:
    assert der(before, after) == pytest.approx(expected)
    assert der(before, after) == pytest.approx(reference_der(before, after))
