"""The user's own attack: a trigger image as a patch, the attacker's poisoned samples as files or indices,
and an Attack subclass registered from the user's own Python file."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from antidoor.attacks import create_attack
from antidoor.checkpoint import load_checkpoint, save_checkpoint
from antidoor.errors import AntidoorError
from antidoor.poisoned import read_indices, read_samples
from antidoor.stress import RAConfig, ra_data_for


@pytest.fixture()
def trigger_png(bundled, tmp_path):
    """A real 8x8 crop of a CIFAR-10 image as a PNG whose left half is transparent."""
    rgb = bundled.x_test[7, :, :8, :8].permute(1, 2, 0).numpy()
    alpha = np.full((8, 8, 1), 255, dtype=np.uint8)
    alpha[:, :4] = 0
    path = tmp_path / "trigger.png"
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(path)
    return path, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def test_patch_pastes_the_png_at_position_and_size(bundled, trigger_png, tmp_path):
    path, rgb = trigger_png
    x = bundled.x_test[:4].float() / 255
    atk = create_attack({"name": "patch", "image": str(path), "position": "top_left"}, (3, 32, 32), 10)
    out = atk.apply(x)
    assert torch.allclose(out[:, :, :8, 4:8], rgb[:, :, 4:8].expand(4, -1, -1, -1), atol=1 / 255)  # opaque half pasted
    assert torch.equal(out[:, :, :8, :4], atk.apply(x)[:, :, :8, :4]) and torch.allclose(out[:, :, :8, :4], x[:, :, :8, :4],
                                                                                         atol=0.5 / 255)  # transparent half
    assert torch.allclose(out[:, :, 8:], x[:, :, 8:], atol=0.5 / 255)
    half = create_attack({"name": "patch", "image": str(path), "x": 20, "y": 10, "size": 4, "alpha": 0.5}, (3, 32, 32), 10)
    assert half.tensors["mask"][0, 10:14, 22:24].eq(0.5).all() and half.tensors["mask"].sum() == 0.5 * 8
    # saved with a model, the trigger needs the PNG no more
    from antidoor.models import build_model

    ckpt = save_checkpoint(tmp_path / "m.safetensors", build_model("small_cnn", 10, width=8), {}, atk)
    path.unlink()
    again = load_checkpoint(ckpt).attack
    assert torch.equal(again.apply(x), out)
    with pytest.raises(AntidoorError, match=r"attack.image .* cannot read the image"):
        create_attack({"name": "patch", "image": str(path)}, (3, 32, 32), 10)


def test_patch_refuses_positions_outside_the_image():
    with pytest.raises(AntidoorError, match=r"attack.x 30, attack.y 28: a 4x4 patch does not fit 32x32 images; allowed: x 0..28"):
        create_attack({"name": "patch", "x": 30}, (3, 32, 32), 10)


def _without_poison(scenario):
    sc = copy.copy(scenario)
    sc.splits = copy.copy(sc.splits)
    sc.splits.poison = torch.empty(0, dtype=torch.int64)
    sc.poisoned_samples = None
    return sc


def test_poisoned_indices_from_a_file(badnets_run, tmp_path):
    sc = _without_poison(badnets_run.result.scenario)
    assert not sc.oracle_available()
    poison = badnets_run.result.scenario.splits.poison
    (tmp_path / "idx.txt").write_text("\n".join(map(str, poison[:50].tolist())))
    sc.use_poisoned(indices=read_indices(tmp_path / "idx.txt"))
    assert torch.equal(sc.splits.poison, poison[:50]) and sc.oracle_available()
    assert ra_data_for(sc, RAConfig()).source == "recorded poisoned training samples"
    first = int(sc.splits.defender_train[0])
    (tmp_path / "overlap.json").write_text(json.dumps([first, *poison[:5].tolist()]))
    n_defender = len(sc.splits.defender_train)
    sc.use_poisoned(indices=read_indices(tmp_path / "overlap.json"))  # a poisoned image leaves the defender's clean data
    assert first in sc.splits.poison.tolist() and first not in sc.splits.defender_train.tolist()
    assert len(sc.splits.defender_train) == n_defender - 1
    np.save(tmp_path / "far.npy", np.array([10**6]))
    with pytest.raises(AntidoorError, match=r"poisoned index 1000000 is outside the training set"):
        sc.use_poisoned(indices=read_indices(tmp_path / "far.npy"))
    (tmp_path / "words.txt").write_text("one two")
    with pytest.raises(AntidoorError, match=r"expected integers"):
        read_indices(tmp_path / "words.txt")


def test_poisoned_images_from_npz_and_folder(badnets_run, tmp_path):
    """The attacker's own triggered images: RA uses them as they are; with true labels EP can be purified."""
    sc = _without_poison(badnets_run.result.scenario)
    d, idx = badnets_run.data, badnets_run.result.scenario.splits.poison[::20][:20]  # the data are sorted by class
    triggered = sc.attack.apply_uint8(d.x_train[idx])
    np.savez(tmp_path / "p.npz", x=triggered.permute(0, 2, 3, 1).numpy(), y=d.y_train[idx].numpy())
    sc.use_poisoned(samples=read_samples(tmp_path / "p.npz"))
    assert sc.oracle_available()
    ra = ra_data_for(sc, RAConfig(n_poison=5))
    assert ra.source.startswith("20 poisoned images from") and (ra.y[-5:] == sc.attack.target).all()
    assert all((triggered == img).all(dim=(1, 2, 3)).any() for img in ra.x[-5:])  # the given images, not restamped
    oracle = sc.defender_data(oracle=True)
    assert torch.equal(oracle.poisoned_x, triggered) and torch.equal(oracle.poisoned_y, d.y_train[idx])
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(triggered[:6]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    sc2 = _without_poison(badnets_run.result.scenario)
    sc2.use_poisoned(samples=read_samples(folder))
    assert not sc2.oracle_available() and len(sc2.poisoned_samples.x) == 6
    np.savez(tmp_path / "small.npz", x=triggered[:, :, :16, :16].numpy())
    with pytest.raises(AntidoorError, match=r"are \(3, 16, 16\) images; the data's are \(3, 32, 32\)"):
        sc2.use_poisoned(samples=read_samples(tmp_path / "small.npz"))


def _documented_plugin() -> str:
    """The plugin example of antidoor.plugins' docstring, so the documented example is the one tested."""
    import textwrap

    import antidoor.plugins

    doc = antidoor.plugins.__doc__
    return textwrap.dedent(doc.split("::\n\n", 1)[1].split("\n\nA checkpoint", 1)[0])


PLUGIN = _documented_plugin()


def test_plugin_attack_from_the_users_file(run_cli, saved_run, tmp_path):
    plugin = tmp_path / "my_attack.py"
    plugin.write_text(PLUGIN)
    res = run_cli("--plugin", plugin, "evaluate", saved_run, "--attack", "stripe", "--set", "attack.row=3", "--device", "cpu",
                  "--out", tmp_path, "--quiet")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "model.metrics.json").read_text())["attack"]["name"] == "stripe"
    line = run_cli("evaluate", saved_run, "--attack", "stripe", "--out", tmp_path).error_line()
    assert "unknown attack 'stripe'" in line  # without --plugin nothing of the user's is imported
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    line = run_cli("--plugin", tmp_path / "broken.py", "evaluate", saved_run).error_line()
    assert "broken.py' failed while importing: RuntimeError: boom" in line
