"""Presets (named recipes) and the defender budget as a count (data.clean_count)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from antidoor.config import AttackRunConfig, DemoConfig, PurifyConfig, build_config
from antidoor.data.splits import make_splits
from antidoor.errors import AntidoorError
from antidoor.experiment.study import load_study
from antidoor.presets import PAPER_DEFENDER_IMAGES, PRESETS


def test_fast_preset_sets_model_and_recipe_and_the_user_wins(tmp_path: Path) -> None:
    cfg = build_config(AttackRunConfig, preset=["fast"])
    assert (cfg.model.name, cfg.model.width) == ("whitened_cnn", 64)
    assert cfg.train.model_dump(include=set(PRESETS["fast"]["train"])) == PRESETS["fast"]["train"]
    # --set and options beat the preset; the YAML's own preset key works too
    cfg = build_config(AttackRunConfig, overrides=["train.epochs=3"], preset=["fast"], model__width=8)
    assert (cfg.train.epochs, cfg.model.width, cfg.train.label_smoothing) == (3, 8, 0.2)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: [fast, paper-defender]\ntrain: {lr: 0.1}\n")
    cfg = build_config(AttackRunConfig, yaml_file)
    assert (cfg.model.name, cfg.train.lr, cfg.data.clean_count) == ("whitened_cnn", 0.1, PAPER_DEFENDER_IMAGES)


def test_preset_beats_a_commands_built_in_defaults_but_not_the_user() -> None:
    base = {"model": {"name": "small_cnn", "width": 16}, "train": {"epochs": 20}}
    cfg = build_config(DemoConfig, base=base, preset=["fast"])
    assert (cfg.model.name, cfg.train.epochs) == ("whitened_cnn", PRESETS["fast"]["train"]["epochs"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"preset": ["quick"]}, r"preset 'quick' is not known; allowed: fast, paper, paper-defender"),
    ({"overrides": ["preset=3"]}, r"preset must be a name or a list of names"),
])
def test_unknown_presets_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(AntidoorError, match=match):
        build_config(AttackRunConfig, **kwargs)


def test_a_preset_for_sections_a_command_lacks_is_refused() -> None:
    with pytest.raises(AntidoorError, match=r"sets model, train, which this command does not take"):
        build_config(PurifyConfig, preset=["fast"])


def test_study_preset_fills_models_train_and_every_dataset() -> None:
    study = load_study(overrides=["preset=[fast, paper-defender]", "train.epochs=2",
                                  "datasets=[{name: cifar10-mini}, {name: cifar10-mini, n_train: 4000}]"])
    assert [m.name for m in study.models] == ["whitened_cnn"]
    assert (study.train.epochs, study.train.nesterov) == (2, True)
    assert all(d.clean_count == PAPER_DEFENDER_IMAGES for d in study.datasets)
    kept = load_study(overrides=["preset=fast", "models=[{name: small_cnn, width: 8}]"])
    assert [m.name for m in kept.models] == ["small_cnn"]


def test_clean_count_gives_the_defender_exactly_that_many_images_stratified(bundled) -> None:
    y = bundled.y_train
    s, _ = make_splits(y, clean_ratio=0.05, val_ratio=0.2, pratio=0.1, target=0, clean_label=False, seed=0, clean_count=1003)
    defender = torch.cat([s.defender_train, s.defender_val])
    assert len(defender) == 1003 and len(s.defender_val) == 200
    per_class = torch.bincount(y[defender], minlength=10)
    assert per_class.max() - per_class.min() <= 1  # the bundled set is class-balanced
    assert not torch.isin(s.poison, defender).any()
    # the ratio path is unchanged by the count option
    by_ratio, _ = make_splits(y, clean_ratio=0.05, val_ratio=0.2, pratio=0.1, target=0, clean_label=False, seed=0)
    assert len(by_ratio.defender_train) + len(by_ratio.defender_val) == 250


def test_clean_count_as_large_as_the_training_set_is_refused(bundled) -> None:
    with pytest.raises(AntidoorError, match=r"data.clean_count 5000 asks for as many clean images as the training set has"):
        make_splits(bundled.y_train, clean_ratio=0.05, val_ratio=0.2, pratio=0.1, target=0, clean_label=False, seed=0,
                    clean_count=5000)


def test_attack_with_the_fast_preset_through_the_cli(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "fast"
    res = run_cli("attack", "--preset", "fast", "--preset", "paper-defender", "--set", "model.width=4", "--epochs", "1",
                  "--set", "data.clean_count=500", "--pratio", "0.1", "--out", out)
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "model.json").read_text())
    assert meta["config"]["model"]["name"] == "whitened_cnn" and meta["config"]["train"]["nesterov"] is True
    assert meta["dataset"]["n_defender_train"] + meta["dataset"]["n_defender_val"] == 500
    assert "whitening on 5000 clean training images" in res.stderr
