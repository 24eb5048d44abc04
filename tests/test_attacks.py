"""attacks/: every registered attack on real images, then each attack's own trigger.

Parametrised over ``ATTACKS``: a newly registered attack is tested without touching this file.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from antidoor.attacks import ATTACKS, Attack, create_attack
from antidoor.attacks.base import quantize, validate_attack_spec
from antidoor.data import ImageData
from antidoor.errors import AntidoorError

TARGET = 1


def spec_for(name: str, **extra: object) -> dict:
    return {"name": name, "pratio": 0.0 if name == "none" else 0.1, "target": TARGET, **extra}


def real_batch(data: ImageData, n: int = 24, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Real test images as floats in [0, 1]; ``size`` resamples them (to exercise other image shapes)."""
    x = data.x_test[::37][:n].float().div(255)
    if size is not None:
        x = quantize(F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1))
    return x


def is_quantised(x: torch.Tensor) -> bool:
    scaled = x.double() * 255
    return bool((scaled - scaled.round()).abs().max() < 1e-3)


@pytest.fixture(scope="module")
def gray(mnist_npz_arrays: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(mnist_npz_arrays["x_test"][:24]).float().div(255)[:, None]


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("shape", ["rgb32", "gray28", "rgb24x36"])
def test_apply_keeps_shape_range_and_is_quantised(name: str, shape: str, bundled: ImageData,
                                                  request: pytest.FixtureRequest) -> None:
    if shape == "rgb32":
        x = real_batch(bundled)
    elif shape == "gray28":
        x = request.getfixturevalue("gray")
    else:
        x = real_batch(bundled, size=(24, 36))
    attack = create_attack(spec_for(name), tuple(x.shape[1:]), 10)
    before = x.clone()
    out = attack.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert is_quantised(out)
    assert torch.equal(x, before), "apply must not modify its input"
    if name == "none":
        assert torch.equal(out, x)
    else:
        changed = (out - x).abs().flatten(1).amax(1) > 0
        assert changed.float().mean() > 0.9, "the trigger must change (nearly) every image"


@pytest.mark.parametrize("name", ATTACKS.names())
def test_poison_batch_relabels_only_dirty_label_attacks(name: str, bundled: ImageData) -> None:
    x = real_batch(bundled)
    y = bundled.y_test[::37][:24].clone()
    poison = torch.zeros(len(x), dtype=torch.bool)
    poison[:6] = True
    attack = create_attack(spec_for(name), (3, 32, 32), 10)
    x0, y0 = x.clone(), y.clone()
    px, py = attack.poison_batch(x, y, poison, torch.Generator().manual_seed(0))
    assert torch.equal(x, x0) and torch.equal(y, y0), "poison_batch must not modify its inputs"
    assert px.shape == x.shape and py.shape == y.shape
    assert torch.equal(px[poison], attack.apply(x[poison]))
    expected = torch.full_like(y[poison], TARGET) if not attack.clean_label else y[poison]
    assert torch.equal(py[poison], expected)
    assert torch.equal(py[~poison], y[~poison]), "only poisoned samples may change label"
    if name == "sig":
        assert attack.clean_label
    if name in ("badnets", "blended", "wanet"):
        assert not attack.clean_label
        assert (y[poison] != TARGET).any(), "the check above needs samples whose label actually changes"


@pytest.mark.parametrize("name", ATTACKS.names())
def test_poison_batch_without_poison_is_a_no_op(name: str, bundled: ImageData) -> None:
    x, y = real_batch(bundled, 8), bundled.y_test[:8]
    px, py = create_attack(spec_for(name), (3, 32, 32), 10).poison_batch(x, y, torch.zeros(8, dtype=torch.bool))
    assert torch.equal(px, x) and torch.equal(py, y)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_trigger_tensors_round_trip(name: str, bundled: ImageData) -> None:
    x = real_batch(bundled)
    attack = create_attack(spec_for(name, seed=7), (3, 32, 32), 10)
    # through safetensors bytes, as a checkpoint stores them, and with a spec whose seed would draw other tensors
    stored = st_load(st_save({k: v.contiguous() for k, v in attack.tensors.items()})) if attack.tensors else {}
    again = create_attack({**attack.spec(), "seed": 8}, (3, 32, 32), 10, tensors=stored)
    assert again.tensors.keys() == attack.tensors.keys()
    for k in attack.tensors:
        assert torch.equal(again.tensors[k], attack.tensors[k])
    assert torch.equal(again.apply(x), attack.apply(x))


@pytest.mark.parametrize("name", ATTACKS.names())
def test_spec_is_json_and_rebuilds_the_same_attack(name: str, bundled: ImageData) -> None:
    attack = create_attack(spec_for(name, seed=3), (3, 32, 32), 10)
    spec = json.loads(json.dumps(attack.spec()))
    assert spec == attack.spec()
    assert spec["name"] == name and spec["seed"] == 3 and spec["target"] == TARGET
    rebuilt = create_attack(spec, (3, 32, 32), 10)
    x = real_batch(bundled, 8)
    assert torch.equal(rebuilt.apply(x), attack.apply(x))
    assert validate_attack_spec(spec) == {k: v for k, v in spec.items() if k != "seed"}


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if create_attack(spec_for(n), (3, 32, 32), 10).tensors])
def test_wrong_trigger_tensor_shape_is_refused(name: str) -> None:
    attack = create_attack(spec_for(name), (3, 32, 32), 10)
    key = next(iter(attack.tensors))
    bad = {**attack.tensors, key: torch.zeros(2, 2)}
    with pytest.raises(AntidoorError, match=f"trigger tensor '{key}' has shape \\(2, 2\\)"):
        create_attack(attack.spec(), (3, 32, 32), 10, tensors=bad)
    with pytest.raises(AntidoorError, match=f"'{key}' has shape missing"):
        create_attack(attack.spec(), (3, 32, 32), 10, tensors={k: v for k, v in attack.tensors.items() if k != key})


