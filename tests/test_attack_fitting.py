"""Attacks that fit their trigger on data (``needs_prepare``): prepare, determinism, checkpoints, pipeline.

Parametrised over every registered attack with ``needs_prepare``; each is fitted once per module on
300 real bundled images with tiny settings (``TINY``: any of these parameters an attack has is made
small), so a new fitting attack is tested here without touching this file.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from antidoor.attacks import ATTACKS, Attack, AttackerData, create_attack
from antidoor.attacks.base import quantize
from antidoor.checkpoint import load_checkpoint, save_checkpoint
from antidoor.config import AttackRunConfig, build_config
from antidoor.data import ImageData
from antidoor.errors import AntidoorError
from antidoor.metrics import Evaluator
from antidoor.models import build_model
from antidoor.pipeline import Scenario, run_meta, train_attack

FITTING = [n for n in ATTACKS.names() if ATTACKS.get(n).needs_prepare]
TARGET = 1
# the size knobs of trigger fitting, made small wherever an attack has them
TINY = {"surrogate_width": 4, "surrogate_epochs": 1, "steps": 8, "n_images": 40, "generator_width": 4, "mask_epochs": 1,
        "encoder_width": 4, "encoder_epochs": 1, "bits": 8}


def tiny_spec(name: str, **extra: object) -> dict:
    fields = ATTACKS.get(name).Params.model_fields
    return {"name": name, "target": TARGET, "pratio": 0.1, **{k: v for k, v in TINY.items() if k in fields}, **extra}


@pytest.fixture(scope="module")
def attacker(bundled: ImageData, subset: object) -> AttackerData:
    d = subset(bundled, 300, 10, seed=3)
    poison = (d.y_train == TARGET).nonzero().flatten()[:12]  # target-class images: valid for clean-label LC too
    return AttackerData(d.x_train, d.y_train, poison, d.num_classes, d.mean, d.std, d.hflip)


@pytest.fixture(scope="module")
def fitted(attacker: AttackerData) -> dict[str, tuple[Attack, dict[str, torch.Tensor]]]:
    """Each fitting attack, built and then fitted once: (fitted attack, its initial tensors)."""
    out = {}
    for name in FITTING:
        attack = create_attack({**tiny_spec(name), "seed": 4}, (3, 32, 32), 10)
        initial = {k: v.clone() for k, v in attack.tensors.items()}
        assert not attack.prepared
        out[name] = (attack.prepare(attacker), initial)
    return out


def test_the_new_attacks_are_registered_and_fit() -> None:
    assert {"lc", "lf", "trojannn", "input_aware", "ssba_style"} <= set(FITTING)
    assert not {"badnets", "blended", "sig", "wanet", "none"} & set(FITTING)


@pytest.mark.parametrize("name", FITTING)
def test_prepare_fits_the_trigger_and_keeps_shapes(name: str, fitted: dict, bundled: ImageData) -> None:
    attack, initial = fitted[name]
    assert attack.prepared
    for k, t in initial.items():
        assert attack.tensors[k].shape == t.shape and attack.tensors[k].dtype == t.dtype
    assert any(k not in initial or not torch.equal(initial[k], attack.tensors[k]) for k in attack.tensors), "nothing was fitted"
    assert attack.fit_report and all(math.isfinite(v) for v in attack.fit_report.values())
    x = bundled.x_test[:16].float() / 255
    out = attack.apply(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(quantize(out), out)
    assert ((out - x).abs().flatten(1).amax(1) > 0).float().mean() > 0.9


@pytest.mark.parametrize("name", FITTING)
def test_prepare_is_deterministic_by_seed_and_runs_once(name: str, fitted: dict, attacker: AttackerData) -> None:
    attack, _ = fitted[name]
    rng_before = torch.random.get_rng_state()
    again = create_attack({**tiny_spec(name), "seed": 4}, (3, 32, 32), 10).prepare(attacker)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "prepare must not move the global RNG"
    assert again.tensors.keys() == attack.tensors.keys()
    for k in attack.tensors:
        assert torch.equal(again.tensors[k], attack.tensors[k]), k
    kept = dict(again.tensors)
    assert again.prepare(attacker) is again and all(again.tensors[k] is kept[k] for k in kept), "a second prepare refits"


@pytest.mark.parametrize("name", FITTING)
def test_fitted_trigger_survives_a_checkpoint(name: str, fitted: dict, bundled: ImageData, tmp_path: Path) -> None:
    attack, _ = fitted[name]
    model = build_model("small_cnn", 10, 3, width=4)
    meta = {"dataset": {"image_shape": [3, 32, 32]}}
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, meta, attack))
    loaded = ckpt.attack
    assert loaded.prepared and loaded.name == name
    for k in attack.tensors:
        assert torch.equal(loaded.tensors[k], attack.tensors[k]), k
    x = bundled.x_test[:8].float() / 255
    assert torch.equal(loaded.apply(x), attack.apply(x))
    # the spec alone rebuilds only the unfitted trigger
    assert not create_attack(attack.spec(), (3, 32, 32), 10).prepared


def test_unfitted_attack_warns_when_measured(bundled: ImageData, capsys: pytest.CaptureFixture) -> None:
    attack = create_attack(tiny_spec("lf"), (3, 32, 32), 10)
    Evaluator(bundled.x_test[:20], bundled.y_test[:20], attack)
    assert "has not been fitted" in capsys.readouterr().err


@pytest.mark.parametrize("name", FITTING)
def test_train_attack_fits_before_training_and_records_it(name: str, bundled: ImageData, subset: object, tmp_path: Path) -> None:
    data = subset(bundled, 300, 60, seed=5)
    overrides = ["model.name=small_cnn", "model.width=4", "train.epochs=1", "train.batch_size=64", "device=cpu", "seed=2",
                 *(f"attack.{k}={v}" for k, v in tiny_spec(name).items())]
    cfg = build_config(AttackRunConfig, overrides=overrides)
    scenario = Scenario.build(cfg.data, cfg.attack, cfg.seed, "cpu", data=data)
    assert not scenario.attack.prepared
    result = train_attack(cfg, scenario)
    assert scenario.attack.prepared and result.prepare_seconds > 0
    assert {"clean_acc", "asr", "robust_acc"} <= set(result.metrics)
    meta = run_meta(cfg, result)
    assert meta["attack_fit"]["seconds"] >= 0 and set(scenario.attack.fit_report) <= set(meta["attack_fit"])
    path = save_checkpoint(tmp_path / "m.safetensors", result.model, meta, scenario.attack, scenario.splits)
    ckpt = load_checkpoint(path)
    assert ckpt.attack.prepared
    x = data.x_test.float() / 255
    assert torch.equal(ckpt.attack.apply(x), scenario.attack.apply(x))
    assert ckpt.meta["attack_fit"] == meta["attack_fit"]


# --- LC ---------------------------------------------------------------------------------------


def test_lc_perturbs_only_the_poisoned_images_within_eps(fitted: dict, attacker: AttackerData) -> None:
    attack, _ = fitted["lc"]
    assert attack.clean_label
    assert torch.equal(attack.tensors["source_index"], attacker.poison)
    adv, orig = attack.tensors["source_images"].float(), attacker.x[attacker.poison].float()
    assert 0 < (adv - orig).abs().max() <= 8, "an L-inf PGD perturbation of at most eps = 8 levels"
    idx = torch.arange(0, 300, 2)
    x = attacker.x[idx].float() / 255
    swapped = attack.replace_sources(x, idx)
    hit = torch.isin(idx, attacker.poison)
    assert hit.any() and torch.equal(swapped[~hit], x[~hit])
    rows = torch.searchsorted(attacker.poison, idx[hit])
    assert torch.equal(swapped[hit], attack.tensors["source_images"][rows].float() / 255)


def test_lc_trigger_is_a_checkerboard_in_four_corners(bundled: ImageData) -> None:
    x = bundled.x_test[:4].float() / 255
    out = create_attack({"name": "lc"}, (3, 32, 32), 10).apply(x)
    corner = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    for rows in (slice(0, 3), slice(29, 32)):
        for cols in (slice(0, 3), slice(29, 32)):
            assert torch.equal(out[:, :, rows, cols], corner.expand(4, 3, 3, 3))
    assert torch.equal(out[:, :, 3:29], x[:, :, 3:29])
    half = create_attack({"name": "lc", "amplitude": 0.25}, (3, 32, 32), 10).apply(x)
    assert torch.allclose(half[:, :, 0, 0], quantize((x[:, :, 0, 0] + 0.25).clamp(0, 1)))


def test_lc_scenario_swaps_sources_before_augmentation(bundled: ImageData, subset: object) -> None:
    data = subset(bundled, 300, 10, seed=5)
    spec = tiny_spec("lc", pratio=0.02)
    sc = Scenario.build(build_config(AttackRunConfig).data, spec, 0, "cpu", data=data)
    hooks = sc.poison_hooks()
    assert hooks["before_augment"] is not None and hooks["after_augment"] is not None
    idx = sc.splits.poison
    x, y = data.x_train[idx].float() / 255, data.y_train[idx]
    swapped, _ = hooks["before_augment"](x, y, idx, torch.Generator())
    assert not torch.equal(swapped, x) and torch.equal(swapped, sc.attack.replace_sources(x, idx))
    oracle = sc.defender_data(oracle=True)
    expected = (sc.attack.apply(swapped) * 255).round().to(torch.uint8)
    assert torch.equal(oracle.poisoned_x, expected), "oracle references see the images that were trained on"


# --- LF ---------------------------------------------------------------------------------------


def test_lf_perturbation_is_bounded_and_low_frequency(fitted: dict) -> None:
    attack, _ = fitted["lf"]
    delta = attack.tensors["perturbation"]
    assert 0 < delta.abs().max() <= 25.5 / 255
    spectrum = torch.fft.fft2(delta).abs().pow(2)
    freq = torch.fft.fftfreq(32).abs()
    high = (freq[:, None] > 0.25) | (freq[None, :] > 0.25)  # the upper half of the frequency range
    assert spectrum[:, high].sum() / spectrum.sum() < 0.05
    noise = torch.fft.fft2(torch.rand(3, 32, 32) - 0.5).abs().pow(2)
    assert noise[:, high].sum() / noise.sum() > 0.5  # for contrast: white noise has most of its energy there


# --- TrojanNN ---------------------------------------------------------------------------------


def test_trojannn_pattern_stays_in_mask_and_near_its_seed(fitted: dict) -> None:
    attack, initial = fitted["trojannn"]
    mask, pattern = attack.tensors["mask"], attack.tensors["pattern"]
    assert int(mask.sum()) == 64 and torch.equal(mask[0, 24:, 24:], torch.ones(8, 8))
    assert (pattern * (1 - mask)).abs().max() == 0
    assert (pattern - initial["pattern"]).abs().max() <= 0.3 + 1e-6
    report = attack.fit_report
    assert report["neuron_activation_trigger"] > report["neuron_activation_seed"]


# --- Input-aware ------------------------------------------------------------------------------


def test_input_aware_stamp_and_cross_samples_keep_labels(fitted: dict, bundled: ImageData) -> None:
    attack, _ = fitted["input_aware"]
    x = bundled.x_test[:24].float() / 255
    pattern, mask = attack.pattern_and_mask(x)
    assert pattern.shape == x.shape and mask.shape == (24, 1, 32, 32)
    # (whether patterns differ between images is measured at full scale: fit_report's pattern_spread)
    assert torch.allclose(attack.stamp(x), x + (pattern - x) * mask)
    y = bundled.y_test[:24]
    poison = torch.zeros(24, dtype=torch.bool)
    poison[:4] = True
    px, py = attack.poison_batch(x, y, poison, torch.Generator().manual_seed(0))
    changed = (px != x).flatten(1).any(1)
    assert int(changed[~poison].sum()) == 4, "cross_ratio 1: as many cross samples as poisoned ones"
    assert torch.equal(py[~poison], y[~poison]) and (py[poison] == TARGET).all()


def test_input_aware_diversity_has_a_finite_gradient_where_two_patterns_are_equal() -> None:
    from antidoor.attacks.input_aware import _diversity

    x1, x2 = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    same = torch.full((2, 3, 8, 8), 0.5, requires_grad=True)  # a collapsed G: every image gets one pattern
    loss = _diversity(x1, x2, same, same.detach().clone())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(same.grad).all()  # sqrt(0) alone would give a NaN gradient


# --- SSBA-style -------------------------------------------------------------------------------


def test_ssba_style_residual_is_bounded_and_sample_specific(fitted: dict, bundled: ImageData) -> None:
    attack, initial = fitted["ssba_style"]
    assert torch.equal(attack.tensors["secret"], initial["secret"]) and set(attack.tensors["secret"].tolist()) <= {0.0, 1.0}
    x = bundled.x_test[:8].float() / 255
    r = attack.residual(x)
    assert r.abs().max() <= 12 / 255 + 1e-6
    assert (r[0] - r[1]).abs().max() > 1e-3, "the residual depends on the image"


# --- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "key", "value", "match"), [
    ("lc", "eps", 0, r"attack\.eps = 0"),
    ("lc", "amplitude", 1.5, r"attack\.amplitude = 1\.5"),
    ("lf", "sigma", -1, r"attack\.sigma = -1"),
    ("lf", "surrogate_model", "nope", r"attack\.surrogate_model 'nope' is not a model; available: .*small_cnn"),
    ("trojannn", "n_neurons", 0, r"attack\.n_neurons = 0"),
    ("input_aware", "joint_ratio", 0.6, r"attack\.joint_ratio = 0\.6"),
    ("input_aware", "generator_width", 0, r"attack\.generator_width = 0"),
    ("ssba_style", "bits", 0, r"attack\.bits = 0"),
    ("ssba_style", "max_residual", 300, r"attack\.max_residual = 300"),
])
def test_bad_parameters_name_the_parameter(name: str, key: str, value: object, match: str) -> None:
    with pytest.raises(AntidoorError, match=match):
        create_attack({"name": name, key: value}, (3, 32, 32), 10)


def test_trojannn_patch_must_fit_and_lc_needs_room_for_corners() -> None:
    with pytest.raises(AntidoorError, match=r"attack\.patch_size 40 does not fit 32x32 images; allowed: 1\.\.32"):
        create_attack({"name": "trojannn", "patch_size": 40}, (3, 32, 32), 10)
    with pytest.raises(AntidoorError, match="at least 6x6"):
        create_attack({"name": "lc"}, (3, 5, 5), 10)


def test_trojannn_too_many_neurons_is_named(attacker: AttackerData) -> None:
    attack = create_attack(tiny_spec("trojannn", n_neurons=1000), (3, 32, 32), 10)
    with pytest.raises(AntidoorError, match=r"attack\.n_neurons 1000 exceeds the surrogate's 16 penultimate neurons"):
        attack.prepare(attacker)


def test_prepare_refuses_data_of_another_shape(attacker: AttackerData) -> None:
    attack = create_attack(tiny_spec("lf"), (3, 28, 28), 10)
    with pytest.raises(AntidoorError, match=r"built for images \(3, 28, 28\)"):
        attack.prepare(attacker)