@pytest.mark.parametrize("name", ATTACKS.names())
def test_target_must_be_a_class(name: str) -> None:
    with pytest.raises(AntidoorError, match=r"attack.target 10 is not a class; allowed: 0..9"):
        create_attack({**spec_for(name), "target": 10}, (3, 32, 32), 10)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_parameters_are_validated(name: str) -> None:
    with pytest.raises(AntidoorError, match=r"attack\.colour: unknown key") as exc:
        create_attack({**spec_for(name), "colour": "red"}, (3, 32, 32), 10)
    assert "takes: target, pratio, stage" in str(exc.value)
    with pytest.raises(AntidoorError, match=r"attack\.pratio = 1\.5"):
        validate_attack_spec({**spec_for(name), "pratio": 1.5})
    with pytest.raises(AntidoorError, match=r"attack\.stage"):
        validate_attack_spec({**spec_for(name), "stage": "during"})


def _out_of_range_values() -> list[tuple[str, str, object]]:
    """(attack, parameter, a value just outside its declared bounds) for every bounded numeric parameter."""
    import annotated_types as at

    cases = []
    for name in ATTACKS.names():
        for key, field in ATTACKS.get(name).Params.model_fields.items():
            for bound in field.metadata:
                if isinstance(bound, at.Ge):
                    cases.append((name, key, bound.ge - 1))
                elif isinstance(bound, at.Gt):
                    cases.append((name, key, bound.gt))
                elif isinstance(bound, at.Le):
                    cases.append((name, key, bound.le + 1))
                elif isinstance(bound, at.Lt):
                    cases.append((name, key, bound.lt))
    return cases


@pytest.mark.parametrize(("name", "key", "value"), _out_of_range_values())
def test_every_bounded_parameter_is_checked_and_named(name: str, key: str, value: object) -> None:
    with pytest.raises(AntidoorError, match=re.escape(f"attack.{key} = {value!r}")) as exc:
        create_attack({**spec_for(name), key: value}, (3, 32, 32), 10)
    assert f"attack {name!r} takes: " in str(exc.value)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_to_device_moves_tensors(name: str) -> None:
    attack = create_attack(spec_for(name), (3, 32, 32), 10)
    assert attack.to(torch.device("cpu")) is attack
    assert all(t.device.type == "cpu" for t in attack.tensors.values())


def test_unknown_or_missing_attack_name() -> None:
    with pytest.raises(AntidoorError, match=f"unknown attack 'nope'; available: {', '.join(ATTACKS.names())}"):
        create_attack({"name": "nope"}, (3, 32, 32), 10)
    with pytest.raises(AntidoorError, match=r"attack\.name is missing; available:"):
        create_attack({"pratio": 0.1}, (3, 32, 32), 10)
    with pytest.raises(AntidoorError, match="must be a mapping"):
        validate_attack_spec("badnets")


def test_none_attack_is_clean_by_default_and_requires_pratio_zero() -> None:
    assert create_attack({"name": "none"}, (3, 32, 32), 10).pratio == 0  # `antidoor attack --attack none` alone
    assert validate_attack_spec({"name": "none"})["pratio"] == 0
    with pytest.raises(AntidoorError, match=r"attack\.pratio must be 0"):
        create_attack({"name": "none", "pratio": 0.1}, (3, 32, 32), 10)


@pytest.mark.parametrize("name", ["blended", "wanet"])
def test_random_triggers_depend_on_the_seed(name: str) -> None:
    a = create_attack(spec_for(name, seed=0), (3, 32, 32), 10)
    b = create_attack(spec_for(name, seed=0), (3, 32, 32), 10)
    c = create_attack(spec_for(name, seed=1), (3, 32, 32), 10)
    key = next(iter(a.tensors))
    assert torch.equal(a.tensors[key], b.tensors[key])
    assert not torch.equal(a.tensors[key], c.tensors[key])


# --- BadNets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("position", "rows", "cols"), [
    ("bottom_right", slice(28, 32), slice(28, 32)), ("top_left", slice(0, 4), slice(0, 4)),
    ("top_right", slice(0, 4), slice(28, 32)), ("bottom_left", slice(28, 32), slice(0, 4)),
])
def test_badnets_patch(position: str, rows: slice, cols: slice, bundled: ImageData) -> None:
    x = real_batch(bundled, 8)
    out = create_attack({"name": "badnets", "patch_size": 4, "position": position, "value": 0.6}, (3, 32, 32), 10).apply(x)
    expected = x.clone()
    expected[:, :, rows, cols] = round(0.6 * 255) / 255
    assert torch.allclose(out, expected, atol=1e-6)


def test_badnets_default_is_a_white_3x3_bottom_right_patch(bundled: ImageData) -> None:
    attack = create_attack({"name": "badnets"}, (3, 32, 32), 10)
    assert attack.target == 0 and attack.pratio == 0.1 and attack.params.stage == "after_augment"
    out = attack.apply(real_batch(bundled, 4))
    assert (out[:, :, 29:, 29:] == 1).all()
    assert int(attack.tensors["mask"].sum()) == 9


def test_badnets_patch_must_fit() -> None:
    with pytest.raises(AntidoorError, match=r"patch_size 40 does not fit 32x32 images; allowed: 1\.\.32"):
        create_attack({"name": "badnets", "patch_size": 40}, (3, 32, 32), 10)


# --- Blended ----------------------------------------------------------------------------------


def test_blended_formula(bundled: ImageData) -> None:
    x = real_batch(bundled, 8)
    attack = create_attack({"name": "blended", "alpha": 0.3}, (3, 32, 32), 10)
    pattern = attack.tensors["pattern"]
    assert pattern.shape == (3, 32, 32) and pattern.min() >= 0 and pattern.max() <= 1
    assert torch.allclose(attack.apply(x), quantize(0.7 * x + 0.3 * pattern), atol=1e-6)


def _write_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_blended_pattern_from_an_image_file(bundled: ImageData, tmp_path: Path) -> None:
    image = bundled.x_train[123].permute(1, 2, 0).numpy()
    path = _write_png(image, tmp_path / "key.png")
    attack = create_attack({"name": "blended", "pattern": str(path)}, (3, 32, 32), 10)
    assert torch.allclose(attack.tensors["pattern"], bundled.x_train[123].float() / 255, atol=1e-6)
    # a different size is resized; a grayscale target converts the image
    gray = create_attack({"name": "blended", "pattern": str(path)}, (1, 20, 24), 10)
    assert gray.tensors["pattern"].shape == (1, 20, 24)


def test_blended_unreadable_pattern(tmp_path: Path) -> None:
    with pytest.raises(AntidoorError, match="cannot read the image"):
        create_attack({"name": "blended", "pattern": str(tmp_path / "missing.png")}, (3, 32, 32), 10)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(AntidoorError, match=r"attack\.pattern"):
        create_attack({"name": "blended", "pattern": str(junk)}, (3, 32, 32), 10)


# --- SIG --------------------------------------------------------------------------------------


def test_sig_signal(bundled: ImageData) -> None:
    attack = create_attack({"name": "sig", "delta": 20, "frequency": 3}, (3, 32, 32), 10)
    signal = attack.tensors["signal"]
    j = torch.arange(32, dtype=torch.float32)
    assert torch.allclose(signal[0, 0], 20 / 255 * torch.sin(2 * math.pi * 3 * j / 32), atol=1e-6)
    assert torch.equal(signal[0], signal[2]) and torch.equal(signal[:, 0], signal[:, 31])
    x = real_batch(bundled, 8)
    assert torch.allclose(attack.apply(x), quantize((x + signal).clamp(0, 1)), atol=1e-6)


# --- WaNet ------------------------------------------------------------------------------------


def test_wanet_grid_and_noise_mode(bundled: ImageData) -> None:
    attack = create_attack({"name": "wanet", "cross_ratio": 2.0}, (3, 32, 32), 10)
    grid = attack.tensors["grid"]
    assert grid.shape == (1, 32, 32, 2) and grid.abs().max() <= 1
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    offset = (grid[0] - torch.stack((xs, ys), dim=2)).abs()
    assert 0 < offset.max() < 0.1, "an imperceptible warp: small but non-zero"

    x = real_batch(bundled, 24)
    y = bundled.y_test[::37][:24]
    poison = torch.zeros(24, dtype=torch.bool)
    poison[:4] = True
    px, py = attack.poison_batch(x, y, poison, torch.Generator().manual_seed(0))
    changed = (px != x).flatten(1).any(1)
    assert changed[poison].all()
    assert int(changed[~poison].sum()) == 8, "cross_ratio 2 warps twice as many clean samples with noise"
    assert torch.equal(py[~poison], y[~poison])
    assert is_quantised(px)
    assert (px[~poison & changed] != attack.apply(x[~poison & changed])).any(), "noise mode differs from the trigger"


def test_quantize_rounds_to_8_bit_levels() -> None:
    x = torch.tensor([0.0, 0.5, 0.7, 1.0, 0.00196])
    q = quantize(x)
    assert torch.allclose(q * 255, (x * 255).round())
    assert is_quantised(q)


def test_attack_base_class_needs_stamp() -> None:
    class Half(Attack):
        name = "half"

    with pytest.raises(NotImplementedError):
        Half(Attack.Params(), (3, 32, 32), 10).apply(torch.zeros(1, 3, 32, 32))


def test_png_round_trip_of_a_triggered_image(bundled: ImageData, tmp_path: Path) -> None:
    """A triggered image is an image that could be stored: writing it as PNG loses nothing."""
    out = create_attack({"name": "blended"}, (3, 32, 32), 10).apply(real_batch(bundled, 1))[0]
    arr = (out * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    back = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())))).permute(2, 0, 1).float() / 255
    assert torch.allclose(back, out, atol=1e-6)
